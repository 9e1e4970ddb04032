// lookup_server / lookup_client: prefix lookups across processes' sockets, reduced to the minimum.

#include <doctest/doctest.h>

#include "test_support.hpp"
#include "tier_support.hpp"

#include <kvortex/lookup_client.hpp>
#include <kvortex/lookup_server.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string_view>
#include <thread>

#include <sys/stat.h>
#include <unistd.h>

using namespace kvortex;
using namespace std::chrono_literals;

namespace {

struct temp_dir {
  std::filesystem::path p;
  temp_dir() {
    char t[] = "/tmp/kvortex-lookup-XXXXXX";
    p = ::mkdtemp(t);
  }
  ~temp_dir() { std::filesystem::remove_all(p); }
  std::string sock(std::string_view name) const { return (p / name).string(); }
};

lookup_server serve(host_engine& e, const std::string& path) {
  return lookup_server::start({.path = path},
                              [&e](std::span<const token_id> t, key_salt s) { return e.lookup(t, s); })
      .value();
}

std::size_t ask(lookup_client& c, std::span<const token_id> t, key_salt s = {}) {
  const auto id = c.send(t, s).value();
  auto r = c.poll(id, 2s).value();
  REQUIRE(r.has_value());
  return *r;
}

key_salt salt_of(std::string_view s) { return std::as_bytes(std::span(s.data(), s.size())); }

}  // namespace

TEST_CASE("lookup service: the client gets the minimum hit over its servers, salts included") {
  temp_dir dir;
  const auto cfg = kvt::small_config();
  auto e0 = host_engine::create(cfg).value();
  auto e1 = host_engine::create(cfg).value();
  const auto tokens = kvt::make_tokens(128, 4);
  kvt::paged_cache cache(cfg.geometry, 16, cfg.block_tokens);
  cache.fill(tokens, {});
  REQUIRE(e0.store(tokens, cache.layout()).value().wait().value() == 128);
  REQUIRE(e1.store(std::span(tokens).first(64), cache.layout()).value().wait().value() == 64);
  REQUIRE(e1.store(tokens, cache.layout(), {}, {}, salt_of("s")).value().wait().value() == 128);
  REQUIRE(e0.store(tokens, cache.layout(), {}, {}, salt_of("s")).value().wait().value() == 128);

  auto s0 = serve(e0, dir.sock("r0"));
  auto s1 = serve(e1, dir.sock("r1"));
  struct stat sb{};
  REQUIRE(::stat(dir.sock("r0").c_str(), &sb) == 0);
  CHECK((sb.st_mode & 0777) == 0600);

  auto c = lookup_client::create({.paths = {dir.sock("r0"), dir.sock("r1")}}).value();
  CHECK(ask(c, tokens) == 64);
  CHECK(ask(c, tokens, salt_of("s")) == 128);
  CHECK(ask(c, tokens, salt_of("t")) == 0);
  auto one = lookup_client::create({.paths = {dir.sock("r0")}}).value();
  CHECK(ask(one, tokens) == 128);

  // Several queries in flight are answered in any poll order.
  const auto a = c.send(tokens).value();
  const auto b = c.send(std::span(tokens).first(32)).value();
  CHECK(c.pending_queries() == 2);
  CHECK(c.poll(b, 2s).value() == std::optional<std::size_t>(32));
  CHECK(c.poll(a, 2s).value() == std::optional<std::size_t>(64));
  CHECK(c.poll(a).error().code == errc::not_found);
  CHECK(c.send({}).error().code == errc::invalid_argument);
  CHECK(s0.stats().queries >= 5);
}

TEST_CASE("lookup service: a server that is down answers 0 until it is back") {
  temp_dir dir;
  const auto cfg = kvt::small_config();
  auto e = host_engine::create(cfg).value();
  const auto tokens = kvt::make_tokens(64, 5);
  REQUIRE(kvt::store_prompt(e, tokens) == 64);

  auto c = lookup_client::create({.paths = {dir.sock("a")}, .reconnect_backoff = 50ms}).value();
  CHECK(ask(c, tokens) == 0);  // nobody listens yet
  auto s = serve(e, dir.sock("a"));
  std::this_thread::sleep_for(60ms);
  CHECK(ask(c, tokens) == 64);
  s.stop();
  CHECK_FALSE(std::filesystem::exists(dir.sock("a")));
  CHECK(ask(c, tokens) == 0);  // the connection is gone
  auto again = serve(e, dir.sock("a"));
  std::this_thread::sleep_for(60ms);
  CHECK(ask(c, tokens) == 64);
  CHECK(c.stats().reconnects == 2);
  CHECK(c.stats().unreachable >= 2);
}

TEST_CASE("lookup service: malformed and oversized queries close only their own connection") {
  temp_dir dir;
  const auto cfg = kvt::small_config();
  auto e = host_engine::create(cfg).value();
  const auto tokens = kvt::make_tokens(64, 6);
  REQUIRE(kvt::store_prompt(e, tokens) == 64);
  auto s = lookup_server::start({.path = dir.sock("m"), .max_tokens = 1000},
                                [&e](std::span<const token_id> t, key_salt k) { return e.lookup(t, k); })
               .value();
  auto good = lookup_client::create({.paths = {dir.sock("m")}}).value();
  CHECK(ask(good, tokens) == 64);

  const auto raw_send = [&](std::span<const std::byte> bytes) {
    detail::unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    auto a = detail::unix_address(dir.sock("m")).value();
    REQUIRE(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::send(fd.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
    // The server closes the connection: recv sees end of file (or a reset), never a reply.
    std::byte b[64];
    pollfd p{fd.get(), POLLIN, 0};
    REQUIRE(::poll(&p, 1, 2000) == 1);
    CHECK(::recv(fd.get(), b, sizeof b, 0) <= 0);
  };
  std::vector<std::byte> junk(100, std::byte{0x41});
  raw_send(junk);
  detail::lookup_query_header h{detail::lookup_query_magic, detail::lookup_wire_version, 0, 1, 0, 5000};
  raw_send(std::as_bytes(std::span(&h, 1)));  // more tokens than max_tokens
  h.tokens = 0;
  raw_send(std::as_bytes(std::span(&h, 1)));  // an empty prompt
  h.tokens = 4;
  h.salt_bytes = 1 << 20;
  raw_send(std::as_bytes(std::span(&h, 1)));  // salt over max_salt_bytes
  CHECK(s.stats().rejected_frames == 4);
  CHECK(ask(good, tokens) == 64);  // the well-behaved connection was never touched

  // An error status from the lookup (a stopped engine) is an answer of 0, counted.
  e.shutdown();
  CHECK(ask(good, tokens) == 0);
  CHECK(s.stats().failed_lookups == 1);
}

TEST_CASE("lookup service: socket paths are checked, live ones kept, stale ones replaced") {
  temp_dir dir;
  auto e = host_engine::create(kvt::small_config()).value();
  const auto fn = [&e](std::span<const token_id> t, key_salt k) { return e.lookup(t, k); };
  CHECK(lookup_server::start({.path = ""}, fn).error().code == errc::invalid_argument);
  CHECK(lookup_server::start({.path = std::string(200, 'x')}, fn).error().code == errc::invalid_argument);
  CHECK(lookup_server::start({.path = dir.sock("n")}, {}).error().code == errc::invalid_argument);
  { std::ofstream(dir.sock("file")) << "keep me"; }
  CHECK(lookup_server::start({.path = dir.sock("file")}, fn).error().code == errc::invalid_argument);
  CHECK(std::filesystem::exists(dir.sock("file")));

  auto live = lookup_server::start({.path = dir.sock("live")}, fn).value();
  auto second = lookup_server::start({.path = dir.sock("live")}, fn);
  REQUIRE_FALSE(second.has_value());
  CHECK(second.error().message.find("in use") != std::string::npos);
  CHECK(live.running());

  // A socket file nobody listens on (a crashed server's) is replaced.
  {
    detail::unique_fd fd(::socket(AF_UNIX, SOCK_STREAM, 0));
    auto a = detail::unix_address(dir.sock("stale")).value();
    REQUIRE(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&a), sizeof a) == 0);
  }
  auto replaced = lookup_server::start({.path = dir.sock("stale")}, fn);
  CHECK(replaced.has_value());
  CHECK(lookup_client::create({.paths = {}}).error().code == errc::invalid_argument);
}

TEST_CASE("lookup service: connections beyond max_clients are refused, the others served") {
  temp_dir dir;
  auto e = host_engine::create(kvt::small_config()).value();
  const auto tokens = kvt::make_tokens(32, 7);
  auto s = lookup_server::start({.path = dir.sock("c"), .max_clients = 1},
                                [&e](std::span<const token_id> t, key_salt k) { return e.lookup(t, k); })
               .value();
  auto first = lookup_client::create({.paths = {dir.sock("c")}}).value();
  CHECK(ask(first, tokens) == 0);
  auto second = lookup_client::create({.paths = {dir.sock("c")}}).value();
  const auto id = second.send(tokens).value();
  CHECK(second.poll(id, 2s).value() == std::optional<std::size_t>(0));  // closed: taken as 0
  CHECK(s.stats().clients_refused == 1);
  CHECK(ask(first, tokens) == 0);
  CHECK(s.stats().clients_accepted == 1);
}
