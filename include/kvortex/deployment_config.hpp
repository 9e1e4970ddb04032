#pragma once
/// @file deployment_config.hpp
/// @brief A deployment's configuration (engine, disk tier, Redis tier) from a TOML file, from
/// environment variables, or from `key = value` settings, every key checked: an unknown key is an
/// error that names it, never silently ignored.
///
/// TOML files need toml++ (Debian: libtomlplusplus-dev); without it `apply_config_text`,
/// `apply_config_file` and `load_config_file` fail with errc::unsupported and everything else works.
///
/// ## Keys
/// A file's tables map to the key prefixes: `[engine]` to none (`engine.` is accepted as a prefix
/// of the engine's own keys), `[geometry]` to `geometry.`, `[ns]` to `ns.`, `[tiering]` to
/// `tiering.`, `[disk]` to `disk.`, `[redis]` to `redis.`; TOML dotted keys (`geometry.num_layers
/// = 32` at the top) work too. An environment variable is the prefix (default `KVORTEX_`) then the
/// key in upper case with every '.' written '_': `KVORTEX_GEOMETRY_NUM_LAYERS`,
/// `KVORTEX_DISK_DIRECTORY`, `KVORTEX_CAPACITY_BYTES`. A `[disk]` or `[redis]` table (even empty),
/// or any `disk.*` / `redis.*` setting, enables that tier: the section starts from the tier
/// config's defaults.
///
/// Values: *uint* is a decimal whole number (no sign, no spaces, the whole text), range checked;
/// *size* is a uint optionally followed by one of K, M, G, T, KiB, MiB, GiB, TiB (all powers of
/// 1024: `64GiB`, `512M`); *ms* is a uint of milliseconds; *bool* is `true` or `false`; in a TOML
/// file numbers may be TOML integers or strings (a string for sizes with a suffix or beyond
/// 2^63), bools must be TOML booleans and text must be a TOML string. Non-ASCII characters may
/// stand only in strings and comments (as TOML says), and not right after a backslash (or the
/// whitespace after one) in a multi-line basic string, where toml++ 3.3 misreads them.
///
/// | key | type | default | field |
/// |-----|------|---------|-------|
/// | `capacity_bytes` | size | 0 (required) | engine_config::capacity_bytes |
/// | `chunk_tokens` | uint | 256 | engine_config::chunk_tokens |
/// | `block_tokens` | uint | 16 | engine_config::block_tokens |
/// | `store_partial_chunks` | bool | false | engine_config::store_partial_chunks |
/// | `transfer_threads` | uint | 0 (from the hardware) | engine_config::transfer_threads |
/// | `parallel_copy_bytes` | size | 8 MiB | engine_config::parallel_copy_bytes |
/// | `transfer_batch_bytes` | size | 32 MiB | engine_config::transfer_batch_bytes |
/// | `numa_node` | integer, -1 or more | -1 | engine_config::numa_node |
/// | `ns.model_id` | text | "" | kv_namespace::model_id |
/// | `ns.dtype` | text | bfloat16 | kv_namespace::dtype |
/// | `ns.layout` | text | kv_2ltd | kv_namespace::layout |
/// | `ns.tp_rank` | uint | 0 | kv_namespace::tp_rank |
/// | `ns.tp_size` | uint | 1 | kv_namespace::tp_size |
/// | `ns.cache_salt` | text | "" | kv_namespace::cache_salt |
/// | `geometry.num_layers` | uint | 0 (required) | kv_geometry::num_layers |
/// | `geometry.kv_planes` | uint | 2 | kv_geometry::kv_planes |
/// | `geometry.kv_heads` | uint | 0 (required) | kv_geometry::kv_heads |
/// | `geometry.head_dim` | uint | 0 (required) | kv_geometry::head_dim |
/// | `geometry.element_bytes` | uint | 2 | kv_geometry::element_bytes |
/// | `tiering.write` | write_through, write_back | write_through | tiering_config::write |
/// | `tiering.demotion_queue_chunks` | uint | 4096 | tiering_config::demotion_queue_chunks |
/// | `tiering.demotion_queue_bytes` | size | 1 GiB | tiering_config::demotion_queue_bytes |
/// | `tiering.tier_threads` | uint | 2 | tiering_config::tier_threads |
/// | `tiering.promotion_timeout_ms` | ms | 2000 | tiering_config::promotion_timeout |
/// | `tiering.promotion_batch_chunks` | uint | 4 | tiering_config::promotion_batch_chunks |
/// | `tiering.drain_on_shutdown` | bool | true | tiering_config::drain_on_shutdown |
/// | `disk.directory` | text | "" (required) | disk_tier_config::directory |
/// | `disk.capacity_bytes` | size | 0 (required) | disk_tier_config::capacity_bytes |
/// | `disk.ns` | 64 hex digits | zeros | disk_tier_config::ns |
/// | `disk.fsync` | never, data, data_and_directory | never | disk_tier_config::fsync |
/// | `disk.direct_io` | automatic, on, off | automatic | disk_tier_config::direct_io |
/// | `disk.sharing` | exclusive, shared | exclusive | disk_tier_config::sharing |
/// | `disk.verify_on_open` | bool | false | disk_tier_config::verify_on_open |
/// | `disk.index_snapshot` | bool | true | disk_tier_config::index_snapshot |
/// | `disk.max_chunk_bytes` | size | 4 GiB | disk_tier_config::max_chunk_bytes |
/// | `disk.stale_temp_seconds` | uint | 3600 | disk_tier_config::stale_temp_seconds |
/// | `disk.io_engine` | automatic, io_uring, posix | automatic | disk_tier_config::io_engine |
/// | `disk.io_request_bytes` | size | 1 MiB | disk_tier_config::io_request_bytes |
/// | `disk.io_queue_depth` | uint | 4 | disk_tier_config::io_queue_depth |
/// | `redis.servers` | `host:port,host:port` (TOML: also an array of strings) | none (required) | redis_tier_config::servers |
/// | `redis.mode` | standalone, cluster | standalone | redis_tier_config::mode |
/// | `redis.username` | text | "" | redis_tier_config::username |
/// | `redis.password` | text | "" | redis_tier_config::password |
/// | `redis.database` | uint | 0 | redis_tier_config::database |
/// | `redis.ns` | 64 hex digits | zeros | redis_tier_config::ns |
/// | `redis.key_prefix` | text | kvx: | redis_tier_config::key_prefix |
/// | `redis.ttl_ms` | ms | 0 (none) | redis_tier_config::ttl |
/// | `redis.connect_timeout_ms` | ms | 250 | redis_tier_config::connect_timeout |
/// | `redis.command_timeout_ms` | ms | 250 | redis_tier_config::command_timeout |
/// | `redis.reconnect_backoff_min_ms` | ms | 50 | redis_tier_config::reconnect_backoff_min |
/// | `redis.reconnect_backoff_max_ms` | ms | 2000 | redis_tier_config::reconnect_backoff_max |
/// | `redis.slot_refresh_interval_ms` | ms | 100 | redis_tier_config::slot_refresh_interval |
/// | `redis.connections_per_server` | uint | 4 | redis_tier_config::connections_per_server |
/// | `redis.max_redirects` | uint | 5 | redis_tier_config::max_redirects |
/// | `redis.max_chunk_bytes` | size | 64 MiB | redis_tier_config::max_chunk_bytes |
/// | `redis.require_connection` | bool | false | redis_tier_config::require_connection |
///
/// *text* is any valid UTF-8 (what a TOML string can hold).
///
/// The `ns` digests are what the tiers write into every record; whoever builds the tiers from
/// this configuration may derive them from the engine's `[ns]` instead.

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <unistd.h>  // environ

#include "kvortex/config.hpp"
#include "kvortex/error.hpp"
#include "kvortex/tiers/disk_tier_config.hpp"
#include "kvortex/tiers/redis_tier_config.hpp"
#include "kvortex/types.hpp"

#if !defined(KVORTEX_HAS_TOMLPLUSPLUS) && __has_include(<toml++/toml.h>)
#define KVORTEX_HAS_TOMLPLUSPLUS 1
#endif
#if defined(KVORTEX_HAS_TOMLPLUSPLUS) && KVORTEX_HAS_TOMLPLUSPLUS
#include <toml++/toml.h>
#endif

namespace kvortex {

/// @brief Everything a deployment configures: the engine and, when present, the tiers below it.
struct deployment_config {
  engine_config engine;
  std::optional<disk_tier_config> disk;    ///< set: a disk tier below host memory
  std::optional<redis_tier_config> redis;  ///< set: a Redis tier (below the disk tier, if both)
};

/// @brief How a key's value is written in a TOML file.
enum class config_value_kind : std::uint8_t {
  text,     ///< a TOML string
  number,   ///< a TOML integer, or a string (sizes with a suffix)
  boolean,  ///< a TOML boolean
  list,     ///< a string, or a TOML array of strings (redis.servers)
};

namespace detail {

// `"text"`, built by appending: GCC 12 at -O3 misreports `"\"" + std::string(...)` as an
// overlapping copy (-Wrestrict).
[[nodiscard]] inline std::string config_quoted(std::string_view text) {
  std::string q;
  q.reserve(text.size() + 2);
  q += '"';
  q += text;
  q += '"';
  return q;
}

[[nodiscard]] inline error config_value_error(std::string_view value, std::string_view why) {
  return error{errc::invalid_config, config_quoted(value) + " " + std::string(why)};
}

[[nodiscard]] inline result<std::uint64_t> config_parse_uint(std::string_view v, std::uint64_t max) {
  std::uint64_t x = 0;
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec == std::errc::result_out_of_range || (ec == std::errc{} && end == v.data() + v.size() && x > max))
    return std::unexpected(config_value_error(v, "is above the largest allowed, " + std::to_string(max)));
  if (v.empty() || ec != std::errc{} || end != v.data() + v.size())
    return std::unexpected(config_value_error(v, "is not a whole number"));
  return x;
}

// A uint with an optional binary suffix.
[[nodiscard]] inline result<std::uint64_t> config_parse_size(std::string_view v, std::uint64_t max) {
  const auto digits = std::min(v.size(), v.find_first_not_of("0123456789"));
  const auto suffix = v.substr(digits);
  unsigned shift = 0;
  if (suffix.empty()) shift = 0;
  else if (suffix == "K" || suffix == "KiB") shift = 10;
  else if (suffix == "M" || suffix == "MiB") shift = 20;
  else if (suffix == "G" || suffix == "GiB") shift = 30;
  else if (suffix == "T" || suffix == "TiB") shift = 40;
  else return std::unexpected(config_value_error(v, "is not a size (a whole number, optionally followed by K, M, G, T, KiB, MiB, GiB or TiB)"));
  auto n = config_parse_uint(v.substr(0, digits), std::numeric_limits<std::uint64_t>::max());
  if (!n) return std::unexpected(config_value_error(v, "is not a size (a whole number, optionally followed by K, M, G, T, KiB, MiB, GiB or TiB)"));
  if (*n > (max >> shift)) return std::unexpected(config_value_error(v, "is above the largest allowed, " + std::to_string(max)));
  return *n << shift;
}

template <class T>
[[nodiscard]] result<void> config_set_uint(T& field, std::string_view v, std::uint64_t max = std::numeric_limits<T>::max()) {
  auto n = config_parse_uint(v, max);
  if (!n) return std::unexpected(std::move(n.error()));
  field = static_cast<T>(*n);
  return {};
}

template <class T>
[[nodiscard]] result<void> config_set_size(T& field, std::string_view v, std::uint64_t max = std::numeric_limits<T>::max()) {
  auto n = config_parse_size(v, max);
  if (!n) return std::unexpected(std::move(n.error()));
  field = static_cast<T>(*n);
  return {};
}

[[nodiscard]] inline result<void> config_set_ms(std::chrono::milliseconds& field, std::string_view v) {
  auto n = config_parse_uint(v, static_cast<std::uint64_t>(std::numeric_limits<std::chrono::milliseconds::rep>::max()));
  if (!n) return std::unexpected(std::move(n.error()));
  field = std::chrono::milliseconds(static_cast<std::chrono::milliseconds::rep>(*n));
  return {};
}

[[nodiscard]] inline result<void> config_set_bool(bool& field, std::string_view v) {
  if (v == "true") field = true;
  else if (v == "false") field = false;
  else return std::unexpected(config_value_error(v, "is not true or false"));
  return {};
}

[[nodiscard]] inline result<void> config_set_int(int& field, std::string_view v, int min) {
  int x = 0;
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (v.empty() || ec != std::errc{} || end != v.data() + v.size() || x < min)
    return std::unexpected(config_value_error(v, "is not a whole number of at least " + std::to_string(min)));
  field = x;
  return {};
}

// One enumerator's spelling.
template <class E>
struct config_name {
  std::string_view name;
  E value;
};

template <class E, std::size_t N>
[[nodiscard]] result<void> config_set_enum(E& field, std::string_view v, const std::array<config_name<E>, N>& names) {
  for (const auto& n : names) {
    if (n.name == v) {
      field = n.value;
      return {};
    }
  }
  std::string choices;
  for (const auto& n : names) {
    if (!choices.empty()) choices += ", ";
    choices += n.name;
  }
  return std::unexpected(config_value_error(v, "is not one of " + choices));
}

template <class E, std::size_t N>
[[nodiscard]] std::string config_enum_text(E value, const std::array<config_name<E>, N>& names) {
  for (const auto& n : names)
    if (n.value == value) return std::string(n.name);
  return std::to_string(static_cast<unsigned>(value));
}

inline constexpr std::array<config_name<write_policy>, 2> write_policy_names{
    {{"write_through", write_policy::write_through}, {"write_back", write_policy::write_back}}};
inline constexpr std::array<config_name<fsync_policy>, 3> fsync_policy_names{
    {{"never", fsync_policy::never}, {"data", fsync_policy::data}, {"data_and_directory", fsync_policy::data_and_directory}}};
inline constexpr std::array<config_name<direct_io_mode>, 3> direct_io_names{
    {{"automatic", direct_io_mode::automatic}, {"on", direct_io_mode::on}, {"off", direct_io_mode::off}}};
inline constexpr std::array<config_name<directory_sharing>, 2> sharing_names{
    {{"exclusive", directory_sharing::exclusive}, {"shared", directory_sharing::shared}}};
inline constexpr std::array<config_name<disk_io_engine>, 3> io_engine_names{
    {{"automatic", disk_io_engine::automatic}, {"io_uring", disk_io_engine::io_uring}, {"posix", disk_io_engine::posix}}};
inline constexpr std::array<config_name<redis_mode>, 2> redis_mode_names{
    {{"standalone", redis_mode::standalone}, {"cluster", redis_mode::cluster}}};

// Well-formed UTF-8 (no overlong forms, surrogates or code points above U+10FFFF): what a TOML
// string can hold, so every text setting can be written back to a file.
[[nodiscard]] inline bool config_valid_utf8(std::string_view s) noexcept {
  for (std::size_t i = 0; i < s.size();) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    if (b0 < 0x80) {
      ++i;
      continue;
    }
    std::size_t n = 0;
    std::uint32_t cp = 0;
    if ((b0 & 0xE0) == 0xC0) n = 1, cp = b0 & 0x1Fu;
    else if ((b0 & 0xF0) == 0xE0) n = 2, cp = b0 & 0x0Fu;
    else if ((b0 & 0xF8) == 0xF0) n = 3, cp = b0 & 0x07u;
    else return false;
    if (s.size() - i <= n) return false;
    for (std::size_t k = 1; k <= n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3Fu);
    }
    constexpr std::uint32_t least[] = {0, 0x80, 0x800, 0x10000};
    if (cp < least[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

[[nodiscard]] inline result<void> config_set_text(std::string& field, std::string_view v) {
  if (!config_valid_utf8(v)) return fail(errc::invalid_config, "the text is not valid UTF-8");
  field = std::string(v);
  return {};
}

[[nodiscard]] inline result<void> config_set_digest(namespace_digest& field, std::string_view v) {
  if (v.size() != 2 * field.size()) return std::unexpected(config_value_error(v, "is not 64 hex digits"));
  namespace_digest d{};
  for (std::size_t i = 0; i < d.size(); ++i) {
    unsigned byte = 0;
    const auto [end, ec] = std::from_chars(v.data() + 2 * i, v.data() + 2 * i + 2, byte, 16);
    if (ec != std::errc{} || end != v.data() + 2 * i + 2) return std::unexpected(config_value_error(v, "is not 64 hex digits"));
    d[i] = static_cast<std::byte>(byte);
  }
  field = d;
  return {};
}

[[nodiscard]] inline std::string config_digest_text(const namespace_digest& d) {
  chunk_key k;
  k.bytes = d;
  return k.hex();
}

[[nodiscard]] inline result<void> config_set_servers(std::vector<redis_endpoint>& field, std::string_view v) {
  std::vector<redis_endpoint> out;
  for (std::size_t pos = 0;;) {
    const auto comma = std::min(v.size(), v.find(',', pos));
    auto item = v.substr(pos, comma - pos);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    if (item.empty()) return std::unexpected(config_value_error(v, "has an empty server entry (expected host:port,host:port)"));
    auto ep = redis_endpoint::parse(item);
    if (!ep) return std::unexpected(error{errc::invalid_config, ep.error().message});
    out.push_back(std::move(*ep));
    if (comma == v.size()) break;
    pos = comma + 1;
  }
  field = std::move(out);
  return {};
}

[[nodiscard]] inline std::string config_servers_text(const std::vector<redis_endpoint>& servers) {
  std::string s;
  for (const auto& ep : servers) {
    if (!s.empty()) s += ',';
    s += ep.text();
  }
  return s;
}

// One key of one config struct: how to set it from text and how to write it back.
template <class Config>
struct config_setting {
  std::string_view key;  // without the section prefix for disk and redis
  config_value_kind kind;
  result<void> (*set)(Config&, std::string_view);
  std::string (*get)(const Config&);
};

#define KVORTEX_CONFIG_UINT(cfg_type, key, field)                                                     \
  config_setting<cfg_type> {                                                                          \
    key, config_value_kind::number, [](cfg_type& c, std::string_view v) { return config_set_uint(c.field, v); }, \
        [](const cfg_type& c) { return std::to_string(c.field); }                                     \
  }
#define KVORTEX_CONFIG_SIZE(cfg_type, key, field)                                                     \
  config_setting<cfg_type> {                                                                          \
    key, config_value_kind::number, [](cfg_type& c, std::string_view v) { return config_set_size(c.field, v); }, \
        [](const cfg_type& c) { return std::to_string(c.field); }                                     \
  }
#define KVORTEX_CONFIG_MS(cfg_type, key, field)                                                       \
  config_setting<cfg_type> {                                                                          \
    key, config_value_kind::number, [](cfg_type& c, std::string_view v) { return config_set_ms(c.field, v); }, \
        [](const cfg_type& c) { return std::to_string(c.field.count()); }                             \
  }
#define KVORTEX_CONFIG_BOOL(cfg_type, key, field)                                                     \
  config_setting<cfg_type> {                                                                          \
    key, config_value_kind::boolean, [](cfg_type& c, std::string_view v) { return config_set_bool(c.field, v); }, \
        [](const cfg_type& c) { return std::string(c.field ? "true" : "false"); }                     \
  }
#define KVORTEX_CONFIG_TEXT(cfg_type, key, field)                                                     \
  config_setting<cfg_type> {                                                                          \
    key, config_value_kind::text, [](cfg_type& c, std::string_view v) { return config_set_text(c.field, v); }, \
        [](const cfg_type& c) { return c.field; }                                                     \
  }
#define KVORTEX_CONFIG_ENUM(cfg_type, key, field, names)                                              \
  config_setting<cfg_type> {                                                                          \
    key, config_value_kind::text, [](cfg_type& c, std::string_view v) { return config_set_enum(c.field, v, names); }, \
        [](const cfg_type& c) { return config_enum_text(c.field, names); }                            \
  }

inline constexpr std::array<config_setting<engine_config>, 26> engine_settings{{
    KVORTEX_CONFIG_SIZE(engine_config, "capacity_bytes", capacity_bytes),
    KVORTEX_CONFIG_UINT(engine_config, "chunk_tokens", chunk_tokens),
    KVORTEX_CONFIG_UINT(engine_config, "block_tokens", block_tokens),
    KVORTEX_CONFIG_BOOL(engine_config, "store_partial_chunks", store_partial_chunks),
    KVORTEX_CONFIG_UINT(engine_config, "transfer_threads", transfer_threads),
    KVORTEX_CONFIG_SIZE(engine_config, "parallel_copy_bytes", parallel_copy_bytes),
    KVORTEX_CONFIG_SIZE(engine_config, "transfer_batch_bytes", transfer_batch_bytes),
    {"numa_node", config_value_kind::number, [](engine_config& c, std::string_view v) { return config_set_int(c.numa_node, v, -1); },
     [](const engine_config& c) { return std::to_string(c.numa_node); }},
    KVORTEX_CONFIG_TEXT(engine_config, "ns.model_id", ns.model_id),
    KVORTEX_CONFIG_TEXT(engine_config, "ns.dtype", ns.dtype),
    KVORTEX_CONFIG_TEXT(engine_config, "ns.layout", ns.layout),
    KVORTEX_CONFIG_UINT(engine_config, "ns.tp_rank", ns.tp_rank),
    KVORTEX_CONFIG_UINT(engine_config, "ns.tp_size", ns.tp_size),
    KVORTEX_CONFIG_TEXT(engine_config, "ns.cache_salt", ns.cache_salt),
    KVORTEX_CONFIG_UINT(engine_config, "geometry.num_layers", geometry.num_layers),
    KVORTEX_CONFIG_UINT(engine_config, "geometry.kv_planes", geometry.kv_planes),
    KVORTEX_CONFIG_UINT(engine_config, "geometry.kv_heads", geometry.kv_heads),
    KVORTEX_CONFIG_UINT(engine_config, "geometry.head_dim", geometry.head_dim),
    KVORTEX_CONFIG_UINT(engine_config, "geometry.element_bytes", geometry.element_bytes),
    KVORTEX_CONFIG_ENUM(engine_config, "tiering.write", tiering.write, write_policy_names),
    KVORTEX_CONFIG_UINT(engine_config, "tiering.demotion_queue_chunks", tiering.demotion_queue_chunks),
    KVORTEX_CONFIG_SIZE(engine_config, "tiering.demotion_queue_bytes", tiering.demotion_queue_bytes),
    KVORTEX_CONFIG_UINT(engine_config, "tiering.tier_threads", tiering.tier_threads),
    KVORTEX_CONFIG_MS(engine_config, "tiering.promotion_timeout_ms", tiering.promotion_timeout),
    KVORTEX_CONFIG_UINT(engine_config, "tiering.promotion_batch_chunks", tiering.promotion_batch_chunks),
    KVORTEX_CONFIG_BOOL(engine_config, "tiering.drain_on_shutdown", tiering.drain_on_shutdown),
}};

inline constexpr std::array<config_setting<disk_tier_config>, 13> disk_settings{{
    KVORTEX_CONFIG_TEXT(disk_tier_config, "directory", directory),
    KVORTEX_CONFIG_SIZE(disk_tier_config, "capacity_bytes", capacity_bytes),
    {"ns", config_value_kind::text, [](disk_tier_config& c, std::string_view v) { return config_set_digest(c.ns, v); },
     [](const disk_tier_config& c) { return config_digest_text(c.ns); }},
    KVORTEX_CONFIG_ENUM(disk_tier_config, "fsync", fsync, fsync_policy_names),
    KVORTEX_CONFIG_ENUM(disk_tier_config, "direct_io", direct_io, direct_io_names),
    KVORTEX_CONFIG_ENUM(disk_tier_config, "sharing", sharing, sharing_names),
    KVORTEX_CONFIG_BOOL(disk_tier_config, "verify_on_open", verify_on_open),
    KVORTEX_CONFIG_BOOL(disk_tier_config, "index_snapshot", index_snapshot),
    KVORTEX_CONFIG_SIZE(disk_tier_config, "max_chunk_bytes", max_chunk_bytes),
    KVORTEX_CONFIG_UINT(disk_tier_config, "stale_temp_seconds", stale_temp_seconds),
    KVORTEX_CONFIG_ENUM(disk_tier_config, "io_engine", io_engine, io_engine_names),
    KVORTEX_CONFIG_SIZE(disk_tier_config, "io_request_bytes", io_request_bytes),
    KVORTEX_CONFIG_UINT(disk_tier_config, "io_queue_depth", io_queue_depth),
}};

inline constexpr std::array<config_setting<redis_tier_config>, 17> redis_settings{{
    {"servers", config_value_kind::list, [](redis_tier_config& c, std::string_view v) { return config_set_servers(c.servers, v); },
     [](const redis_tier_config& c) { return config_servers_text(c.servers); }},
    KVORTEX_CONFIG_ENUM(redis_tier_config, "mode", mode, redis_mode_names),
    KVORTEX_CONFIG_TEXT(redis_tier_config, "username", username),
    KVORTEX_CONFIG_TEXT(redis_tier_config, "password", password),
    KVORTEX_CONFIG_UINT(redis_tier_config, "database", database),
    {"ns", config_value_kind::text, [](redis_tier_config& c, std::string_view v) { return config_set_digest(c.ns, v); },
     [](const redis_tier_config& c) { return config_digest_text(c.ns); }},
    KVORTEX_CONFIG_TEXT(redis_tier_config, "key_prefix", key_prefix),
    KVORTEX_CONFIG_MS(redis_tier_config, "ttl_ms", ttl),
    KVORTEX_CONFIG_MS(redis_tier_config, "connect_timeout_ms", connect_timeout),
    KVORTEX_CONFIG_MS(redis_tier_config, "command_timeout_ms", command_timeout),
    KVORTEX_CONFIG_MS(redis_tier_config, "reconnect_backoff_min_ms", reconnect_backoff_min),
    KVORTEX_CONFIG_MS(redis_tier_config, "reconnect_backoff_max_ms", reconnect_backoff_max),
    KVORTEX_CONFIG_MS(redis_tier_config, "slot_refresh_interval_ms", slot_refresh_interval),
    KVORTEX_CONFIG_UINT(redis_tier_config, "connections_per_server", connections_per_server),
    KVORTEX_CONFIG_UINT(redis_tier_config, "max_redirects", max_redirects),
    KVORTEX_CONFIG_SIZE(redis_tier_config, "max_chunk_bytes", max_chunk_bytes),
    KVORTEX_CONFIG_BOOL(redis_tier_config, "require_connection", require_connection),
}};

#undef KVORTEX_CONFIG_UINT
#undef KVORTEX_CONFIG_SIZE
#undef KVORTEX_CONFIG_MS
#undef KVORTEX_CONFIG_BOOL
#undef KVORTEX_CONFIG_TEXT
#undef KVORTEX_CONFIG_ENUM

// Keys an operator might mean: same length and at most two letters off, or one letter added or
// dropped. Only for the error message.
[[nodiscard]] inline bool config_keys_close(std::string_view a, std::string_view b) noexcept {
  if (a.size() > b.size()) std::swap(a, b);
  if (b.size() - a.size() > 1) return false;
  if (a.size() == b.size()) {
    std::size_t diff = 0;
    for (std::size_t i = 0; i < a.size(); ++i) diff += a[i] != b[i] ? 1 : 0;
    return diff <= 2;
  }
  std::size_t i = 0;
  while (i < a.size() && a[i] == b[i]) ++i;
  return a.substr(i) == b.substr(i + 1);
}

}  // namespace detail

/// @brief Every key `apply_setting` accepts, in the order of the table above (the engine's
/// keys without the optional `engine.` prefix).
[[nodiscard]] inline std::vector<std::string> config_keys() {
  std::vector<std::string> keys;
  for (const auto& s : detail::engine_settings) keys.emplace_back(s.key);
  for (const auto& s : detail::disk_settings) keys.push_back("disk." + std::string(s.key));
  for (const auto& s : detail::redis_settings) keys.push_back("redis." + std::string(s.key));
  return keys;
}

namespace detail {

// The tables of a file, and the first word of an environment variable's key.
inline constexpr std::array<std::string_view, 6> config_sections{"engine", "geometry", "ns", "tiering", "disk", "redis"};

[[nodiscard]] inline std::unexpected<error> config_unknown_key(std::string_view key) {
  std::string msg = "unknown key " + config_quoted(key);
  std::string_view bare = key;
  if (bare.starts_with("engine.")) bare.remove_prefix(7);
  for (const auto& k : config_keys()) {
    if (config_keys_close(k, bare)) {
      msg += " (did you mean \"" + k + "\"?)";
      break;
    }
  }
  return fail(errc::invalid_config, std::move(msg));
}

}  // namespace detail

/// @brief How `key`'s value is written in a TOML file; nullopt for an unknown key.
[[nodiscard]] inline std::optional<config_value_kind> config_key_kind(std::string_view key) noexcept {
  if (key.starts_with("disk.")) {
    for (const auto& s : detail::disk_settings)
      if (s.key == key.substr(5)) return s.kind;
  } else if (key.starts_with("redis.")) {
    for (const auto& s : detail::redis_settings)
      if (s.key == key.substr(6)) return s.kind;
  } else {
    if (key.starts_with("engine.")) key.remove_prefix(7);
    for (const auto& s : detail::engine_settings)
      if (s.key == key) return s.kind;
  }
  return std::nullopt;
}

/// @brief Sets one key (see the table in the file's documentation) from its text. Fails with
/// errc::invalid_config naming the key: unknown (the message suggests a close key, if any), or a
/// value that does not parse or is out of the field's range; `cfg` is then unchanged. Setting a
/// `disk.*` or `redis.*` key creates that section (from defaults) if absent. Checks the value
/// alone; `validate` checks the fields together.
[[nodiscard]] inline result<void> apply_setting(deployment_config& cfg, std::string_view key, std::string_view value) {
  const std::string_view full = key;
  const auto wrap = [&](result<void> r) -> result<void> {
    if (r) return r;
    return fail(errc::invalid_config, "invalid value for " + detail::config_quoted(full) + ": " + r.error().message);
  };
  if (key.starts_with("disk.")) {
    for (const auto& s : detail::disk_settings) {
      if (s.key != key.substr(5)) continue;
      disk_tier_config d = cfg.disk.value_or(disk_tier_config{});
      if (auto r = wrap(s.set(d, value)); !r) return r;
      cfg.disk = std::move(d);
      return {};
    }
  } else if (key.starts_with("redis.")) {
    for (const auto& s : detail::redis_settings) {
      if (s.key != key.substr(6)) continue;
      redis_tier_config d = cfg.redis.value_or(redis_tier_config{});
      if (auto r = wrap(s.set(d, value)); !r) return r;
      cfg.redis = std::move(d);
      return {};
    }
  } else {
    if (key.starts_with("engine.")) key.remove_prefix(7);
    for (const auto& s : detail::engine_settings) {
      if (s.key != key) continue;
      engine_config e = cfg.engine;
      if (auto r = wrap(s.set(e, value)); !r) return r;
      cfg.engine = std::move(e);
      return {};
    }
  }
  return detail::config_unknown_key(full);
}

/// @brief The canonical text of `key`'s value: numbers in decimal (sizes in bytes, durations in
/// ms), bools `true`/`false`, enumerators by name, servers `host:port,...`, digests in lower-case
/// hex. Fails with errc::invalid_config for an unknown key and errc::not_found when the key's
/// section (disk, redis) is absent. `apply_setting(cfg, key, config_value(cfg, key))` leaves
/// `cfg` unchanged, except for an empty `redis.servers`, whose empty text `apply_setting` refuses.
[[nodiscard]] inline result<std::string> config_value(const deployment_config& cfg, std::string_view key) {
  const std::string_view full = key;
  const auto absent = [&] { return fail(errc::not_found, detail::config_quoted(full) + ": its section is not configured"); };
  if (key.starts_with("disk.")) {
    for (const auto& s : detail::disk_settings)
      if (s.key == key.substr(5)) return cfg.disk ? result<std::string>(s.get(*cfg.disk)) : absent();
  } else if (key.starts_with("redis.")) {
    for (const auto& s : detail::redis_settings)
      if (s.key == key.substr(6)) return cfg.redis ? result<std::string>(s.get(*cfg.redis)) : absent();
  } else {
    if (key.starts_with("engine.")) key.remove_prefix(7);
    for (const auto& s : detail::engine_settings)
      if (s.key == key) return s.get(cfg.engine);
  }
  return detail::config_unknown_key(full);
}

/// @brief Checks the whole configuration: `engine_config::validate`, then each present tier's
/// `validate()`; the error is the first one found.
[[nodiscard]] inline result<void> validate(const deployment_config& cfg) {
  if (auto r = cfg.engine.validate(); !r) return r;
  if (cfg.disk)
    if (auto r = cfg.disk->validate(); !r) return r;
  if (cfg.redis)
    if (auto r = cfg.redis->validate(); !r) return r;
  return {};
}

namespace detail {

// TOML basic string: quotes, backslashes and control characters escaped.
[[nodiscard]] inline std::string config_toml_string(std::string_view s) {
  std::string out = "\"";
  for (const char ch : s) {
    const auto u = static_cast<unsigned char>(ch);
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (u < 0x20 || u == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04X", u);
      out += buf;
    } else {
      out += ch;
    }
  }
  out += '"';
  return out;
}

template <class Config, std::size_t N>
void config_write_section(std::string& out, std::string_view table, std::string_view strip,
                          const std::array<config_setting<Config>, N>& settings, const Config& c) {
  out += '[';
  out += table;
  out += "]\n";
  for (const auto& s : settings) {
    std::string_view name = s.key;
    if (!strip.empty()) {
      if (!name.starts_with(strip)) continue;
      name.remove_prefix(strip.size());
    } else if (name.find('.') != std::string_view::npos) {
      continue;  // belongs to a sub-table
    }
    const std::string v = s.get(c);
    if (s.kind == config_value_kind::list && v.empty()) continue;  // an empty list is the default, and not a value
    out += name;
    out += " = ";
    if (s.kind == config_value_kind::number && v.size() < 19) out += v;  // fits a TOML integer
    else if (s.kind == config_value_kind::boolean) out += v;
    else out += config_toml_string(v);
    out += '\n';
  }
  out += '\n';
}

}  // namespace detail

/// @brief The configuration as a TOML document that `apply_config_text` reads back to an equal
/// configuration: every key of the engine and of each present tier, defaults included (the Redis
/// password too: treat the text as a secret when one is set).
[[nodiscard]] inline std::string to_config_text(const deployment_config& cfg) {
  std::string out;
  detail::config_write_section(out, "engine", "", detail::engine_settings, cfg.engine);
  detail::config_write_section(out, "ns", "ns.", detail::engine_settings, cfg.engine);
  detail::config_write_section(out, "geometry", "geometry.", detail::engine_settings, cfg.engine);
  detail::config_write_section(out, "tiering", "tiering.", detail::engine_settings, cfg.engine);
  if (cfg.disk) detail::config_write_section(out, "disk", "", detail::disk_settings, *cfg.disk);
  if (cfg.redis) detail::config_write_section(out, "redis", "", detail::redis_settings, *cfg.redis);
  return out;
}

#if defined(KVORTEX_HAS_TOMLPLUSPLUS) && KVORTEX_HAS_TOMLPLUSPLUS

namespace detail {

// toml++ 3.3 (Debian 12) has inputs on which it breaks its own assumptions: after a table
// header's '[' (or "[[") it enters its key parser without checking that a key starts there
// ("[&", "[[[1]]]": an assertion, or with NDEBUG a broken __builtin_assume; upstream issue
// #294), and its whitespace test reaches __builtin_unreachable on some non-ASCII code points
// (issue #295: outside strings; issue #190: after a backslash, and the whitespace after it,
// in a multi-line basic string). Both were fixed after 3.3. This scan follows just enough of TOML (strings, comments,
// brackets of values) to refuse those inputs first, all of them invalid TOML but the last.
struct config_toml_flaw {
  std::size_t line;
  std::string_view what;
};

[[nodiscard]] inline std::optional<config_toml_flaw> config_toml_precheck(std::string_view t) noexcept {
  std::size_t line = 1, depth = 0;
  bool line_start = true, header = false;
  char prev = '\n';  // the last character outside strings and comments, whitespace aside
  const auto bare = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
  };
  const auto ascii = [](char c) { return static_cast<unsigned char>(c) < 0x80; };
  for (std::size_t i = 0; i < t.size(); ++i) {
    const char c = t[i];
    if (c == '\n') {
      ++line;
      line_start = true;
      header = false;
      continue;
    }
    if (c == ' ' || c == '\t') continue;
    const bool first = std::exchange(line_start, false);
    if (c == '#') {  // a comment, to the end of the line
      while (i + 1 < t.size() && t[i + 1] != '\n') ++i;
      continue;
    }
    // A quote opens a string only where TOML has a key or a value start; toml++ reads any other
    // one as a stray character, and the bytes after it as outside a string.
    if ((c == '"' || c == '\'') && ((first && depth == 0) || std::string_view("=[{,.").find(prev) != std::string_view::npos)) {
      prev = c;
      const bool multi = i + 2 < t.size() && t[i + 1] == c && t[i + 2] == c;
      i += multi ? 3 : 1;
      for (; i < t.size(); ++i) {
        if (t[i] == '\n') {
          if (!multi) break;  // an unterminated string: toml++ reports it
          ++line;
        } else if (c == '"' && t[i] == '\\') {
          if (multi) {  // toml++ tests what follows a backslash, and any whitespace after it, for whitespace
            std::size_t j = i + 1, newlines = 0;
            while (j < t.size() && (t[j] == ' ' || t[j] == '\t' || t[j] == '\r' || t[j] == '\n')) newlines += t[j++] == '\n' ? 1 : 0;
            if (j < t.size() && !ascii(t[j]))
              return config_toml_flaw{line + newlines, "a non-ASCII character right after a backslash in a multi-line string"};
            if (newlines != 0) {  // a line-ending backslash: the whitespace is trimmed
              line += newlines;
              i = j - 1;
              continue;
            }
          }
          if (i + 1 < t.size() && t[i + 1] == '\n') continue;  // let the newline be counted
          ++i;
        } else if (t[i] == c && (!multi || (i + 2 < t.size() && t[i + 1] == c && t[i + 2] == c))) {
          if (multi) {
            i += 2;
            while (i + 1 < t.size() && t[i + 1] == c) ++i;  // up to two quotes may end the content
          }
          break;
        }
      }
      if (i < t.size() && t[i] == '\n') --i;  // let the loop count it
      continue;
    }
    if (!ascii(c)) return config_toml_flaw{line, "a non-ASCII character outside a string or a comment"};
    prev = c;
    if (header) continue;
    if (c == '[' && first && depth == 0) {
      std::size_t j = i + 1;
      if (j < t.size() && t[j] == '[') ++j;
      while (j < t.size() && (t[j] == ' ' || t[j] == '\t')) ++j;
      if (j < t.size() && !bare(t[j]) && t[j] != '"' && t[j] != '\'' && t[j] != ']')
        return config_toml_flaw{line, "invalid table header: expected a key after '['"};
      header = true;
      continue;
    }
    if (c == '[' || c == '{') ++depth;
    else if ((c == ']' || c == '}') && depth > 0) --depth;
  }
  return std::nullopt;
}

[[nodiscard]] inline std::string config_where(std::string_view source, const toml::node& n) {
  const auto& pos = n.source().begin;
  return std::string(source) + ":" + std::to_string(pos.line) + ": ";
}

[[nodiscard]] inline std::string_view config_toml_type(toml::node_type t) noexcept {
  switch (t) {
    case toml::node_type::table: return "a table";
    case toml::node_type::array: return "an array";
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a float";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::date: return "a date";
    case toml::node_type::time: return "a time";
    case toml::node_type::date_time: return "a date-time";
    default: return "an unknown value";
  }
}

[[nodiscard]] inline result<void> config_apply_table(deployment_config& cfg, const toml::table& table, const std::string& prefix,
                                                     std::string_view source) {
  for (auto&& [k, node] : table) {
    const std::string key = prefix + std::string(k.str());
    const std::string where = config_where(source, node);
    if (const auto* sub = node.as_table()) {
      if (prefix.empty() && (k.str() == "disk" || k.str() == "redis")) {
        if (k.str() == "disk" && !cfg.disk) cfg.disk.emplace();
        if (k.str() == "redis" && !cfg.redis) cfg.redis.emplace();
      }
      const bool section = prefix.empty() && std::find(config_sections.begin(), config_sections.end(), k.str()) != config_sections.end();
      if (!section && !(prefix == "engine." && (k.str() == "geometry" || k.str() == "ns" || k.str() == "tiering"))) {
        return fail(errc::invalid_config, where + "unknown key \"" + key + "\" (a table)");
      }
      if (auto r = config_apply_table(cfg, *sub, key + ".", source); !r) return r;
      continue;
    }
    const auto kind = config_key_kind(key);
    if (!kind) {
      return fail(errc::invalid_config, where + config_unknown_key(key).error().message);
    }
    std::string text;
    const auto wrong = [&] {
      std::string_view want = *kind == config_value_kind::text      ? "a string"
                              : *kind == config_value_kind::boolean ? "a boolean"
                              : *kind == config_value_kind::number  ? "an integer or a string"
                                                                    : "a string or an array of strings";
      return fail(errc::invalid_config, where + "invalid value for \"" + key + "\": expected " + std::string(want) + ", got " +
                                            std::string(config_toml_type(node.type())));
    };
    if (const auto* s = node.as_string()) {
      if (*kind == config_value_kind::boolean) return wrong();
      text = s->get();
    } else if (const auto* i = node.as_integer()) {
      if (*kind != config_value_kind::number) return wrong();
      text = std::to_string(i->get());
    } else if (const auto* b = node.as_boolean()) {
      if (*kind != config_value_kind::boolean) return wrong();
      text = b->get() ? "true" : "false";
    } else if (const auto* a = node.as_array(); a != nullptr && *kind == config_value_kind::list) {
      if (a->empty()) return fail(errc::invalid_config, where + "invalid value for \"" + key + "\": empty array");
      for (const auto& item : *a) {
        const auto* s = item.as_string();
        if (s == nullptr) return wrong();
        if (!text.empty()) text += ',';
        text += s->get();
      }
    } else {
      return wrong();
    }
    if (auto r = apply_setting(cfg, key, text); !r) return fail(errc::invalid_config, where + r.error().message);
  }
  return {};
}

}  // namespace detail

#endif

/// @brief Applies a TOML document's settings onto `cfg` (no validation: later settings, e.g. from
/// the environment, may complete it). `source` names the document in errors, which read
/// `<source>:<line>: ...` and name the key. Fails with errc::invalid_config for a syntax error,
/// an unknown table or key, or a bad value (`cfg` may then hold the settings before it), and with
/// errc::unsupported in a build without toml++.
[[nodiscard]] inline result<void> apply_config_text(deployment_config& cfg, std::string_view toml_text, std::string_view source = "config") {
#if defined(KVORTEX_HAS_TOMLPLUSPLUS) && KVORTEX_HAS_TOMLPLUSPLUS
  if (const auto flaw = detail::config_toml_precheck(toml_text))
    return fail(errc::invalid_config, std::string(source) + ":" + std::to_string(flaw->line) + ": " + std::string(flaw->what));
  try {
#if TOML_EXCEPTIONS
    toml::table table;
    try {
      table = toml::parse(toml_text, source);
    } catch (const toml::parse_error& e) {
      return fail(errc::invalid_config, std::string(source) + ":" + std::to_string(e.source().begin.line) + ": " +
                                            std::string(e.description()));
    }
#else
    toml::parse_result parsed = toml::parse(toml_text, source);
    if (!parsed) {
      return fail(errc::invalid_config, std::string(source) + ":" + std::to_string(parsed.error().source().begin.line) + ": " +
                                            std::string(parsed.error().description()));
    }
    const toml::table& table = parsed.table();
#endif
    return detail::config_apply_table(cfg, table, "", source);
  } catch (const std::exception& e) {
    return fail(errc::invalid_config, std::string(source) + ": " + e.what());
  } catch (...) {
    return fail(errc::internal, std::string(source) + ": unexpected exception while reading the configuration");
  }
#else
  (void)cfg;
  (void)toml_text;
  return fail(errc::unsupported, std::string(source) + ": reading TOML needs toml++ (Debian: apt-get install libtomlplusplus-dev)");
#endif
}

/// @brief Reads the TOML file at `path` (at most 16 MiB) and applies it onto `cfg` like
/// `apply_config_text`, errors reading `<path>:<line>: ...`. Fails with errc::invalid_argument
/// when the file cannot be read.
[[nodiscard]] inline result<void> apply_config_file(deployment_config& cfg, const std::string& path) {
#if defined(KVORTEX_HAS_TOMLPLUSPLUS) && KVORTEX_HAS_TOMLPLUSPLUS
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return fail(errc::invalid_argument, path + ": cannot open: " + std::strerror(errno));
  std::string text;
  constexpr std::size_t limit = std::size_t{16} << 20;
  char buf[65536];
  bool too_large = false;
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) {
    if (text.size() + n > limit) {
      too_large = true;
      break;
    }
    text.append(buf, n);
  }
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) return fail(errc::invalid_argument, path + ": read error");
  if (too_large) return fail(errc::invalid_argument, path + ": larger than 16 MiB");
  return apply_config_text(cfg, text, path);
#else
  (void)cfg;
  return fail(errc::unsupported, path + ": reading TOML needs toml++ (Debian: apt-get install libtomlplusplus-dev)");
#endif
}

/// @brief Defaults, then the TOML file at `path`, then `validate`.
[[nodiscard]] inline result<deployment_config> load_config_file(const std::string& path) {
  deployment_config cfg;
  if (auto r = apply_config_file(cfg, path); !r) return std::unexpected(std::move(r.error()));
  if (auto r = validate(cfg); !r) return std::unexpected(error{r.error().code, path + ": " + r.error().message});
  return cfg;
}

/// @brief `<prefix>` variables that are not configuration keys and are left alone: the NVRTC
/// kernel cache directory the library reads itself, and the variables of this project's test,
/// fuzz and benchmark tools.
inline constexpr std::array<std::string_view, 10> config_env_reserved{
    "CACHE_DIR",  "STRESS_SECONDS", "FUZZ_SECONDS",     "FUZZ_AVOID",     "FUZZ_TRACE",
    "BENCH_DIR",  "REDIS_SERVER",   "CONSUMER_WORKDIR", "TSAN_BUILD_DIR", "CMAKE_ARGS"};

/// @brief Applies every `NAME=value` entry of `environment` whose NAME starts with `prefix` (an
/// empty prefix: none) onto `cfg`: the rest of NAME, lower-cased, names the key, its first '_'
/// after a section name (engine, geometry, ns, tiering, disk, redis) read as '.'
/// (`KVORTEX_DISK_IO_ENGINE` sets `disk.io_engine`). Names in `config_env_reserved` are skipped.
/// Fails with errc::invalid_config naming the variable for an unknown key or a bad value; no
/// validation.
[[nodiscard]] inline result<void> apply_config_env(deployment_config& cfg, std::span<const char* const> environment,
                                                   std::string_view prefix = "KVORTEX_") {
  if (prefix.empty()) return {};
  for (const char* entry : environment) {
    if (entry == nullptr) continue;
    const std::string_view e(entry);
    if (!e.starts_with(prefix)) continue;
    const auto eq = e.find('=');
    if (eq == std::string_view::npos) continue;
    const auto name = e.substr(0, eq);
    const auto rest = name.substr(prefix.size());
    if (std::find(config_env_reserved.begin(), config_env_reserved.end(), rest) != config_env_reserved.end()) continue;
    std::string key(rest);
    for (auto& ch : key) ch = (ch >= 'A' && ch <= 'Z') ? static_cast<char>(ch - 'A' + 'a') : ch;
    for (const auto section : detail::config_sections) {
      if (key.size() > section.size() && key.starts_with(section) && key[section.size()] == '_') {
        key[section.size()] = '.';
        if (section == "engine") {  // engine's own sub-sections: KVORTEX_ENGINE_GEOMETRY_NUM_LAYERS
          for (const auto sub : {std::string_view("geometry"), std::string_view("ns"), std::string_view("tiering")}) {
            const auto at = section.size() + 1;
            if (key.size() > at + sub.size() && key.compare(at, sub.size(), sub) == 0 && key[at + sub.size()] == '_')
              key[at + sub.size()] = '.';
          }
        }
        break;
      }
    }
    if (auto r = apply_setting(cfg, key, e.substr(eq + 1)); !r)
      return fail(errc::invalid_config, "environment variable " + std::string(name) + ": " + r.error().message);
  }
  return {};
}

/// @brief `apply_config_env` over the given environment, then `validate(cfg)`.
[[nodiscard]] inline result<void> load_config_env(deployment_config& cfg, std::span<const char* const> environment,
                                                  const char* prefix = "KVORTEX_") {
  if (auto r = apply_config_env(cfg, environment, prefix == nullptr ? "" : prefix); !r) return r;
  return validate(cfg);
}

/// @brief `apply_config_env` over this process's environment, then `validate(cfg)`. Not safe
/// against a concurrent `setenv`.
[[nodiscard]] inline result<void> load_config_env(deployment_config& cfg, const char* prefix = "KVORTEX_") {
  std::size_t n = 0;
  if (environ != nullptr)
    while (environ[n] != nullptr) ++n;
  return load_config_env(cfg, std::span<const char* const>(environ, n), prefix);
}

/// @brief Defaults, then the TOML file at `path` (skipped when empty), then this process's
/// `prefix` environment variables over it, then `validate`.
[[nodiscard]] inline result<deployment_config> load_config(const std::string& path, const char* prefix = "KVORTEX_") {
  deployment_config cfg;
  if (!path.empty())
    if (auto r = apply_config_file(cfg, path); !r) return std::unexpected(std::move(r.error()));
  if (auto r = load_config_env(cfg, prefix); !r) return std::unexpected(std::move(r.error()));
  return cfg;
}

}  // namespace kvortex
