// Deployment configuration: every key from settings, TOML files and the environment; unknown
// keys and bad values rejected by name.

#include <doctest/doctest.h>

#include "kvortex/deployment_config.hpp"

#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

using namespace kvortex;
using namespace std::chrono_literals;

namespace {

void check_error(const error& e, errc code, const std::string& needle) {
  CHECK(e.code == code);
  CHECK_MESSAGE(e.message.find(needle) != std::string::npos, "expected \"" << needle << "\" in: " << e.message);
}

const std::string hex_a = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const std::string hex_b = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

// Every key with a value that differs from its default and parses alone; texts with characters
// TOML must escape.
const std::vector<std::pair<std::string, std::string>> every_key = {
    {"capacity_bytes", "1073741824"},
    {"chunk_tokens", "512"},
    {"block_tokens", "32"},
    {"store_partial_chunks", "true"},
    {"transfer_threads", "3"},
    {"parallel_copy_bytes", "1048576"},
    {"transfer_batch_bytes", "0"},
    {"numa_node", "1"},
    {"ns.model_id", "meta-llama/Llama-3.1-8B"},
    {"ns.dtype", "float16"},
    {"ns.layout", "a \"quoted\" \\ layout \xc3\xbc"},
    {"ns.tp_rank", "1"},
    {"ns.tp_size", "2"},
    {"ns.cache_salt", "tenant\t7\x01"},
    {"geometry.num_layers", "32"},
    {"geometry.kv_planes", "1"},
    {"geometry.kv_heads", "8"},
    {"geometry.head_dim", "128"},
    {"geometry.element_bytes", "1"},
    {"tiering.write", "write_back"},
    {"tiering.demotion_queue_chunks", "100"},
    {"tiering.demotion_queue_bytes", "2097152"},
    {"tiering.tier_threads", "4"},
    {"tiering.promotion_timeout_ms", "150"},
    {"tiering.promotion_batch_chunks", "8"},
    {"tiering.drain_on_shutdown", "false"},
    {"disk.directory", "/var/cache/kvortex"},
    {"disk.capacity_bytes", "68719476736"},
    {"disk.ns", hex_a},
    {"disk.fsync", "data_and_directory"},
    {"disk.direct_io", "off"},
    {"disk.sharing", "shared"},
    {"disk.verify_on_open", "true"},
    {"disk.index_snapshot", "false"},
    {"disk.max_chunk_bytes", "1048576"},
    {"disk.stale_temp_seconds", "60"},
    {"disk.io_engine", "posix"},
    {"disk.io_request_bytes", "65536"},
    {"disk.io_queue_depth", "16"},
    {"redis.servers", "10.0.0.1:6379,[::1]:6380,cache.local:7000"},
    {"redis.mode", "cluster"},
    {"redis.username", "kv"},
    {"redis.password", "s3cr=t,#\"x"},
    {"redis.database", "3"},
    {"redis.ns", hex_b},
    {"redis.key_prefix", "tenant:"},
    {"redis.ttl_ms", "3600000"},
    {"redis.connect_timeout_ms", "100"},
    {"redis.command_timeout_ms", "200"},
    {"redis.reconnect_backoff_min_ms", "10"},
    {"redis.reconnect_backoff_max_ms", "5000"},
    {"redis.slot_refresh_interval_ms", "0"},
    {"redis.connections_per_server", "8"},
    {"redis.max_redirects", "3"},
    {"redis.max_chunk_bytes", "1048576"},
    {"redis.require_connection", "true"},
};

deployment_config all_keys_set() {
  deployment_config c;
  for (const auto& [k, v] : every_key) {
    auto r = apply_setting(c, k, v);
    REQUIRE_MESSAGE(r.has_value(), k << ": " << r.error().message);
  }
  return c;
}

// A configuration that validates: the engine's required fields and a disk tier.
const char* const valid_toml = R"(# a deployment
[engine]
capacity_bytes = "1GiB"
chunk_tokens = 256

[ns]
model_id = "meta-llama/Llama-3.1-8B"

[geometry]
num_layers = 32
kv_heads = 8
head_dim = 128

[tiering]
write = "write_back"
promotion_timeout_ms = 500

[disk]
directory = "/tmp/kvortex-cache"
capacity_bytes = "64GiB"
fsync = "data"

[redis]
servers = ["127.0.0.1:6379", "127.0.0.1:6380"]
password = "secret"
ttl_ms = 60000
)";

struct temp_file {
  std::string path;
  explicit temp_file(const std::string& text) {
    const char* base = std::getenv("TMPDIR");
    path = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/kvortex-config-XXXXXX.toml";
    const int fd = ::mkstemps(path.data(), 5);
    REQUIRE(fd >= 0);
    REQUIRE(::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
    ::close(fd);
  }
  ~temp_file() { std::remove(path.c_str()); }
  temp_file(const temp_file&) = delete;
  temp_file& operator=(const temp_file&) = delete;
};

std::string env_name(std::string key, const std::string& prefix = "KVORTEX_") {
  for (auto& ch : key) ch = ch == '.' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return prefix + key;
}

}  // namespace


// Without toml++ the file functions answer unsupported; the tests that read TOML stop there.
#if defined(KVORTEX_HAS_TOMLPLUSPLUS) && KVORTEX_HAS_TOMLPLUSPLUS
#define KVT_REQUIRE_TOML() (void)0
#else
#define KVT_REQUIRE_TOML()                                                                   \
  do {                                                                                       \
    CHECK(kvortex::load_config_file("/nonexistent.toml").error().code == kvortex::errc::unsupported); \
    MESSAGE("built without toml++: TOML part skipped");                                     \
    return;                                                                                  \
  } while (0)
#endif

TEST_CASE("deployment config: config_keys lists every key of the three configs, each once") {
  std::vector<std::string> expected;
  for (const auto& kv : every_key) expected.push_back(kv.first);
  CHECK(config_keys() == expected);
}

TEST_CASE("deployment config: every key sets its own field") {
  const deployment_config c = all_keys_set();
  const auto& e = c.engine;
  CHECK(e.capacity_bytes == 1073741824);
  CHECK(e.chunk_tokens == 512);
  CHECK(e.block_tokens == 32);
  CHECK(e.store_partial_chunks);
  CHECK(e.transfer_threads == 3);
  CHECK(e.parallel_copy_bytes == 1048576);
  CHECK(e.transfer_batch_bytes == 0);
  CHECK(e.numa_node == 1);
  CHECK(e.ns.model_id == "meta-llama/Llama-3.1-8B");
  CHECK(e.ns.dtype == "float16");
  CHECK(e.ns.layout == "a \"quoted\" \\ layout \xc3\xbc");
  CHECK(e.ns.tp_rank == 1);
  CHECK(e.ns.tp_size == 2);
  CHECK(e.ns.cache_salt == "tenant\t7\x01");
  CHECK(e.geometry.num_layers == 32);
  CHECK(e.geometry.kv_planes == 1);
  CHECK(e.geometry.kv_heads == 8);
  CHECK(e.geometry.head_dim == 128);
  CHECK(e.geometry.element_bytes == 1);
  CHECK(e.tiering.write == write_policy::write_back);
  CHECK(e.tiering.demotion_queue_chunks == 100);
  CHECK(e.tiering.demotion_queue_bytes == 2097152);
  CHECK(e.tiering.tier_threads == 4);
  CHECK(e.tiering.promotion_timeout == 150ms);
  CHECK(e.tiering.promotion_batch_chunks == 8);
  CHECK_FALSE(e.tiering.drain_on_shutdown);

  REQUIRE(c.disk.has_value());
  const auto& d = *c.disk;
  CHECK(d.directory == "/var/cache/kvortex");
  CHECK(d.capacity_bytes == 68719476736ull);
  CHECK(d.ns[0] == std::byte{0x00});
  CHECK(d.ns[1] == std::byte{0x11});
  CHECK(d.ns[15] == std::byte{0xff});
  CHECK(d.fsync == fsync_policy::data_and_directory);
  CHECK(d.direct_io == direct_io_mode::off);
  CHECK(d.sharing == directory_sharing::shared);
  CHECK(d.verify_on_open);
  CHECK_FALSE(d.index_snapshot);
  CHECK(d.max_chunk_bytes == 1048576);
  CHECK(d.stale_temp_seconds == 60);
  CHECK(d.io_engine == disk_io_engine::posix);
  CHECK(d.io_request_bytes == 65536);
  CHECK(d.io_queue_depth == 16);

  REQUIRE(c.redis.has_value());
  const auto& r = *c.redis;
  REQUIRE(r.servers.size() == 3);
  CHECK(r.servers[0] == redis_endpoint{"10.0.0.1", 6379});
  CHECK(r.servers[1] == redis_endpoint{"::1", 6380});
  CHECK(r.servers[2] == redis_endpoint{"cache.local", 7000});
  CHECK(r.mode == redis_mode::cluster);
  CHECK(r.username == "kv");
  CHECK(r.password == "s3cr=t,#\"x");
  CHECK(r.database == 3);
  CHECK(r.ns[0] == std::byte{0xff});
  CHECK(r.ns[31] == std::byte{0x00});
  CHECK(r.key_prefix == "tenant:");
  CHECK(r.ttl == 3600000ms);
  CHECK(r.connect_timeout == 100ms);
  CHECK(r.command_timeout == 200ms);
  CHECK(r.reconnect_backoff_min == 10ms);
  CHECK(r.reconnect_backoff_max == 5000ms);
  CHECK(r.slot_refresh_interval == 0ms);
  CHECK(r.connections_per_server == 8);
  CHECK(r.max_redirects == 3);
  CHECK(r.max_chunk_bytes == 1048576);
  CHECK(r.require_connection);
}

TEST_CASE("deployment config: every key round-trips through config_value, TOML text and the environment") {
  KVT_REQUIRE_TOML();
  const deployment_config defaults = [] {
    deployment_config c;
    c.disk.emplace();
    c.redis.emplace();
    return c;
  }();
  const deployment_config c = all_keys_set();
  for (const auto& [k, v] : every_key) {
    CAPTURE(k);
    auto got = config_value(c, k);
    REQUIRE(got.has_value());
    CHECK(*got == v);
    CHECK(config_value(defaults, k).value() != v);  // the value really changed the field
  }

  // The TOML text reads back to the same values (quotes, backslashes, control bytes escaped).
  const std::string text = to_config_text(c);
  deployment_config back;
  auto r = apply_config_text(back, text, "round-trip");
  REQUIRE_MESSAGE(r.has_value(), r.error().message << "\n" << text);
  for (const auto& [k, v] : every_key) {
    CAPTURE(k);
    CHECK(config_value(back, k).value() == v);
  }
  CHECK(to_config_text(back) == text);

  // One environment variable per key.
  for (const auto& [k, v] : every_key) {
    CAPTURE(k);
    const std::string entry = env_name(k) + "=" + v;
    const std::vector<const char*> env{entry.c_str()};
    deployment_config e;
    auto applied = apply_config_env(e, env);
    REQUIRE_MESSAGE(applied.has_value(), applied.error().message);
    CHECK(config_value(e, k).value() == v);
  }

  // `engine.` is accepted before the engine's keys.
  deployment_config p;
  REQUIRE(apply_setting(p, "engine.geometry.num_layers", "7").has_value());
  REQUIRE(apply_setting(p, "engine.capacity_bytes", "9").has_value());
  CHECK(p.engine.geometry.num_layers == 7);
  CHECK(p.engine.capacity_bytes == 9);
  CHECK(config_value(p, "engine.capacity_bytes").value() == "9");
}

TEST_CASE("deployment config: sizes take binary suffixes") {
  deployment_config c;
  const std::vector<std::pair<std::string, std::uint64_t>> sizes = {
      {"0", 0},           {"1K", 1024},          {"1KiB", 1024},   {"512M", 512ull << 20}, {"3MiB", 3ull << 20},
      {"64G", 64ull << 30}, {"64GiB", 64ull << 30}, {"2T", 2ull << 40}, {"1TiB", 1ull << 40},
      {"18446744073709551615", 18446744073709551615ull}};
  for (const auto& [text, bytes] : sizes) {
    CAPTURE(text);
    REQUIRE(apply_setting(c, "disk.capacity_bytes", text).has_value());
    CHECK(c.disk->capacity_bytes == bytes);
  }
  // Plain numbers take no suffix.
  CHECK_FALSE(apply_setting(c, "geometry.num_layers", "1K").has_value());
}

TEST_CASE("deployment config: unknown keys are rejected by name") {
  deployment_config c;
  const std::string before = to_config_text(c);
  auto r = apply_setting(c, "geometry.num_layer", "32");
  REQUIRE_FALSE(r.has_value());
  check_error(r.error(), errc::invalid_config, "unknown key \"geometry.num_layer\"");
  check_error(r.error(), errc::invalid_config, "did you mean \"geometry.num_layers\"");

  for (const std::string key : {"capacity", "disk.directry", "redis.server", "redis.ttl", "tiering.writ", "foo.bar", "", "disk.",
                          "engine.disk.directory", "geometry", "disk"}) {
    CAPTURE(key);
    auto u = apply_setting(c, key, "1");
    REQUIRE_FALSE(u.has_value());
    check_error(u.error(), errc::invalid_config, "unknown key \"" + key + "\"");
  }
  // An unknown disk.* or redis.* key does not create the section.
  CHECK_FALSE(c.disk.has_value());
  CHECK_FALSE(c.redis.has_value());
  CHECK(to_config_text(c) == before);

  auto v = config_value(c, "disk.nope");
  REQUIRE_FALSE(v.has_value());
  check_error(v.error(), errc::invalid_config, "disk.nope");
  auto absent = config_value(c, "disk.directory");
  REQUIRE_FALSE(absent.has_value());
  CHECK(absent.error().code == errc::not_found);
}

TEST_CASE("deployment config: bad values are rejected naming the key, leaving the config unchanged") {
  deployment_config c = all_keys_set();
  const std::string before = to_config_text(c);
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"geometry.num_layers", "-1"},
      {"geometry.num_layers", "abc"},
      {"geometry.num_layers", ""},
      {"geometry.num_layers", " 32"},
      {"geometry.num_layers", "32 "},
      {"geometry.num_layers", "+32"},
      {"geometry.num_layers", "0x20"},
      {"geometry.num_layers", "3.5"},
      {"geometry.num_layers", "4294967296"},  // above uint32
      {"chunk_tokens", "18446744073709551616"},
      {"capacity_bytes", "12XB"},
      {"capacity_bytes", "12 GiB"},
      {"capacity_bytes", "GiB"},
      {"capacity_bytes", "16777216TiB"},  // 2^64: wraps
      {"numa_node", "-2"},
      {"numa_node", "1.0"},
      {"store_partial_chunks", "yes"},
      {"store_partial_chunks", "True"},
      {"store_partial_chunks", "1"},
      {"tiering.write", "write_around"},
      {"tiering.promotion_timeout_ms", "-5"},
      {"tiering.promotion_timeout_ms", "2s"},
      {"disk.fsync", "always"},
      {"disk.direct_io", "ON"},
      {"disk.io_engine", "uring"},
      {"disk.sharing", ""},
      {"disk.ns", "00"},
      {"disk.ns", std::string(64, 'g')},
      {"disk.ns", hex_a + "00"},
      {"redis.servers", ""},
      {"redis.servers", "host:0"},
      {"redis.servers", "host:65536"},
      {"redis.servers", "a:1,,b:2"},
      {"redis.servers", "a:1,"},
      {"redis.servers", "[::1"},
      {"redis.servers", "a b:1"},
      {"redis.servers", "[ ::1]:1"},
      {"ns.model_id", "\xff"},
      {"ns.model_id", "\xc0\x80"},          // overlong NUL
      {"redis.password", "\xed\xa0\x80"},  // a surrogate
      {"redis.key_prefix", "\xe2\x82"},     // cut short
      {"redis.mode", "sentinel"},
      {"redis.database", "-1"},
      {"redis.ttl_ms", "1h"},
  };
  for (const auto& [k, v] : bad) {
    CAPTURE(k);
    CAPTURE(v);
    auto r = apply_setting(c, k, v);
    REQUIRE_FALSE(r.has_value());
    check_error(r.error(), errc::invalid_config, "invalid value for \"" + k + "\"");
  }
  CHECK(to_config_text(c) == before);

  auto r = apply_setting(c, "tiering.write", "write_around");
  REQUIRE_FALSE(r.has_value());
  check_error(r.error(), errc::invalid_config, "write_through, write_back");  // the choices
}

TEST_CASE("deployment config: a TOML file with every section loads and validates") {
  KVT_REQUIRE_TOML();
  temp_file f(valid_toml);
  auto loaded = load_config_file(f.path);
  REQUIRE_MESSAGE(loaded.has_value(), loaded.error().message);
  const auto& c = *loaded;
  CHECK(c.engine.capacity_bytes == (std::size_t{1} << 30));
  CHECK(c.engine.chunk_tokens == 256);
  CHECK(c.engine.ns.model_id == "meta-llama/Llama-3.1-8B");
  CHECK(c.engine.geometry.num_layers == 32);
  CHECK(c.engine.geometry.kv_heads == 8);
  CHECK(c.engine.geometry.head_dim == 128);
  CHECK(c.engine.tiering.write == write_policy::write_back);
  CHECK(c.engine.tiering.promotion_timeout == 500ms);
  REQUIRE(c.disk.has_value());
  CHECK(c.disk->directory == "/tmp/kvortex-cache");
  CHECK(c.disk->capacity_bytes == (std::uint64_t{64} << 30));
  CHECK(c.disk->fsync == fsync_policy::data);
  REQUIRE(c.redis.has_value());
  REQUIRE(c.redis->servers.size() == 2);
  CHECK(c.redis->servers[1] == redis_endpoint{"127.0.0.1", 6380});
  CHECK(c.redis->password == "secret");
  CHECK(c.redis->ttl == 60000ms);
  CHECK(c.redis->mode == redis_mode::standalone);  // untouched keys keep their defaults
  CHECK(c.redis->command_timeout == 250ms);

  // Top-level dotted keys and [engine.geometry] reach the same fields.
  deployment_config d;
  REQUIRE(apply_config_text(d, "geometry.num_layers = 4\n[engine.ns]\ntp_size = 4\n[engine]\ncapacity_bytes = 5\n").has_value());
  CHECK(d.engine.geometry.num_layers == 4);
  CHECK(d.engine.ns.tp_size == 4);
  CHECK(d.engine.capacity_bytes == 5);
  CHECK_FALSE(d.disk.has_value());

  // Lines that start with '[' inside values and strings are not headers.
  deployment_config n;
  auto nested = apply_config_text(n, "[redis]\nservers = [\n  \"a:1\",\n  # [&\n  \"b:2\"]\n[ns]\nmodel_id = '''[&\n[[[1]]]'''\n");
  REQUIRE_MESSAGE(nested.has_value(), nested.error().message);
  CHECK(n.redis->servers.size() == 2);
  CHECK(n.engine.ns.model_id == "[&\n[[[1]]]");
  // Non-ASCII text in strings and comments is fine.
  auto text = apply_config_text(n, "# r\xc3\xa9sum\xc3\xa9\n[ns]\ncache_salt = \"\xc2\xa7\" # \xc2\xa7\ndtype = \"\"\"x\\\n  y\xc2\xa7\"\"\"\n");
  REQUIRE_MESSAGE(text.has_value(), text.error().message);
  CHECK(n.engine.ns.cache_salt == "\xc2\xa7");
  CHECK(n.engine.ns.dtype == "xy\xc2\xa7");

  // An empty [disk] table enables the tier (which then fails validation: no directory).
  deployment_config e;
  REQUIRE(apply_config_text(e, "[disk]\n").has_value());
  CHECK(e.disk.has_value());
  CHECK_FALSE(e.redis.has_value());
}

TEST_CASE("deployment config: a file's errors name the file, the line and the key") {
  KVT_REQUIRE_TOML();
  const std::string misspelt = "[engine]\ncapacity_bytes = 1024\n\n[geometry]\nnum_layers = 32\nkv_head = 8\n";
  temp_file f(misspelt);
  auto r = load_config_file(f.path);
  REQUIRE_FALSE(r.has_value());
  check_error(r.error(), errc::invalid_config, f.path + ":6: ");
  check_error(r.error(), errc::invalid_config, "unknown key \"geometry.kv_head\"");
  check_error(r.error(), errc::invalid_config, "did you mean \"geometry.kv_heads\"");

  const std::vector<std::pair<std::string, std::string>> cases = {
      {"[disk]\ndirectory = \"/x\"\nfsync = \"always\"\n", "t.toml:3: invalid value for \"disk.fsync\""},
      {"[geometry]\nnum_layers = 3.5\n", "t.toml:2: invalid value for \"geometry.num_layers\": expected an integer or a string, got a float"},
      {"[tiering]\ndrain_on_shutdown = \"yes\"\n", "t.toml:2: invalid value for \"tiering.drain_on_shutdown\": expected a boolean, got a string"},
      {"[ns]\nmodel_id = 7\n", "t.toml:2: invalid value for \"ns.model_id\": expected a string, got an integer"},
      {"[redis]\nservers = [\"a:1\", 2]\n", "t.toml:2: invalid value for \"redis.servers\""},
      {"[redis]\nservers = []\n", "t.toml:2: invalid value for \"redis.servers\": empty array"},
      {"\n\n[cache]\nsize = 1\n", "t.toml:3: unknown key \"cache\""},
      {"[disk.options]\nx = 1\n", "t.toml:1: unknown key \"disk.options\""},
      {"[geometry]\nnum_layers = -4\n", "t.toml:2: invalid value for \"geometry.num_layers\""},
      {"capacity_bytes = 1\ncapacity_bytes = 2\n", "t.toml:2: "},  // duplicate key: a syntax error
      {"[geometry\n", "t.toml:1: "},
      // Headers toml++ 3.3 would parse past its own assumption (its issue #294): refused first.
      {"[&", "t.toml:1: invalid table header"},
      {"a = 1\n[[[1]]]\n", "t.toml:2: invalid table header"},
      {"s = \"\"\"\n[x]\n\"\"\"\n[ .a]\n", "t.toml:4: invalid table header"},
      // Non-ASCII code points where toml++ 3.3 reaches __builtin_unreachable (its issues #295, #190).
      {"\xcc\xaa", "t.toml:1: a non-ASCII character outside a string or a comment"},
      {"[ns]\nmodel_id = \"m\" \xc2\xa7\n", "t.toml:2: a non-ASCII character outside a string or a comment"},
      {"[geometry]\nnum_layers = 3\"\xc2\xa7\"\n", "t.toml:2: a non-ASCII character outside a string or a comment"},  // a stray quote
      {"[ns]\nmodel_id = \"m\"\xc2\xa7\n", "t.toml:2: a non-ASCII character outside a string or a comment"},
      {"[ns]\nmodel_id = \"\"\"a\\\n\n  \xc2\xa7\"\"\"\n", "t.toml:4: a non-ASCII character right after a backslash in a multi-line string"},
      {"[ns]\nmodel_id = \"\"\"\\\xc2\xa7\"\"\"\n", "t.toml:2: a non-ASCII character right after a backslash in a multi-line string"},
      {"[ns]\nmodel_id = \"\"\"\\ \xc2\xa7\"\"\"\n", "t.toml:2: a non-ASCII character right after a backslash in a multi-line string"},
  };
  for (const auto& [text, needle] : cases) {
    CAPTURE(text);
    deployment_config c;
    auto e = apply_config_text(c, text, "t.toml");
    REQUIRE_FALSE(e.has_value());
    check_error(e.error(), errc::invalid_config, needle);
  }

  auto missing = load_config_file("/nonexistent/kvortex.toml");
  REQUIRE_FALSE(missing.has_value());
  check_error(missing.error(), errc::invalid_argument, "/nonexistent/kvortex.toml");
}

TEST_CASE("deployment config: the loaded configuration is validated") {
  KVT_REQUIRE_TOML();
  temp_file no_geometry("[engine]\ncapacity_bytes = 1024\n");
  auto r = load_config_file(no_geometry.path);
  REQUIRE_FALSE(r.has_value());
  check_error(r.error(), errc::invalid_config, "geometry.num_layers must be > 0");

  temp_file bad_disk(std::string(valid_toml) + "\n");  // valid; then break the disk section
  deployment_config c;
  REQUIRE(apply_config_file(c, bad_disk.path).has_value());
  REQUIRE(validate(c).has_value());
  REQUIRE(apply_setting(c, "disk.capacity_bytes", "1").has_value());
  check_error(validate(c).error(), errc::invalid_config, "disk_tier_config.capacity_bytes");
  REQUIRE(apply_setting(c, "disk.capacity_bytes", "1G").has_value());
  REQUIRE(apply_setting(c, "redis.key_prefix", "a{b").has_value());
  check_error(validate(c).error(), errc::invalid_config, "redis_tier_config.key_prefix");
}

TEST_CASE("deployment config: the environment overrides the file, and unknown variables are named") {
  KVT_REQUIRE_TOML();
  temp_file f(valid_toml);
  deployment_config c;
  REQUIRE(apply_config_file(c, f.path).has_value());
  const std::vector<const char*> env{
      "PATH=/usr/bin",
      "KVORTEX_GEOMETRY_NUM_LAYERS=40",
      "KVORTEX_DISK_DIRECTORY=/srv/kv",
      "KVORTEX_REDIS_SERVERS=10.1.1.1:7000",
      "KVORTEX_CAPACITY_BYTES=2GiB",
      "KVORTEX_ENGINE_TIERING_TIER_THREADS=3",
      "KVORTEX_STRESS_SECONDS=3",  // a tool's variable, not a key: skipped
      "KVORTEX_CACHE_DIR=/tmp",    // the library's own NVRTC cache: skipped
      "OTHER_GEOMETRY_NUM_LAYERS=1",
  };
  auto r = load_config_env(c, env);
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  CHECK(c.engine.geometry.num_layers == 40);
  CHECK(c.engine.geometry.kv_heads == 8);  // from the file
  CHECK(c.disk->directory == "/srv/kv");
  CHECK(c.disk->fsync == fsync_policy::data);  // from the file
  REQUIRE(c.redis->servers.size() == 1);
  CHECK(c.redis->servers[0] == redis_endpoint{"10.1.1.1", 7000});
  CHECK(c.engine.capacity_bytes == (std::size_t{2} << 30));
  CHECK(c.engine.tiering.tier_threads == 3);

  const std::vector<const char*> misspelt{"KVORTEX_DISK_DIRECTRY=/x"};
  auto u = load_config_env(c, misspelt);
  REQUIRE_FALSE(u.has_value());
  check_error(u.error(), errc::invalid_config, "environment variable KVORTEX_DISK_DIRECTRY");
  check_error(u.error(), errc::invalid_config, "unknown key \"disk.directry\"");

  const std::vector<const char*> bad_value{"KVORTEX_DISK_FSYNC=sometimes"};
  auto b = load_config_env(c, bad_value);
  REQUIRE_FALSE(b.has_value());
  check_error(b.error(), errc::invalid_config, "environment variable KVORTEX_DISK_FSYNC: invalid value for \"disk.fsync\"");

  // The result is validated.
  const std::vector<const char*> invalid{"KVORTEX_GEOMETRY_KV_PLANES=3"};
  auto v = load_config_env(c, invalid);
  REQUIRE_FALSE(v.has_value());
  check_error(v.error(), errc::invalid_config, "geometry.kv_planes");

  // Another prefix; this process's own environment through load_config.
  const std::vector<const char*> other{"APP_KV_GEOMETRY_HEAD_DIM=64", "KVORTEX_GEOMETRY_HEAD_DIM=1"};
  deployment_config o = c;
  o.engine.geometry.kv_planes = 2;
  REQUIRE(load_config_env(o, other, "APP_KV_").has_value());
  CHECK(o.engine.geometry.head_dim == 64);

  REQUIRE(::setenv("KVXTEST_GEOMETRY_HEAD_DIM", "96", 1) == 0);
  REQUIRE(::setenv("KVXTEST_DISK_IO_QUEUE_DEPTH", "8", 1) == 0);
  auto whole = load_config(f.path, "KVXTEST_");
  ::unsetenv("KVXTEST_GEOMETRY_HEAD_DIM");
  ::unsetenv("KVXTEST_DISK_IO_QUEUE_DEPTH");
  REQUIRE_MESSAGE(whole.has_value(), whole.error().message);
  CHECK(whole->engine.geometry.head_dim == 96);
  CHECK(whole->disk->io_queue_depth == 8);
  CHECK(whole->engine.geometry.num_layers == 32);  // the file's
}
