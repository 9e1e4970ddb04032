// The Redis tier against real redis-server processes (tests/redis_support.hpp): one server,
// independent shards, and a 3-master Redis Cluster (with replicas for the failover cases), each
// started on free loopback ports in a temporary directory and killed when its test ends. Faults
// are real: SIGKILL and restart, SIGSTOP/SIGCONT, maxmemory, ACL users, slot migration, manual and
// automatic failover, and a fake server that answers with broken protocol.

#include <doctest/doctest.h>

#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "redis_support.hpp"

#include "kvortex/concepts/storage_tier.hpp"
#include "kvortex/detail/chunk_record.hpp"
#include "kvortex/detail/redis_connection.hpp"
#include "kvortex/detail/redis_protocol.hpp"
#include "kvortex/logging.hpp"
#include "kvortex/tiers/redis_tier.hpp"

using namespace std::chrono_literals;
using kvortex::chunk_key;
using kvortex::errc;
using kvortex::redis_endpoint;
using kvortex::redis_mode;
using kvortex::redis_tier;
using kvortex::redis_tier_config;
namespace kd = kvortex::detail;

static_assert(kvortex::storage_tier<redis_tier>);

namespace {

using steady = std::chrono::steady_clock;

std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

chunk_key key(std::uint64_t id, std::uint64_t salt = 0) {
  chunk_key k;
  for (std::size_t i = 0; i < 4; ++i) {
    const std::uint64_t v = mix((id * 4 + i) ^ (salt << 48));
    std::memcpy(k.bytes.data() + 8 * i, &v, 8);
  }
  return k;
}

kvortex::namespace_digest digest(std::uint8_t seed) {
  kvortex::namespace_digest d;
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<std::byte>(seed * 37 + i * 11 + 1);
  return d;
}

// Self-describing payload: bytes 0-7 the id, 8-15 the version, the rest derived from both, so
// any bytes a tier returns are checked against the id alone.
std::vector<std::byte> payload(std::uint64_t id, std::size_t n, std::uint64_t version = 0) {
  std::vector<std::byte> v(n);
  std::array<std::byte, 16> head{};
  std::memcpy(head.data(), &id, 8);
  std::memcpy(head.data() + 8, &version, 8);
  std::uint64_t s = mix(id ^ (version << 32) ^ n);
  for (std::size_t i = 0; i < n; ++i) {
    if (i < head.size()) {
      v[i] = head[i];
    } else {
      if (i % 8 == 0) s = mix(s);
      v[i] = static_cast<std::byte>(s >> (8 * (i % 8)));
    }
  }
  return v;
}

bool payload_ok(std::span<const std::byte> p, std::uint64_t id) {
  std::uint64_t got = id, version = 0;
  if (p.size() >= 16) {
    std::memcpy(&got, p.data(), 8);
    std::memcpy(&version, p.data() + 8, 8);
  }
  if (got != id) return false;
  const auto want = payload(id, p.size(), version);
  return std::memcmp(want.data(), p.data(), p.size()) == 0;
}

// Installs a sink that keeps every record (rate limit off unless a test sets one) for the
// test's duration, and leaves logging silent again afterwards.
struct log_capture {
  struct record {
    kvortex::log_level level;
    std::string event, message;
    std::uint64_t suppressed;
  };
  mutable std::mutex mu;
  std::vector<record> records;

  log_capture() {
    kvortex::set_log_rate_limit(0, 0ms);
    kvortex::set_log_sink(
        [this](const kvortex::log_record& r) {
          if (r.component != "redis") return;
          std::lock_guard lk(mu);
          records.push_back({r.level, std::string(r.event), std::string(r.message), r.suppressed});
        },
        kvortex::log_level::debug);
  }
  ~log_capture() {
    kvortex::set_log_sink({});
    kvortex::set_log_rate_limit(5, 10'000ms);
  }
  log_capture(const log_capture&) = delete;
  log_capture& operator=(const log_capture&) = delete;

  std::vector<record> of(std::string_view event) const {
    std::lock_guard lk(mu);
    std::vector<record> out;
    for (const auto& r : records)
      if (r.event == event) out.push_back(r);
    return out;
  }
  std::size_t count(std::string_view event) const { return of(event).size(); }
};

redis_tier_config config(std::vector<redis_endpoint> servers, redis_mode mode = redis_mode::standalone) {
  redis_tier_config c;
  c.servers = std::move(servers);
  c.mode = mode;
  c.ns = digest(1);
  c.connect_timeout = 500ms;
  c.command_timeout = 1000ms;
  return c;
}

redis_tier open_tier(const redis_tier_config& c) {
  auto t = redis_tier::open(c);
  REQUIRE_MESSAGE(t.has_value(), (t ? std::string() : t.error().what()));
  return std::move(*t);
}

template <class F>
std::chrono::milliseconds time_of(F&& f) {
  const auto t0 = steady::now();
  f();
  return std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0);
}

std::string as_string(std::span<const std::byte> b) { return std::string(reinterpret_cast<const char*>(b.data()), b.size()); }

bool contains_text(const std::string& hay, const std::string& needle) { return hay.find(needle) != std::string::npos; }

long long exists(const kvr::admin_client& a, const std::string& k) {
  auto r = a.command({"EXISTS", k});
  return r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
}

// Writes and reads back one chunk; true when the bytes come back exactly (else says why).
bool round_trip(redis_tier& t, std::uint64_t id, std::size_t n = 1000) {
  const auto p = payload(id, n, 7);
  if (const auto w = t.put(key(id), p); !w) {
    MESSAGE("put failed: " << w.error().what());
    return false;
  }
  std::vector<std::byte> out(n);
  const auto r = t.get(key(id), out);
  if (!r) MESSAGE("get failed: " << r.error().what());
  return r && *r == n && out == p;
}

// Retries `f` every 50 ms until it returns true or `limit` passes.
bool eventually(const std::function<bool()>& f, std::chrono::milliseconds limit) {
  const auto until = steady::now() + limit;
  while (steady::now() < until) {
    if (f()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return f();
}

// A TCP server on a loopback port that answers every read with a fixed byte string (or never),
// standing in for a broken or hung Redis.
class fake_server {
 public:
  explicit fake_server(std::string answer, bool accept_connections = true)
      : answer_(std::move(answer)), accept_(accept_connections) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    const int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    socklen_t len = sizeof a;
    REQUIRE(::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0);
    port_ = ntohs(a.sin_port);
    REQUIRE(::listen(fd_, 64) == 0);
    if (accept_) thread_ = std::thread([this] { serve(); });
  }
  fake_server(const fake_server&) = delete;
  fake_server& operator=(const fake_server&) = delete;
  ~fake_server() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    for (const int c : clients_) ::close(c);
    ::close(fd_);
  }
  [[nodiscard]] redis_endpoint endpoint() const { return {"127.0.0.1", static_cast<std::uint16_t>(port_)}; }

 private:
  void serve() {
    while (!stop_) {
      std::vector<pollfd> fds{{fd_, POLLIN, 0}};
      for (const int c : clients_) fds.push_back({c, POLLIN, 0});
      if (::poll(fds.data(), fds.size(), 20) <= 0) continue;
      if ((fds[0].revents & POLLIN) != 0) {
        const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c >= 0) clients_.push_back(c);
      }
      for (std::size_t i = 1; i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        char buf[65536];
        const ssize_t n = ::recv(fds[i].fd, buf, sizeof buf, 0);
        if (n <= 0) continue;
        if (!answer_.empty()) (void)!::send(fds[i].fd, answer_.data(), answer_.size(), MSG_NOSIGNAL);
      }
    }
  }

  std::string answer_;
  bool accept_;
  int fd_{-1};
  int port_{0};
  std::atomic<bool> stop_{false};
  std::vector<int> clients_;
  std::thread thread_;
};

// A reply_sink_source that hands out one fixed sink for every top-level reply.
struct fixed_sink final : kd::reply_sink_source {
  kd::reply_sink sink;
  [[nodiscard]] const kd::reply_sink* next_sink() const noexcept override { return &sink; }
};

std::vector<std::unique_ptr<kd::resp_reply>> parse_all(kd::resp_reader& r, const std::string& bytes, std::size_t piece) {
  std::vector<std::unique_ptr<kd::resp_reply>> out;
  for (std::size_t at = 0; at < bytes.size(); at += piece) {
    REQUIRE(r.feed(bytes.data() + at, std::min(piece, bytes.size() - at)));
    for (;;) {
      std::unique_ptr<kd::resp_reply> one;
      REQUIRE(r.next(one));
      if (!one) break;
      out.push_back(std::move(one));
    }
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Without a server
// ---------------------------------------------------------------------------------------------

TEST_CASE("redis tier: configuration is validated, and endpoints parse") {
  const auto base = [] { return config({{"127.0.0.1", 6379}}); };
  REQUIRE(base().validate().has_value());

  struct bad_case {
    const char* field;
    std::function<void(redis_tier_config&)> change;
  };
  const std::vector<bad_case> cases = {
      {"servers is empty", [](auto& c) { c.servers.clear(); }},
      {"servers[0].host", [](auto& c) { c.servers[0].host.clear(); }},
      {"servers[0].port", [](auto& c) { c.servers[0].port = 0; }},
      {"servers[1] repeats servers[0]", [](auto& c) { c.servers.push_back(c.servers[0]); }},
      {"mode", [](auto& c) { c.mode = static_cast<redis_mode>(9); }},
      {"database", [](auto& c) { c.mode = redis_mode::cluster; c.database = 2; }},
      {"key_prefix", [](auto& c) { c.key_prefix = "a{b"; }},
      {"key_prefix", [](auto& c) { c.key_prefix = std::string(300, 'x'); }},
      {"ttl", [](auto& c) { c.ttl = -1ms; }},
      {"connect_timeout", [](auto& c) { c.connect_timeout = 0ms; }},
      {"command_timeout", [](auto& c) { c.command_timeout = 0ms; }},
      {"command_timeout", [](auto& c) { c.command_timeout = std::chrono::hours(2); }},
      {"reconnect_backoff_min", [](auto& c) { c.reconnect_backoff_min = 0ms; }},
      {"reconnect_backoff_max", [](auto& c) { c.reconnect_backoff_max = c.reconnect_backoff_min - 1ms; }},
      {"slot_refresh_interval", [](auto& c) { c.slot_refresh_interval = -1ms; }},
      {"connections_per_server", [](auto& c) { c.connections_per_server = 0; }},
      {"max_redirects", [](auto& c) { c.max_redirects = 0; }},
      {"max_redirects", [](auto& c) { c.max_redirects = 17; }},
      {"max_chunk_bytes", [](auto& c) { c.max_chunk_bytes = 0; }},
      {"max_chunk_bytes", [](auto& c) { c.max_chunk_bytes = std::uint64_t{512} << 20; }},
  };
  for (const auto& bc : cases) {
    CAPTURE(bc.field);
    auto c = base();
    bc.change(c);
    const auto v = c.validate();
    REQUIRE_FALSE(v.has_value());
    CHECK(v.error().code == errc::invalid_config);
    CHECK(contains_text(v.error().message, bc.field));
    const auto t = redis_tier::open(c);  // open refuses it the same way, without connecting
    REQUIRE_FALSE(t.has_value());
    CHECK(t.error() == v.error());
  }
  auto dup = base();
  dup.mode = redis_mode::cluster;
  dup.servers.push_back(dup.servers[0]);  // repeated seeds are harmless
  CHECK(dup.validate().has_value());

  const auto ep = [](const char* s) { return redis_endpoint::parse(s); };
  CHECK(ep("10.1.2.3:6380").value() == redis_endpoint{"10.1.2.3", 6380});
  CHECK(ep("cache.local").value() == redis_endpoint{"cache.local", 6379});
  CHECK(ep("[::1]:7000").value() == redis_endpoint{"::1", 7000});
  CHECK(ep("::1").value() == redis_endpoint{"::1", 6379});
  CHECK(ep("[::1]").value() == redis_endpoint{"::1", 6379});
  for (const char* s : {"", ":6379", "h:", "h:0", "h:65536", "h:12x", "[::1", "[::1]x", "[]:1"}) {
    CAPTURE(s);
    const auto r = ep(s);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == errc::invalid_argument);
  }
  CHECK(redis_endpoint{"::1", 7000}.text() == "[::1]:7000");
  CHECK(redis_endpoint{"h", 1}.text() == "h:1");
}

TEST_CASE("redis tier: CRC16 slots with hash tags, key names, and shards") {
  CHECK(kd::crc16("123456789") == 0x31C3);  // CRC16/XMODEM check value
  CHECK(kd::key_hash_slot("foo") == 12182);
  CHECK(kd::key_hash_slot("{user1000}.following") == kd::key_hash_slot("{user1000}.followers"));
  CHECK(kd::key_hash_slot("{user1000}.following") == kd::key_hash_slot("user1000"));
  CHECK(kd::key_hash_slot("foo{}{bar}") == (kd::crc16("foo{}{bar}") & 16383));  // empty tag: whole key
  CHECK(kd::key_hash_slot("foo{{bar}}zap") == (kd::crc16("{bar") & 16383));
  CHECK(kd::key_hash_slot("foo{bar}{zap}") == (kd::crc16("bar") & 16383));
  CHECK(kd::key_hash_slot("foo{bar") == (kd::crc16("foo{bar") & 16383));

  // A key name: prefix, tag of 16 hex digits, then 64 binary bytes; braces in the binary part
  // (here forced into the key and the namespace) never move the slot.
  chunk_key k = key(5);
  k.bytes[9] = std::byte{'{'};
  k.bytes[12] = std::byte{'}'};
  auto ns = digest(3);
  ns[0] = std::byte{'{'};
  ns[5] = std::byte{'}'};
  const std::string name = kd::redis_key_name("kvx:", ns, k);
  REQUIRE(name.size() == 4 + 18 + 64);
  CHECK(name.substr(0, 5) == "kvx:{");
  CHECK(name[21] == '}');
  CHECK(name.substr(5, 16) == k.hex().substr(0, 16));
  CHECK(std::memcmp(name.data() + 22, ns.data(), 32) == 0);
  CHECK(std::memcmp(name.data() + 54, k.bytes.data(), 32) == 0);
  CHECK(kd::key_hash_slot(name) == (kd::crc16(k.hex().substr(0, 16)) & 16383));

  // Slots spread evenly over three masters' ranges; shards spread evenly, and a fourth server
  // takes about a quarter of the keys, all from the others (jump hashing moves nothing else).
  std::array<int, 3> thirds{};
  std::array<int, 3> shards{};
  int moved = 0, moved_elsewhere = 0;
  constexpr int n = 30000;
  for (int i = 0; i < n; ++i) {
    const chunk_key c = key(static_cast<std::uint64_t>(i), 9);
    ++thirds[static_cast<std::size_t>(kd::key_hash_slot(kd::redis_key_name("kvx:", ns, c)) * 3 / 16384)];
    const auto s3 = kd::shard_of(c, 3);
    REQUIRE(s3 < 3);
    ++shards[s3];
    const auto s4 = kd::shard_of(c, 4);
    if (s4 != s3) {
      ++moved;
      if (s4 != 3) ++moved_elsewhere;
    }
    CHECK(kd::shard_of(c, 1) == 0);
  }
  for (int i = 0; i < 3; ++i) {
    CHECK(std::abs(thirds[static_cast<std::size_t>(i)] - n / 3) < n / 30);
    CHECK(std::abs(shards[static_cast<std::size_t>(i)] - n / 3) < n / 30);
  }
  CHECK(std::abs(moved - n / 4) < n / 40);
  CHECK(moved_elsewhere == 0);
}

TEST_CASE("redis tier: requests, replies, redirects, slot maps and values, parsed") {
  // Binary arguments (NUL, CR, LF) and a record argument (header copied, payload borrowed)
  // round-trip through hiredis' reader however the bytes are cut.
  const std::string bin("a\0b\r\nc", 6);
  const auto body = payload(1, 3000);
  std::array<std::byte, kd::chunk_record_fixed_bytes> header{};
  REQUIRE(kd::encode_chunk_header(header, digest(1), key(1), body));
  kd::resp_request req;
  req.command(3);
  req.arg("SET");
  req.arg(bin);
  req.arg_record(header, body);
  req.command(1);
  req.arg("PING");
  req.command(2);
  req.arg("PX");
  req.arg(std::uint64_t{1234});
  CHECK(req.commands() == 3);
  const std::string flat = req.flatten();
  CHECK(req.bytes() == flat.size());
  std::vector<iovec> iov;
  req.append_iov(iov);
  std::string joined;
  for (const auto& v : iov) joined.append(static_cast<const char*>(v.iov_base), v.iov_len);
  CHECK(joined == flat);
  CHECK(iov.size() == 3);  // framing, the borrowed payload, framing: nothing else is split
  for (const std::size_t piece : {std::size_t{1}, std::size_t{7}, flat.size()}) {
    CAPTURE(piece);
    kd::resp_reader reader(nullptr);
    const auto replies = parse_all(reader, flat, piece);
    REQUIRE(replies.size() == 3);
    REQUIRE(replies[0]->type == kd::resp_reply::kind::array);
    REQUIRE(replies[0]->elements.size() == 3);
    CHECK(replies[0]->elements[0].text == "SET");
    CHECK(replies[0]->elements[1].text == bin);
    const auto rec = kd::encode_chunk_record(digest(1), key(1), body);
    CHECK(replies[0]->elements[2].text == as_string(rec));
    CHECK(replies[1]->elements.at(0).text == "PING");
    CHECK(replies[2]->elements.at(1).text == "1234");
  }

  // Reply kinds; a protocol error is reported, never a crash.
  {
    kd::resp_reader reader(nullptr);
    const auto r = parse_all(reader, "+OK\r\n-MOVED 1 h:2\r\n:42\r\n$-1\r\n*2\r\n*0\r\n$0\r\n\r\n", 3);
    REQUIRE(r.size() == 5);
    CHECK(r[0]->is_status("OK"));
    CHECK(r[1]->is_error("MOVED"));
    CHECK_FALSE(r[1]->is_error("MOVE"));
    CHECK(r[2]->type == kd::resp_reply::kind::integer);
    CHECK(r[2]->integer == 42);
    CHECK(r[3]->type == kd::resp_reply::kind::nil);
    REQUIRE(r[4]->elements.size() == 2);
    CHECK(r[4]->elements[0].type == kd::resp_reply::kind::array);
    CHECK(r[4]->elements[1].type == kd::resp_reply::kind::string);
    kd::resp_reader broken(nullptr);
    REQUIRE(broken.feed("?nonsense\r\n", 11));
    std::unique_ptr<kd::resp_reply> none;
    CHECK_FALSE(broken.next(none));
    CHECK_FALSE(broken.error().empty());
  }

  // A GET reply goes through the sink: checked, copied into the caller's buffer, or refused.
  {
    const auto rec = kd::encode_chunk_record(digest(1), key(1), body);
    const std::string wire = "$" + std::to_string(rec.size()) + "\r\n" + as_string(rec) + "\r\n";
    fixed_sink src;
    kd::chunk_record_expect expect{digest(1), key(1), 0, ~std::uint64_t{0}};
    std::vector<std::byte> out(body.size() + 5, std::byte{0xEE});
    src.sink = {&expect, out};
    kd::resp_reader reader(&src);
    auto r = parse_all(reader, wire, 1000);
    REQUIRE(r.size() == 1);
    CHECK(r[0]->type == kd::resp_reply::kind::value);
    CHECK(r[0]->value_error == kd::record_error::ok);
    CHECK(r[0]->integer == static_cast<long long>(body.size()));
    CHECK(std::equal(body.begin(), body.end(), out.begin()));
    CHECK(out.back() == std::byte{0xEE});

    kd::chunk_record_expect other = expect;
    other.ns = digest(2);
    std::fill(out.begin(), out.end(), std::byte{0xEE});
    src.sink = {&other, out};
    kd::resp_reader r2(&src);
    auto f = parse_all(r2, wire, 64);
    REQUIRE(f.size() == 1);
    CHECK(f[0]->value_error == kd::record_error::foreign_namespace);
    CHECK(std::all_of(out.begin(), out.end(), [](std::byte b) { return b == std::byte{0xEE}; }));  // untouched

    std::vector<std::byte> small(body.size() - 1);
    src.sink = {&expect, small};
    kd::resp_reader r3(&src);
    auto s = parse_all(r3, wire, 4096);
    REQUIRE(s.size() == 1);
    CHECK(s[0]->value_error == kd::record_error::buffer_too_small);
  }

  // Redirects.
  {
    const auto m = kd::parse_redirect("MOVED 3999 127.0.0.1:6381", "x");
    REQUIRE(m);
    CHECK_FALSE(m->ask);
    CHECK(m->slot == 3999);
    CHECK(m->target == redis_endpoint{"127.0.0.1", 6381});
    const auto a = kd::parse_redirect("ASK 16383 ::1:7001", "x");
    REQUIRE(a);
    CHECK(a->ask);
    CHECK(a->target == redis_endpoint{"::1", 7001});
    const auto same = kd::parse_redirect("MOVED 7 :7002", "10.0.0.9");
    REQUIRE(same);
    CHECK(same->target == redis_endpoint{"10.0.0.9", 7002});
    for (const char* bad : {"MOVED", "MOVED 1", "MOVED x h:1", "MOVED 16384 h:1", "MOVED 1 h", "MOVED 1 h:0", "MOVED 1 h:99999",
                            "ASK 1 h:x", "MOVEDX 1 h:1", "ERR nope"}) {
      CAPTURE(bad);
      CHECK_FALSE(kd::parse_redirect(bad, "h").has_value());
    }
  }

  // CLUSTER SLOTS replies.
  {
    using kind = kd::resp_reply::kind;
    const auto integer = [](long long v) {
      kd::resp_reply r;
      r.type = kind::integer;
      r.integer = v;
      return r;
    };
    const auto str = [](std::string s) {
      kd::resp_reply r;
      r.type = kind::string;
      r.text = std::move(s);
      return r;
    };
    const auto arr = [](std::vector<kd::resp_reply> e) {
      kd::resp_reply r;
      r.type = kind::array;
      r.elements = std::move(e);
      return r;
    };
    const auto entry = [&](long long lo, long long hi, std::string host, long long port) {
      return arr({integer(lo), integer(hi), arr({str(std::move(host)), integer(port), str("id"), arr({})}),
                  arr({str("127.0.0.1"), integer(9999), str("replica")})});
    };
    const auto ok = kd::parse_cluster_slots(arr({entry(0, 8191, "127.0.0.1", 7000), entry(8192, 16383, "", 7001)}), "10.0.0.5");
    REQUIRE(ok);
    REQUIRE(ok->size() == 2);
    CHECK((*ok)[0].first == 0);
    CHECK((*ok)[0].last == 8191);
    CHECK((*ok)[0].master == redis_endpoint{"127.0.0.1", 7000});
    CHECK((*ok)[1].master == redis_endpoint{"10.0.0.5", 7001});
    for (const auto& bad : {arr({entry(0, 16384, "h", 1)}), arr({entry(5, 4, "h", 1)}), arr({entry(-1, 4, "h", 1)}),
                            arr({entry(0, 1, "h", 0)}), arr({entry(0, 1, "h", 70000)}), arr({arr({integer(0), integer(1)})}),
                            arr({arr({integer(0), integer(1), arr({integer(1), integer(2)})})}), str("x"), integer(3)}) {
      const auto r = kd::parse_cluster_slots(bad, "h");
      CHECK_FALSE(r.has_value());
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One server
// ---------------------------------------------------------------------------------------------

TEST_CASE("redis tier: round trips of many sizes, batches in one round trip, replace, remove, contains") {
  kvr::redis_server srv;
  auto tier = open_tier(config({srv.endpoint()}));
  const auto admin = srv.admin();
  REQUIRE(tier.ping().has_value());

  const std::vector<std::size_t> sizes = {1, 7, 128, 4095, 4096, 65536, 262147, std::size_t{1} << 20, (std::size_t{4} << 20) + 3};
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    CAPTURE(sizes[i]);
    const auto p = payload(i, sizes[i]);
    REQUIRE(tier.put(key(i), p).has_value());
    std::vector<std::byte> exact(sizes[i]), larger(sizes[i] + 100);
    auto r = tier.get(key(i), exact);
    REQUIRE(r.has_value());
    CHECK(*r == sizes[i]);
    CHECK(exact == p);
    r = tier.get(key(i), larger);
    REQUIRE(r.has_value());
    CHECK(*r == sizes[i]);
    CHECK(std::equal(p.begin(), p.end(), larger.begin()));
    // What Redis holds: a string of header + payload under the documented name.
    const std::string name = tier.key_of(key(i));
    CHECK(admin.must({"TYPE", name}) == "string");
    CHECK(admin.must({"STRLEN", name}) == std::to_string(kd::chunk_record_fixed_bytes + sizes[i]));
  }
  {
    std::vector<std::byte> small(sizes.back() - 1);
    const auto r = tier.get(key(sizes.size() - 1), small);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == errc::size_mismatch);
  }

  // Replace and remove.
  const auto v1 = payload(100, 5000, 1), v2 = payload(100, 6000, 2);
  REQUIRE(tier.put(key(100), v1));
  REQUIRE(tier.put(key(100), v2));
  std::vector<std::byte> out(8000);
  auto r = tier.get(key(100), out);
  REQUIRE(r);
  CHECK(*r == 6000);
  CHECK(std::equal(v2.begin(), v2.end(), out.begin()));
  tier.remove(key(100));
  r = tier.get(key(100), out);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::not_found);
  CHECK(exists(admin, tier.key_of(key(100))) == 0);

  // Batches: 32 puts, 32 gets, contains of 32 keys: one exchange each.
  std::vector<chunk_key> keys;
  std::vector<std::vector<std::byte>> values;
  for (std::uint64_t i = 200; i < 232; ++i) {
    keys.push_back(key(i));
    values.push_back(payload(i, 32768));
  }
  std::vector<std::span<const std::byte>> in(values.begin(), values.end());
  auto x0 = tier.link_stats().exchanges;
  const auto puts = tier.put_many(keys, in);
  CHECK(tier.link_stats().exchanges == x0 + 1);
  for (const auto& p : puts) CHECK(p.has_value());
  std::vector<std::vector<std::byte>> bufs(keys.size(), std::vector<std::byte>(32768));
  std::vector<std::span<std::byte>> outs(bufs.begin(), bufs.end());
  x0 = tier.link_stats().exchanges;
  const auto gets = tier.get_many(keys, outs);
  CHECK(tier.link_stats().exchanges == x0 + 1);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    REQUIRE(gets[i].has_value());
    CHECK(*gets[i] == 32768);
    CHECK(payload_ok(bufs[i], 200 + i));
  }
  x0 = tier.link_stats().exchanges;
  CHECK(tier.contains(keys) == 32);
  CHECK(tier.link_stats().exchanges == x0 + 1);
  auto holed = keys;
  holed[5] = key(999);
  CHECK(tier.contains(holed) == 5);
  CHECK(tier.contains(std::span<const chunk_key>()) == 0);
  CHECK(tier.link_stats().exchanges == x0 + 2);

  // Bad arguments are refused before any I/O.
  x0 = tier.link_stats().exchanges;
  auto e = tier.put(key(300), std::span<const std::byte>());
  REQUIRE_FALSE(e);
  CHECK(e.error().code == errc::invalid_argument);
  auto cfg = tier.config();
  std::vector<std::byte> huge(static_cast<std::size_t>(cfg.max_chunk_bytes) + 1);
  e = tier.put(key(301), huge);
  REQUIRE_FALSE(e);
  CHECK(e.error().code == errc::invalid_argument);
  const std::vector<std::span<const std::byte>> one_value = {in[0]};
  const auto mismatch = tier.put_many(keys, one_value);
  REQUIRE(mismatch.size() == keys.size());
  CHECK(mismatch[0].error().code == errc::invalid_argument);
  CHECK(tier.link_stats().exchanges == x0);

  const auto s = tier.stats();
  CHECK(s.writes == sizes.size() + 2 + 32);
  CHECK(s.hits == 2 * sizes.size() + 1 + 32);
  CHECK(s.misses == 1);
  CHECK(s.rejected_writes == 1);
  CHECK(s.read_errors == 0);
  CHECK(s.write_errors == 0);
  CHECK(s.corrupt_removed == 0);
  CHECK(s.read_latency.count == s.hits + s.misses + 1);  // + the size_mismatch
  CHECK(s.write_latency.count == s.writes);
  const auto l = tier.link_stats();
  CHECK(l.servers == 1);
  CHECK(l.servers_down == 0);
  CHECK(l.timeouts == 0);
  CHECK(l.moved == 0);

  // Another database of the same server: its keys are there, not in database 0.
  auto db_cfg = config({srv.endpoint()});
  db_cfg.database = 3;
  auto db3 = open_tier(db_cfg);
  REQUIRE(db3.put(key(400), payload(400, 100)));
  CHECK(exists(srv.admin(3), db3.key_of(key(400))) == 1);
  CHECK(exists(admin, db3.key_of(key(400))) == 0);
  CHECK(tier.contains(std::array{key(400)}) == 0);
  CHECK(db3.contains(std::array{key(400)}) == 1);
  CHECK(db3.contains(std::array{key(200)}) == 0);

  // A moved-from tier answers shut_down.
  redis_tier other = std::move(tier);
  CHECK(other.contains(keys) == 32);
  auto gone = tier.get(key(0), out);  // NOLINT(bugprone-use-after-move): the documented moved-from state
  REQUIRE_FALSE(gone);
  CHECK(gone.error().code == errc::shut_down);
  CHECK(tier.contains(keys) == 0);
  CHECK_FALSE(tier.ping());
}

TEST_CASE("redis tier: corrupt, foreign, truncated and wrong-type values are misses, counted and deleted") {
  kvr::redis_server srv;
  auto tier = open_tier(config({srv.endpoint()}));
  const auto admin = srv.admin();
  const auto body = payload(1, 2000);
  const auto good = kd::encode_chunk_record(digest(1), key(1), body);

  std::vector<std::pair<std::string, std::string>> values;  // (what, value); empty value: a list
  values.emplace_back("text", "hello");
  values.emplace_back("empty", "");
  values.emplace_back("foreign namespace", as_string(kd::encode_chunk_record(digest(2), key(1), body)));
  values.emplace_back("another key's record", as_string(kd::encode_chunk_record(digest(1), key(2), body)));
  {
    auto v = good;
    v[kd::chunk_record_fixed_bytes + 777] ^= std::byte{0x10};
    values.emplace_back("payload bit flipped", as_string(v));
  }
  {
    auto v = good;
    v[85] ^= std::byte{0x01};
    values.emplace_back("size bit flipped", as_string(v));
  }
  values.emplace_back("truncated", as_string(std::span(good).first(good.size() - 1)));
  values.emplace_back("trailing byte", as_string(good) + "x");
  values.emplace_back("header only", as_string(std::span(good).first(kd::chunk_record_fixed_bytes)));

  std::vector<std::byte> out(4000);
  std::uint64_t n = 0;
  for (const auto& [what, value] : values) {
    CAPTURE(what);
    const std::string name = tier.key_of(key(1));
    admin.must({"SET", name, value});
    CHECK(tier.contains(std::array{key(1)}) == 1);  // present, if unusable
    const auto r = tier.get(key(1), out);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == errc::not_found);
    CHECK(exists(admin, name) == 0);
    ++n;
  }
  {
    const std::string name = tier.key_of(key(1));
    admin.must({"RPUSH", name, "not a string"});
    const auto r = tier.get(key(1), out);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == errc::not_found);
    CHECK(contains_text(r.error().message, "not a string"));
    CHECK(exists(admin, name) == 0);
    ++n;
  }
  auto s = tier.stats();
  CHECK(s.corrupt_removed == n);
  CHECK(s.misses == n);
  CHECK(s.hits == 0);
  CHECK(s.read_errors == 0);

  // The good record under the right name is served; a peer's chunk above our max_chunk_bytes is
  // a miss but stays for the peer.
  admin.must({"SET", tier.key_of(key(1)), as_string(good)});
  auto r = tier.get(key(1), out);
  REQUIRE(r);
  CHECK(*r == body.size());
  auto small_cfg = config({srv.endpoint()});
  small_cfg.max_chunk_bytes = 1000;
  auto small = open_tier(small_cfg);
  r = small.get(key(1), out);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::not_found);
  CHECK(exists(admin, tier.key_of(key(1))) == 1);
  CHECK(small.stats().corrupt_removed == 0);
  CHECK(tier.stats().corrupt_removed == n);
}

// ---------------------------------------------------------------------------------------------
// Redis not up, down, slow, killed
// ---------------------------------------------------------------------------------------------

TEST_CASE("redis tier: open never hangs: nothing listening, a server that never answers, recovery when Redis comes up") {
  const int port = kvr::pick_port();
  auto cfg = config({{"127.0.0.1", static_cast<std::uint16_t>(port)}});
  cfg.connect_timeout = 200ms;
  cfg.command_timeout = 200ms;
  cfg.reconnect_backoff_min = 50ms;
  cfg.reconnect_backoff_max = 200ms;

  // Nothing listening: refused at once.
  cfg.require_connection = true;
  kvortex::result<redis_tier> t = kvortex::fail(errc::internal, "");
  auto took = time_of([&] { t = redis_tier::open(cfg); });
  REQUIRE_FALSE(t.has_value());
  CHECK(t.error().code == errc::backend_failure);
  CHECK(contains_text(t.error().message, std::to_string(port)));
  CHECK(took < 200ms);

  cfg.require_connection = false;
  auto tier = open_tier(cfg);
  std::vector<std::byte> out(100);
  for (int i = 0; i < 5; ++i) {
    took = time_of([&] {
      const auto r = tier.get(key(1), out);
      REQUIRE_FALSE(r);
      CHECK(r.error().code == errc::backend_failure);
      const auto w = tier.put(key(1), payload(1, 100));
      REQUIRE_FALSE(w);
      CHECK(w.error().code == errc::backend_failure);
      CHECK(tier.contains(std::array{key(1)}) == 0);
    });
    CHECK(took < 150ms);
  }
  CHECK(tier.stats().read_errors == 5);
  CHECK(tier.stats().write_errors == 5);
  CHECK(tier.link_stats().fast_failures > 0);  // backing off: no connect attempt per call
  CHECK(tier.link_stats().servers_down == 1);

  // Redis comes up on that port: the tier finds it once its backoff ends.
  {
    kvr::server_options o;
    o.port = port;
    kvr::redis_server srv(o);
    CHECK(eventually([&] { return round_trip(tier, 5); }, 2000ms));
    CHECK(tier.link_stats().reconnects >= 1);
    CHECK(tier.link_stats().servers_down == 0);
    CHECK(tier.ping().has_value());
  }

  // A listener that accepts TCP but never answers (a stopped or wedged server): open returns at
  // connect_timeout, calls at command_timeout.
  fake_server mute("", /*accept_connections=*/false);
  auto mute_cfg = config({mute.endpoint()});
  mute_cfg.connect_timeout = 200ms;
  mute_cfg.command_timeout = 300ms;
  mute_cfg.require_connection = true;
  took = time_of([&] { t = redis_tier::open(mute_cfg); });
  REQUIRE_FALSE(t.has_value());
  CHECK(contains_text(t.error().message, "connect timeout"));
  CHECK(took >= 190ms);
  CHECK(took < 200ms + 300ms);
  mute_cfg.require_connection = false;
  took = time_of([&] { t = redis_tier::open(mute_cfg); });
  REQUIRE(t.has_value());
  CHECK(took < 200ms + 300ms);
  std::this_thread::sleep_for(100ms);  // past the backoff: the next call tries again
  took = time_of([&] { CHECK_FALSE(t->get(key(1), out).has_value()); });
  CHECK(took >= 190ms);  // a new connection has connect_timeout, not command_timeout
  CHECK(took < 200ms + 250ms);
  CHECK(t->link_stats().timeouts >= 2);
  CHECK(t->link_stats().connects == 0);
}

TEST_CASE("redis tier: a stopped server (SIGSTOP): calls return within the timeout, then fail fast, and recover after SIGCONT") {
  kvr::redis_server srv;
  auto cfg = config({srv.endpoint()});
  cfg.command_timeout = 200ms;
  cfg.reconnect_backoff_min = 100ms;
  cfg.reconnect_backoff_max = 400ms;
  auto tier = open_tier(cfg);
  const auto p = payload(1, 100000);
  REQUIRE(tier.put(key(1), p));
  std::vector<std::byte> out(p.size());

  srv.pause();
  std::chrono::milliseconds slowest{0};
  int calls = 0, slow = 0;
  const auto until = steady::now() + 1500ms;
  while (steady::now() < until) {
    const auto took = time_of([&] {
      CHECK_FALSE(tier.get(key(1), out).has_value());
      CHECK_FALSE(tier.put(key(2), p).has_value());
      CHECK(tier.contains(std::array{key(1)}) == 0);
    });
    slowest = std::max(slowest, took);
    slow += took >= 150ms ? 1 : 0;
    ++calls;
    std::this_thread::sleep_for(10ms);
  }
  srv.resume();
  MESSAGE("stopped for 1.5 s: " << calls << " rounds of get+put+contains, " << slow << " waited for a timeout, slowest "
                                << slowest.count() << " ms");
  // Each round holds at most one call that waits the full 200 ms (the first after a backoff).
  CHECK(slowest < 200ms + 250ms);
  CHECK(slow >= 1);
  CHECK(slow < calls);
  CHECK(tier.link_stats().timeouts >= 1);
  CHECK(tier.stats().read_errors >= static_cast<std::uint64_t>(calls));

  CHECK(eventually(
      [&] {
        const auto r = tier.get(key(1), out);
        return r && out == p;
      },
      2000ms));
  CHECK(round_trip(tier, 3));
  CHECK(tier.link_stats().reconnects >= 1);
}

TEST_CASE("redis tier: Redis killed mid-run and restarted: misses and dropped writes, counted, then recovery") {
  kvr::redis_server srv;
  auto cfg = config({srv.endpoint()});
  cfg.command_timeout = 200ms;
  cfg.reconnect_backoff_min = 20ms;
  cfg.reconnect_backoff_max = 300ms;
  auto tier = open_tier(cfg);

  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> wrong{0}, hits{0}, failures{0}, hits_after{0};
  std::atomic<bool> restarted{false};
  std::atomic<std::int64_t> slowest_ms{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < 2; ++w)
    workers.emplace_back([&, w] {
      std::vector<std::byte> out(70000);
      for (std::uint64_t i = 0; !stop.load(); ++i) {
        const std::uint64_t id = (i * 2 + static_cast<std::uint64_t>(w)) % 64;
        const auto t0 = steady::now();
        const auto put = tier.put(key(id), payload(id, 60000 + id, i));
        const auto got = tier.get(key((id * 7) % 64), out);
        const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0).count();
        std::int64_t prev = slowest_ms.load();
        while (ms > prev && !slowest_ms.compare_exchange_weak(prev, ms)) {
        }
        if (!put) failures.fetch_add(1);
        if (got) {
          hits.fetch_add(1);
          if (restarted.load()) hits_after.fetch_add(1);
          if (!payload_ok(std::span(out).first(*got), (id * 7) % 64)) wrong.fetch_add(1);
        } else if (got.error().code != errc::not_found) {
          failures.fetch_add(1);
        }
      }
    });
  std::this_thread::sleep_for(400ms);
  const auto hits_before = hits.load();
  srv.kill();
  std::this_thread::sleep_for(500ms);
  const auto failures_down = failures.load();
  srv.restart();
  restarted = true;
  const bool recovered = eventually([&] { return hits_after.load() > 20; }, 3000ms);
  stop = true;
  for (auto& t : workers) t.join();

  MESSAGE("hits before the kill " << hits_before << ", failures while down " << failures_down << ", hits after restart "
                                  << hits_after.load() << ", slowest put+get " << slowest_ms.load() << " ms");
  CHECK(wrong.load() == 0);
  CHECK(hits_before > 0);
  CHECK(failures_down > 0);
  CHECK(recovered);
  CHECK(slowest_ms.load() < 2 * 200 + 300);  // put + get, each within its timeout
  const auto s = tier.stats();
  CHECK(s.read_errors + s.write_errors > 0);
  CHECK(s.corrupt_removed == 0);
  CHECK(tier.link_stats().reconnects >= 1);
}

TEST_CASE("redis tier: a server speaking broken protocol fails calls, never the process") {
  struct bad_case {
    const char* what;
    std::string answer;
    errc code;
  };
  const std::vector<bad_case> cases = {
      {"bad integer", "+PONG\r\n:abc\r\n", errc::backend_failure},
      {"array for GET", "+PONG\r\n*1\r\n$5\r\nhello\r\n", errc::backend_failure},
      {"unrequested replies", "+PONG\r\n$-1\r\n+OK\r\n+OK\r\n", errc::not_found},
      {"endless bulk", "+PONG\r\n$999999999\r\nabc", errc::backend_failure},
      {"oversized bulk", "+PONG\r\n$99999999999999\r\n", errc::backend_failure},
      {"negative bulk", "+PONG\r\n$-5\r\n", errc::backend_failure},
      {"handshake refused", "-ERR go away\r\n", errc::backend_failure},
  };
  for (const auto& bc : cases) {
    CAPTURE(bc.what);
    fake_server fake(bc.answer);
    auto cfg = config({fake.endpoint()});
    cfg.command_timeout = 300ms;
    auto tier = open_tier(cfg);
    std::vector<std::byte> out(1000);
    std::this_thread::sleep_for(80ms);  // past open's backoff, if open failed
    kvortex::result<std::size_t> r = 0;
    const auto took = time_of([&] { r = tier.get(key(1), out); });
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == bc.code);
    CHECK(took < 300ms + 300ms);
  }
}

// ---------------------------------------------------------------------------------------------
// Access control, expiry, capacity
// ---------------------------------------------------------------------------------------------

TEST_CASE("redis tier: AUTH with a password and with ACL users, refusals are clear errors") {
  kvr::server_options o;
  o.args = {"--requirepass", "s3cret"};
  o.admin_password = "s3cret";
  kvr::redis_server srv(o);
  const auto admin = srv.admin();
  admin.must({"ACL", "SETUSER", "alice", "on", ">alice-pw", "~kvx:*", "+@all"});
  admin.must({"ACL", "SETUSER", "reader", "on", ">reader-pw", "~kvx:*", "+@read", "+ping", "+exists"});

  auto cfg = config({srv.endpoint()});
  cfg.require_connection = true;
  {
    auto c = cfg;
    c.password = "s3cret";
    auto tier = open_tier(c);
    CHECK(round_trip(tier, 1));
  }
  {
    const auto t = redis_tier::open(cfg);  // no AUTH
    REQUIRE_FALSE(t.has_value());
    CHECK(t.error().code == errc::backend_failure);
    CHECK(contains_text(t.error().message, "NOAUTH"));
  }
  {
    auto c = cfg;
    c.password = "wrong";
    const auto t = redis_tier::open(c);
    REQUIRE_FALSE(t.has_value());
    CHECK(contains_text(t.error().message, "WRONGPASS"));
    CHECK(contains_text(t.error().message, "AUTH"));
  }
  auto alice_cfg = cfg;
  alice_cfg.username = "alice";
  alice_cfg.password = "alice-pw";
  auto alice = open_tier(alice_cfg);
  CHECK(round_trip(alice, 2));
  {
    auto c = alice_cfg;
    c.password = "nope";
    const auto t = redis_tier::open(c);
    REQUIRE_FALSE(t.has_value());
    CHECK(contains_text(t.error().message, "WRONGPASS"));
  }
  {
    auto c = alice_cfg;
    c.key_prefix = "other:";  // outside alice's key pattern
    auto t = open_tier(c);
    const auto w = t.put(key(3), payload(3, 100));
    REQUIRE_FALSE(w);
    CHECK(w.error().code == errc::backend_failure);
    CHECK(contains_text(w.error().message, "NOPERM"));
    CHECK(t.stats().write_errors == 1);
    CHECK(t.ping().has_value());  // the refusal did not cost the connection
  }
  {
    auto c = cfg;
    c.username = "reader";
    c.password = "reader-pw";
    auto reader = open_tier(c);
    std::vector<std::byte> out(1000);
    const auto r = reader.get(key(2), out);  // alice's chunk
    REQUIRE(r);
    CHECK(payload_ok(std::span(out).first(*r), 2));
    CHECK(reader.contains(std::array{key(2)}) == 1);
    const auto w = reader.put(key(4), payload(4, 100));
    REQUIRE_FALSE(w);
    CHECK(contains_text(w.error().message, "NOPERM"));
  }
}

TEST_CASE("redis tier: chunks expire after the configured TTL") {
  kvr::redis_server srv;
  const auto admin = srv.admin();
  auto cfg = config({srv.endpoint()});
  cfg.ttl = 300ms;
  auto tier = open_tier(cfg);
  REQUIRE(tier.put(key(1), payload(1, 1000)));
  const auto pttl = std::stoll(admin.must({"PTTL", tier.key_of(key(1))}));
  CHECK(pttl > 0);
  CHECK(pttl <= 300);
  std::vector<std::byte> out(1000);
  CHECK(tier.get(key(1), out).has_value());
  std::this_thread::sleep_for(450ms);
  const auto r = tier.get(key(1), out);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::not_found);
  CHECK(tier.contains(std::array{key(1)}) == 0);

  auto plain = open_tier(config({srv.endpoint()}));
  REQUIRE(plain.put(key(2), payload(2, 1000)));
  CHECK(admin.must({"PTTL", plain.key_of(key(2))}) == "-1");
}

TEST_CASE("redis tier: maxmemory eviction is a miss, a noeviction refusal is capacity_exhausted") {
  constexpr std::size_t chunk = 256 * 1024;
  constexpr std::uint64_t count = 40;  // 10 MiB into 4 MiB
  {
    kvr::server_options o;
    o.args = {"--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"};
    kvr::redis_server srv(o);
    auto tier = open_tier(config({srv.endpoint()}));
    for (std::uint64_t i = 0; i < count; ++i) REQUIRE(tier.put(key(i), payload(i, chunk)).has_value());
    std::vector<std::byte> out(chunk);
    std::uint64_t hits = 0, misses = 0;
    for (std::uint64_t i = 0; i < count; ++i) {
      const auto r = tier.get(key(i), out);
      if (r) {
        ++hits;
        CHECK(payload_ok(out, i));
      } else {
        CHECK(r.error().code == errc::not_found);
        ++misses;
      }
    }
    MESSAGE("allkeys-lru, 4 MB: " << hits << " hits, " << misses << " evicted of " << count);
    CHECK(misses > 0);
    CHECK(hits > 0);
    CHECK(tier.get(key(count - 1), out).has_value());  // the newest survived
    CHECK(std::stoll(srv.admin().info("stats", "evicted_keys")) > 0);
    CHECK(tier.stats().corrupt_removed == 0);
    CHECK(tier.stats().read_errors == 0);
  }
  {
    kvr::server_options o;
    o.args = {"--maxmemory", "4mb", "--maxmemory-policy", "noeviction"};
    kvr::redis_server srv(o);
    auto tier = open_tier(config({srv.endpoint()}));
    std::uint64_t stored = 0;
    kvortex::result<void> last;
    for (std::uint64_t i = 0; i < count && last; ++i) {
      last = tier.put(key(i), payload(i, chunk));
      if (last) ++stored;
    }
    REQUIRE_FALSE(last.has_value());
    CHECK(last.error().code == errc::capacity_exhausted);
    CHECK(contains_text(last.error().message, "OOM"));
    CHECK(stored > 0);
    CHECK(tier.stats().write_errors == 1);
    std::vector<std::byte> out(chunk);
    CHECK(tier.get(key(0), out).has_value());  // the tier keeps serving
  }
}

// ---------------------------------------------------------------------------------------------
// Sharing, sharding, threads
// ---------------------------------------------------------------------------------------------

TEST_CASE("redis tier: two tiers and two processes share chunks, other namespaces do not see them") {
  kvr::redis_server srv;
  auto a = open_tier(config({srv.endpoint()}));
  auto b = open_tier(config({srv.endpoint()}));
  std::vector<std::byte> out(70000);
  REQUIRE(a.put(key(1), payload(1, 70000)));
  auto r = b.get(key(1), out);
  REQUIRE(r);
  CHECK(payload_ok(std::span(out).first(*r), 1));
  REQUIRE(b.put(key(2), payload(2, 100)));
  r = a.get(key(2), out);
  REQUIRE(r);
  CHECK(*r == 100);

  auto other_cfg = config({srv.endpoint()});
  other_cfg.ns = digest(9);
  auto other = open_tier(other_cfg);
  CHECK(other.contains(std::array{key(1), key(2)}) == 0);
  r = other.get(key(1), out);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::not_found);
  CHECK(other.stats().corrupt_removed == 0);

  // Another process (as another inference node would be) writes; this one reads.
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    auto t = redis_tier::open(config({srv.endpoint()}));
    int rc = t ? 0 : 1;
    for (std::uint64_t i = 100; i < 110 && rc == 0; ++i)
      if (!t->put(key(i), payload(i, 5000 + i))) rc = 2;
    ::_exit(rc);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  for (std::uint64_t i = 100; i < 110; ++i) {
    r = a.get(key(i), out);
    REQUIRE(r);
    CHECK(*r == 5000 + i);
    CHECK(payload_ok(std::span(out).first(*r), i));
  }
}

TEST_CASE("redis tier: sharding over independent servers by key, one server down costs only its keys") {
  std::vector<std::unique_ptr<kvr::redis_server>> servers;
  std::vector<redis_endpoint> eps;
  for (int i = 0; i < 3; ++i) {
    servers.push_back(std::make_unique<kvr::redis_server>());
    eps.push_back(servers.back()->endpoint());
  }
  auto cfg = config(eps);
  cfg.command_timeout = 300ms;
  auto tier = open_tier(cfg);
  constexpr std::uint64_t n = 300;
  std::vector<chunk_key> keys;
  std::vector<std::vector<std::byte>> values;
  for (std::uint64_t i = 0; i < n; ++i) {
    keys.push_back(key(i));
    values.push_back(payload(i, 2000));
  }
  std::vector<std::span<const std::byte>> in(values.begin(), values.end());
  const auto x0 = tier.link_stats().exchanges;
  for (const auto& p : tier.put_many(keys, in)) REQUIRE(p.has_value());
  CHECK(tier.link_stats().exchanges == x0 + 3);  // one per server, all at once

  for (int s = 0; s < 3; ++s) {
    const auto size = std::stoll(servers[static_cast<std::size_t>(s)]->admin().must({"DBSIZE"}));
    CHECK(size > static_cast<long long>(n) / 5);
  }
  for (std::uint64_t i = 0; i < n; i += 10) {  // each key on its shard, and only there
    const auto shard = kd::shard_of(keys[i], 3);
    CHECK(tier.server_of(keys[i]) == eps[shard]);
    for (std::size_t s = 0; s < 3; ++s) CHECK(exists(servers[s]->admin(), tier.key_of(keys[i])) == (s == shard ? 1 : 0));
  }

  servers[1]->kill();
  std::vector<std::byte> out(2000);
  std::uint64_t down_keys = 0;
  for (std::uint64_t i = 0; i < n; ++i) {
    const auto r = tier.get(keys[i], out);
    if (kd::shard_of(keys[i], 3) == 1) {
      REQUIRE_FALSE(r);
      CHECK(r.error().code == errc::backend_failure);
      ++down_keys;
    } else {
      REQUIRE(r);
      CHECK(payload_ok(out, i));
    }
  }
  CHECK(tier.stats().read_errors == down_keys);
  std::size_t first_down = 0;
  while (kd::shard_of(keys[first_down], 3) != 1) ++first_down;
  CHECK(tier.contains(keys) == first_down);
  CHECK(tier.link_stats().servers_down == 1);
}

TEST_CASE("redis tier: 6 threads writing and reading the same chunks never see wrong bytes") {
  kvr::redis_server srv;
  auto cfg = config({srv.endpoint()});
  cfg.connections_per_server = 2;  // fewer than the threads: calls open extra connections, never wait
  auto tier = open_tier(cfg);
  std::atomic<std::uint64_t> wrong{0}, errors{0}, hits{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t)
    threads.emplace_back([&, t] {
      std::vector<std::byte> out(40000);
      for (std::uint64_t i = 0; i < 150; ++i) {
        const std::uint64_t id = (i + static_cast<std::uint64_t>(t)) % 12;
        if (mix(i * 8 + static_cast<std::uint64_t>(t)) % 3 == 0) {
          if (!tier.put(key(id), payload(id, 10000 + 1000 * (i % 20), i * 16 + static_cast<std::uint64_t>(t)))) errors.fetch_add(1);
        } else if (const auto r = tier.get(key(id), out); r) {
          hits.fetch_add(1);
          if (!payload_ok(std::span(out).first(*r), id)) wrong.fetch_add(1);
        } else if (r.error().code != errc::not_found) {
          errors.fetch_add(1);
        }
        if (i % 30 == 0) tier.remove(key((id + 1) % 12));
      }
    });
  for (auto& th : threads) th.join();
  MESSAGE(hits.load() << " hits of about 600 gets");
  CHECK(wrong.load() == 0);
  CHECK(errors.load() == 0);
  CHECK(hits.load() > 100);
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------------------------

TEST_CASE("redis tier: cluster: slot map discovered from one seed, keys routed to their masters, batches in parallel") {
  kvr::redis_cluster cluster(3);
  auto cfg = config({cluster.node(2).endpoint()}, redis_mode::cluster);  // one seed is enough
  auto tier = open_tier(cfg);
  CHECK(tier.link_stats().slot_refreshes == 1);
  CHECK(tier.link_stats().servers == 3);

  // Our slots are Redis' slots.
  for (std::uint64_t i = 0; i < 40; ++i) {
    const std::string name = tier.key_of(key(i));
    CHECK(cluster.node(0).admin().must({"CLUSTER", "KEYSLOT", name}) == std::to_string(kd::key_hash_slot(name)));
  }

  constexpr std::uint64_t n = 240;
  std::vector<chunk_key> keys;
  std::vector<std::vector<std::byte>> values;
  for (std::uint64_t i = 0; i < n; ++i) {
    keys.push_back(key(i));
    values.push_back(payload(i, 3000 + i));
  }
  std::vector<std::span<const std::byte>> in(values.begin(), values.end());
  auto x0 = tier.link_stats().exchanges;
  for (const auto& p : tier.put_many(keys, in)) REQUIRE(p.has_value());
  CHECK(tier.link_stats().exchanges == x0 + 3);
  CHECK(tier.link_stats().moved == 0);
  for (std::uint64_t i = 0; i < n; i += 12) {
    const int owner = cluster.owner_of(kd::key_hash_slot(tier.key_of(keys[i])));
    REQUIRE(owner >= 0);
    CHECK(tier.server_of(keys[i]) == cluster.node(owner).endpoint());
    for (int m = 0; m < 3; ++m) {
      const auto r = cluster.node(m).admin().command({"EXISTS", tier.key_of(keys[i])});
      REQUIRE(r);
      if (m == owner) {
        CHECK(kvr::reply_text(r.get()) == "1");
      } else {  // the other masters do not hold it: they redirect
        CHECK(r->type == REDIS_REPLY_ERROR);
        CHECK(kvr::reply_text(r.get()).rfind("MOVED ", 0) == 0);
      }
    }
  }

  std::vector<std::vector<std::byte>> bufs(n, std::vector<std::byte>(4000));
  std::vector<std::span<std::byte>> outs(bufs.begin(), bufs.end());
  const auto gets = tier.get_many(keys, outs);
  for (std::uint64_t i = 0; i < n; ++i) {
    REQUIRE(gets[i].has_value());
    CHECK(payload_ok(std::span(bufs[i]).first(*gets[i]), i));
  }
  x0 = tier.link_stats().exchanges;
  CHECK(tier.contains(std::span(keys).first(32)) == 32);
  CHECK(tier.link_stats().exchanges == x0 + 3);  // 32 keys over 3 masters: one round trip, in parallel
  CHECK(tier.ping().has_value());

  // A second tier (another node of the fleet) with another seed reads the same chunks.
  auto peer = open_tier(config({cluster.node(0).endpoint()}, redis_mode::cluster));
  std::vector<std::byte> out(4000);
  for (std::uint64_t i = 0; i < n; i += 7) {
    const auto r = peer.get(keys[i], out);
    REQUIRE(r);
    CHECK(payload_ok(std::span(out).first(*r), i));
  }
  CHECK(peer.contains(keys) == n);

  // A standalone-mode tier pointed at a cluster node is told why its calls fail; a cluster-mode
  // tier pointed at a plain server does not open.
  auto wrong_mode = open_tier(config({cluster.node(0).endpoint()}));
  std::size_t moved_errors = 0;
  for (std::uint64_t i = 0; i < 12; ++i) {
    const auto r = wrong_mode.get(keys[i], out);
    if (!r && contains_text(r.error().message, "redis_mode::cluster")) ++moved_errors;
  }
  CHECK(moved_errors > 0);
  kvr::redis_server plain;
  const auto t = redis_tier::open(config({plain.endpoint()}, redis_mode::cluster));
  REQUIRE_FALSE(t.has_value());
  CHECK(t.error().code == errc::invalid_config);
  CHECK(contains_text(t.error().message, "cluster"));

  // A cluster that does not answer at open (every node stopped): open returns at its timeout
  // without a slot map, calls fail at once, and the map is loaded once the nodes answer.
  for (int i = 0; i < 3; ++i) cluster.node(i).pause();
  auto lazy_cfg = config(cluster.seeds(), redis_mode::cluster);
  lazy_cfg.connect_timeout = 200ms;
  lazy_cfg.reconnect_backoff_max = 200ms;
  kvortex::result<redis_tier> lazy = kvortex::fail(errc::internal, "");
  auto lazy_took = time_of([&] { lazy = redis_tier::open(lazy_cfg); });
  for (int i = 0; i < 3; ++i) cluster.node(i).resume();
  REQUIRE(lazy.has_value());
  CHECK(lazy_took < 200ms + 300ms);
  CHECK(lazy->link_stats().slot_refreshes == 0);
  {
    kvortex::result<std::size_t> r = 0;
    lazy_took = time_of([&] { r = lazy->get(keys[0], out); });
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::backend_failure);
    CHECK(lazy_took < 100ms);  // every seed is backing off: nothing to wait for
  }
  CHECK(eventually(
      [&] {
        const auto r = lazy->get(keys[0], out);
        return r && payload_ok(std::span(out).first(*r), 0);
      },
      3000ms));
  CHECK(lazy->link_stats().slot_refreshes >= 1);
  CHECK(lazy->contains(keys) == n);

  // A hung seed does not hold up the others: the first slot map that arrives wins.
  fake_server mute("", /*accept_connections=*/false);
  auto hung_cfg = config({mute.endpoint(), cluster.node(1).endpoint()}, redis_mode::cluster);
  hung_cfg.connect_timeout = 3000ms;
  hung_cfg.require_connection = true;
  kvortex::result<redis_tier> hung = kvortex::fail(errc::internal, "");
  const auto took = time_of([&] { hung = redis_tier::open(hung_cfg); });
  REQUIRE(hung.has_value());
  CHECK(took < 1000ms);
  CHECK(hung->contains(keys) == n);
  CHECK(hung->link_stats().servers_down == 0);  // set aside, not failed
}

TEST_CASE("redis tier: cluster: ASK during a slot migration, MOVED after it, the slot map follows") {
  kvr::redis_cluster cluster(3);
  auto tier = open_tier(config(cluster.seeds(), redis_mode::cluster));
  const chunk_key k1 = key(1);
  const int slot = kd::key_hash_slot(tier.key_of(k1));
  chunk_key k2{};
  for (std::uint64_t i = 2;; ++i) {  // another key of the same slot
    if (kd::key_hash_slot(tier.key_of(key(i))) == slot) {
      k2 = key(i);
      break;
    }
  }
  const int src = cluster.owner_of(slot);
  REQUIRE(src >= 0);
  const int dst = (src + 1) % 3;
  const auto p1 = payload(1, 20000), p2 = payload(2, 30000);
  REQUIRE(tier.put(k1, p1));

  cluster.node(dst).admin().must({"CLUSTER", "SETSLOT", std::to_string(slot), "IMPORTING", cluster.id(src)});
  cluster.node(src).admin().must({"CLUSTER", "SETSLOT", std::to_string(slot), "MIGRATING", cluster.id(dst)});
  // k2 is not on the source: it answers ASK, and the tier asks the target, once.
  REQUIRE(tier.put(k2, p2));
  CHECK(tier.link_stats().ask == 1);
  std::vector<std::byte> out(40000);
  auto r = tier.get(k2, out);
  REQUIRE(r);
  CHECK(std::equal(p2.begin(), p2.end(), out.begin()));
  r = tier.get(k1, out);  // still on the source
  REQUIRE(r);
  CHECK(std::equal(p1.begin(), p1.end(), out.begin()));
  CHECK(tier.link_stats().ask == 2);
  CHECK(tier.link_stats().moved == 0);
  CHECK(tier.server_of(k1) == cluster.node(src).endpoint());  // ASK does not change the map

  // Move k1, then give the slot to the target everywhere.
  cluster.node(src).admin().must({"MIGRATE", "127.0.0.1", std::to_string(cluster.node(dst).port()), "", "0", "5000", "KEYS", tier.key_of(k1)});
  for (const int n : {dst, src, 3 - src - dst})
    cluster.node(n).admin().must({"CLUSTER", "SETSLOT", std::to_string(slot), "NODE", cluster.id(dst)});
  kvr::redis_cluster::wait_until("every node gives the slot to its new owner", [&] {
    for (int n = 0; n < 3; ++n)
      if (cluster.owner_of(slot, n) != dst) return false;
    return true;
  });
  r = tier.get(k1, out);  // MOVED from the old owner
  REQUIRE(r);
  CHECK(std::equal(p1.begin(), p1.end(), out.begin()));
  CHECK(tier.link_stats().moved == 1);
  CHECK(tier.server_of(k1) == cluster.node(dst).endpoint());
  r = tier.get(k2, out);
  REQUIRE(r);
  CHECK(std::equal(p2.begin(), p2.end(), out.begin()));
  CHECK(tier.link_stats().moved == 1);  // the map was updated: no second redirect
  CHECK(tier.contains(std::array{k1, k2}) == 2);
}

namespace {

// Waits until every replica holds as many keys as its master (the writes were replicated).
void wait_replicated(kvr::redis_cluster& c) {
  kvr::redis_cluster::wait_until("replicas caught up", [&] {
    for (int m = 0; m < c.masters(); ++m)
      if (c.node(m).admin().must({"DBSIZE"}) != c.replica(m, 0).admin().must({"DBSIZE"})) return false;
    return true;
  });
}

}  // namespace

TEST_CASE("redis tier: cluster: a manual failover (CLUSTER FAILOVER) is followed through MOVED") {
  kvr::redis_cluster cluster(3, 1);
  auto tier = open_tier(config({cluster.node(0).endpoint()}, redis_mode::cluster));
  constexpr std::uint64_t n = 90;
  for (std::uint64_t i = 0; i < n; ++i) REQUIRE(tier.put(key(i), payload(i, 4000)));
  wait_replicated(cluster);

  auto& replica = cluster.replica(0, 0);
  replica.admin().must({"CLUSTER", "FAILOVER"});
  kvr::redis_cluster::wait_until("the replica took over", [&] {
    return replica.admin().info("replication", "role") == "master" && cluster.node(0).admin().info("replication", "role") == "slave";
  });
  std::vector<std::byte> out(4000);
  std::uint64_t on_old_master = 0;
  for (std::uint64_t i = 0; i < n; ++i) {
    const bool was_m0 = tier.server_of(key(i)) == cluster.node(0).endpoint();
    const auto r = tier.get(key(i), out);
    REQUIRE(r);
    CHECK(payload_ok(out, i));
    if (was_m0) {
      ++on_old_master;
      CHECK(tier.server_of(key(i)) == replica.endpoint());
    }
  }
  CHECK(on_old_master > 0);
  CHECK(tier.link_stats().moved >= 1);
  CHECK(tier.stats().read_errors == 0);
  CHECK(round_trip(tier, 1000));
}

TEST_CASE("redis tier: cluster: a master killed mid-run: its keys miss fast, then its promoted replica serves them") {
  // Without full coverage required, the other masters keep serving their slots meanwhile (what a
  // deployment that prefers availability runs); with it, they answer CLUSTERDOWN until the
  // promotion, which the tier would report as backend failures.
  kvr::redis_cluster cluster(3, 1, {"--cluster-require-full-coverage", "no"});
  auto cfg = config({cluster.node(0).endpoint(), cluster.node(2).endpoint()}, redis_mode::cluster);
  cfg.command_timeout = 300ms;
  cfg.reconnect_backoff_max = 500ms;
  log_capture log;
  auto tier = open_tier(cfg);
  CHECK(log.count("slot_map_loaded") == 1);
  constexpr std::uint64_t n = 90;
  for (std::uint64_t i = 0; i < n; ++i) REQUIRE(tier.put(key(i), payload(i, 4000)));
  wait_replicated(cluster);

  std::vector<std::uint64_t> lost;
  for (std::uint64_t i = 0; i < n; ++i)
    if (tier.server_of(key(i)) == cluster.node(1).endpoint()) lost.push_back(i);
  REQUIRE_FALSE(lost.empty());
  const auto refreshes = tier.link_stats().slot_refreshes;
  cluster.node(1).kill();

  std::vector<std::byte> out(4000);
  std::chrono::milliseconds slowest{0};
  for (std::uint64_t i = 0; i < n; ++i) {
    kvortex::result<std::size_t> r = 0;
    slowest = std::max(slowest, time_of([&] { r = tier.get(key(i), out); }));
    if (std::find(lost.begin(), lost.end(), i) == lost.end()) {
      REQUIRE(r);
      CHECK(payload_ok(out, i));
    } else if (r) {
      CHECK(payload_ok(out, i));  // promotion may already be done
    }
  }
  CHECK(slowest < 300ms + 300ms);
  const auto t0 = steady::now();
  const bool served = eventually(
      [&] {
        const auto r = tier.get(key(lost.front()), out);
        return r && payload_ok(out, lost.front());
      },
      20000ms);
  REQUIRE(served);
  MESSAGE("the replica served the lost master's keys " << std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - t0).count()
                                                       << " ms after the first retry");
  for (const std::uint64_t i : lost) {
    const auto r = tier.get(key(i), out);
    REQUIRE(r);
    CHECK(payload_ok(out, i));
    CHECK(tier.server_of(key(i)) == cluster.replica(1, 0).endpoint());
  }
  CHECK(tier.link_stats().slot_refreshes > refreshes);
  CHECK(round_trip(tier, lost.front() + 1000));
  // The operator hears of both: the master lost (once), and the map that routes around it.
  const auto lost_log = log.of("connection_lost");
  REQUIRE(lost_log.size() == 1);
  CHECK(contains_text(lost_log[0].message, cluster.node(1).endpoint().text()));
  const auto reloads = log.of("slot_map_reloaded");
  REQUIRE_FALSE(reloads.empty());
  CHECK(reloads.back().level == kvortex::log_level::info);
  CHECK(contains_text(reloads.back().message, "slots moved"));
}

// ---------------------------------------------------------------------------------------------
// What the tier logs (kvortex/logging.hpp)
// ---------------------------------------------------------------------------------------------

TEST_CASE("redis tier: logging: a killed server is reported lost once, and restored when it is back") {
  kvr::redis_server srv;
  auto cfg = config({srv.endpoint()});
  cfg.command_timeout = 200ms;
  cfg.reconnect_backoff_min = 20ms;
  cfg.reconnect_backoff_max = 100ms;
  log_capture log;
  auto tier = open_tier(cfg);
  REQUIRE(round_trip(tier, 1));
  CHECK(log.count("connection_lost") == 0);
  CHECK(log.count("connection_restored") == 0);

  srv.kill();
  std::vector<std::byte> out(1000);
  int failed = 0;
  const auto until = steady::now() + 600ms;
  while (steady::now() < until) {  // many failed calls and reconnection attempts
    failed += tier.get(key(1), out).has_value() ? 0 : 1;
    failed += tier.put(key(2), payload(2, 1000)).has_value() ? 0 : 1;
    std::this_thread::sleep_for(5ms);
  }
  CHECK(failed > 10);
  CHECK(tier.link_stats().connect_failures >= 2);
  const auto lost = log.of("connection_lost");
  REQUIRE(lost.size() == 1);  // once per outage, not once per failed attempt
  CHECK(lost[0].level == kvortex::log_level::warning);
  CHECK(contains_text(lost[0].message, srv.endpoint().text()));
  CHECK(log.count("connection_restored") == 0);

  srv.restart();
  CHECK(eventually([&] { return round_trip(tier, 3); }, 3000ms));
  const auto restored = log.of("connection_restored");
  REQUIRE(restored.size() == 1);
  CHECK(restored[0].level == kvortex::log_level::info);
  CHECK(contains_text(restored[0].message, srv.endpoint().text()));
  CHECK(log.count("connection_lost") == 1);
}

TEST_CASE("redis tier: logging: corrupt values removed, and timeouts rate-limited with the held-back count") {
  kvr::redis_server srv;
  auto cfg = config({srv.endpoint()});
  cfg.command_timeout = 100ms;
  cfg.reconnect_backoff_min = 20ms;
  cfg.reconnect_backoff_max = 40ms;
  log_capture log;
  auto tier = open_tier(cfg);

  // A value that is not a chunk record: a miss, deleted, and one warning naming the chunk.
  srv.admin().must({"SET", tier.key_of(key(1)), "not a chunk record"});
  std::vector<std::byte> out(1000);
  REQUIRE_FALSE(tier.get(key(1), out).has_value());
  const auto corrupt = log.of("corrupt_entry_removed");
  REQUIRE(corrupt.size() == 1);
  CHECK(corrupt[0].level == kvortex::log_level::warning);
  CHECK(contains_text(corrupt[0].message, key(1).hex()));
  CHECK(tier.stats().corrupt_removed == 1);

  // A stopped server: each call after a backoff waits out its timeout; two records get through.
  kvortex::set_log_rate_limit(2, 3'600'000ms);
  const auto timeouts_before = tier.link_stats().timeouts;
  srv.pause();
  const auto until = steady::now() + 1000ms;
  while (steady::now() < until) {
    CHECK_FALSE(tier.get(key(1), out).has_value());
    std::this_thread::sleep_for(10ms);
  }
  srv.resume();
  const auto timeouts = tier.link_stats().timeouts - timeouts_before;
  MESSAGE(timeouts << " timeouts while stopped");
  REQUIRE(timeouts >= 4);
  auto timed_out = log.of("command_timeout");
  REQUIRE(timed_out.size() == 2);
  CHECK(timed_out[0].level == kvortex::log_level::warning);
  CHECK(contains_text(timed_out[0].message, srv.endpoint().text()));
  CHECK(timed_out[0].suppressed == 0);
  CHECK(timed_out[1].suppressed == 0);

  // Once the window ends, the next timeout's record carries the count held back.
  REQUIRE(eventually([&] { return round_trip(tier, 5); }, 2000ms));
  kvortex::set_log_rate_limit(2, 1ms);
  std::this_thread::sleep_for(5ms);
  const auto before_second = tier.link_stats().timeouts;
  srv.pause();
  CHECK_FALSE(tier.get(key(5), out).has_value());
  srv.resume();
  REQUIRE(tier.link_stats().timeouts == before_second + 1);
  timed_out = log.of("command_timeout");
  REQUIRE(timed_out.size() == 3);
  CHECK(timed_out[2].suppressed == timeouts - 2);
}
