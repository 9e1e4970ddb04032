// Redis tier bandwidth and latency against a plain pipelined hiredis loop moving the same bytes
// to the same redis-server in the same run, and a lookup (contains) against one PING.
//
// redis/{put,get}/chunk:{256KiB,1MiB}/batch:{1,16} (and 8 MiB values in batches of 4): every iteration moves 64 MiB of chunks
// twice, once through redis_tier::put_many/get_many (`batch` chunks per call, pipelined: one
// round trip per call) and once as the baseline: hiredis' blocking API with
// redisAppendCommandArgv for `batch` SET (GET) commands of values of the same size (the record
// bytes the tier stores: 128-byte header + payload), then redisGetReply for each. The passes
// alternate, and which goes first alternates, so a drift of the shared machine hits both alike.
// The reported time is the tier's; counters: tier_GBps and hiredis_GBps (payload bytes / s),
// ratio (tier / hiredis), and per call p50/p99 latency of each (tier_p50_us, hiredis_p50_us...).
// The tier's get also checks every value (header, XXH3-64 of the payload) and copies the payload
// into the caller's buffer; the baseline only receives the replies.
//
// redis/contains/keys:32: a lookup of 32 stored chunks (one pipelined EXISTS each, one round
// trip) against a PING round trip on a hiredis connection to the same server, alternating;
// counters: contains and ping p50/p99 in microseconds and p50_ratio (contains / ping), and
// hiredis_exists_p50_us, the same 32 EXISTS pipelined by hand through hiredis (the server's share).
// The /cluster variant runs contains over a 3-master Redis Cluster (3 servers asked in parallel)
// against a PING to one of them.
//
// redis/redis-benchmark/set+get/chunk_KiB:...: redis-benchmark itself (-P 16, one client, values
// of the record's size) on the same server, as a third reference; counters: set_GBps, get_GBps.
//
// The servers are started by the benchmark (tests/redis_support.hpp) on free loopback ports and
// killed at exit. Needs hiredis (KVORTEX_WITH_HIREDIS) and redis-server.

#if defined(KVORTEX_WITH_HIREDIS) && __has_include(<xxhash.h>)

#include <benchmark/benchmark.h>

#include "bench_support.hpp"

#include "../tests/redis_support.hpp"

#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kvortex/detail/chunk_record.hpp"
#include "kvortex/tiers/redis_tier.hpp"

namespace {

using kvb::take;
using clock_type = std::chrono::steady_clock;
constexpr std::size_t bytes_per_pass = std::size_t{64} << 20;

kvr::redis_server& server() {
  static kvr::redis_server s;
  return s;
}

kvr::redis_cluster& cluster() {
  static kvr::redis_cluster c(3);
  return c;
}

kvortex::namespace_digest bench_ns() {
  kvortex::namespace_digest d;
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<std::byte>(i + 3);
  return d;
}

kvortex::chunk_key key(std::uint64_t i) {
  kvortex::chunk_key k;
  std::uint64_t x = i * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  for (std::size_t w = 0; w < 4; ++w) {
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    std::memcpy(k.bytes.data() + 8 * w, &x, 8);
  }
  return k;
}

kvortex::redis_tier open_tier(std::vector<kvortex::redis_endpoint> eps, kvortex::redis_mode mode) {
  kvortex::redis_tier_config c;
  c.servers = std::move(eps);
  c.mode = mode;
  c.ns = bench_ns();
  c.command_timeout = std::chrono::seconds(10);
  c.connect_timeout = std::chrono::seconds(2);
  c.require_connection = true;
  return take(kvortex::redis_tier::open(c), "redis_tier::open");
}

std::vector<std::byte> random_bytes(std::size_t n, std::uint64_t seed) {
  std::vector<std::byte> v(n);
  std::mt19937_64 rng(seed);
  for (std::size_t i = 0; i < n; i += 8) {
    const std::uint64_t x = rng();
    std::memcpy(v.data() + i, &x, std::min<std::size_t>(8, n - i));
  }
  return v;
}

struct hiredis_conn {
  explicit hiredis_conn(int port) {
    kvr::ignore_sigpipe();
    c = redisConnect("127.0.0.1", port);
    if (c == nullptr || c->err != 0) {
      std::fprintf(stderr, "hiredis connect to %d failed\n", port);
      std::abort();
    }
    // As the tier does: without it, Nagle's algorithm holds back the tail of each request.
    const int one = 1;
    ::setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  hiredis_conn(const hiredis_conn&) = delete;
  hiredis_conn& operator=(const hiredis_conn&) = delete;
  ~hiredis_conn() { redisFree(c); }
  redisContext* c{nullptr};
};

// The baseline: `batch` pipelined SETs (or GETs) of `keys[first, first + batch)`; false on a failure.
bool hiredis_batch(redisContext* c, bool set, const std::vector<std::string>& keys, std::size_t first, std::size_t batch,
                   const std::vector<std::byte>& value) {
  for (std::size_t i = first; i < first + batch; ++i) {
    const char* argv[3] = {set ? "SET" : "GET", keys[i].data(), reinterpret_cast<const char*>(value.data())};
    const std::size_t lens[3] = {3, keys[i].size(), value.size()};
    if (redisAppendCommandArgv(c, set ? 3 : 2, argv, lens) != REDIS_OK) return false;
  }
  bool ok = true;
  for (std::size_t i = 0; i < batch; ++i) {
    void* r = nullptr;
    if (redisGetReply(c, &r) != REDIS_OK || r == nullptr) return false;
    const auto* reply = static_cast<redisReply*>(r);
    if (set ? reply->type != REDIS_REPLY_STATUS : (reply->type != REDIS_REPLY_STRING || reply->len != value.size())) ok = false;
    freeReplyObject(r);
  }
  return ok;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto at = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(at, v.size() - 1)];
}

template <class F>
double seconds_of(F&& f) {
  const auto t0 = clock_type::now();
  f();
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

// put (set) or get through the tier and through hiredis, alternating.
void transfer(benchmark::State& state, bool put) {
  const auto chunk = static_cast<std::size_t>(state.range(0)) << 10;
  const auto batch = static_cast<std::size_t>(state.range(1));
  const std::size_t chunks = bytes_per_pass / chunk;
  auto& srv = server();
  auto tier = open_tier({srv.endpoint()}, kvortex::redis_mode::standalone);
  hiredis_conn raw(srv.port());

  const auto payload = random_bytes(chunk, chunk + batch);
  const auto value = kvortex::detail::encode_chunk_record(bench_ns(), key(0), payload);  // same bytes on the wire
  std::vector<kvortex::chunk_key> keys(chunks);
  std::vector<std::string> raw_keys(chunks);
  for (std::size_t i = 0; i < chunks; ++i) {
    keys[i] = key(i + (chunk << 8));
    raw_keys[i] = "bench:raw:" + std::to_string(chunk) + ":" + std::to_string(i);
  }
  std::vector<std::span<const std::byte>> in(batch, std::span<const std::byte>(payload));
  std::vector<std::vector<std::byte>> bufs(batch, std::vector<std::byte>(chunk));
  std::vector<std::span<std::byte>> outs(bufs.begin(), bufs.end());
  if (!put) {  // something to read
    for (std::size_t i = 0; i < chunks; i += batch) {
      for (const auto& r : tier.put_many(std::span(keys).subspan(i, batch), in))
        if (!r) kvb::die("redis_tier::put_many", r.error());
      if (!hiredis_batch(raw.c, true, raw_keys, i, batch, value)) std::abort();
    }
  }

  std::vector<double> tier_lat, raw_lat;
  double tier_s = 0, raw_s = 0;
  bool failed = false;
  std::int64_t n = 0;
  const auto tier_pass = [&] {
    for (std::size_t i = 0; i < chunks; i += batch) {
      const auto ks = std::span(keys).subspan(i, batch);
      const auto t0 = clock_type::now();
      if (put) {
        for (const auto& r : tier.put_many(ks, in)) failed |= !r.has_value();
      } else {
        for (const auto& r : tier.get_many(ks, outs)) failed |= !r.has_value() || *r != chunk;
      }
      tier_lat.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
    }
  };
  const auto raw_pass = [&] {
    for (std::size_t i = 0; i < chunks; i += batch) {
      const auto t0 = clock_type::now();
      failed |= !hiredis_batch(raw.c, put, raw_keys, i, batch, value);
      raw_lat.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
    }
  };
  for (auto _ : state) {
    double t = 0, r = 0;
    if (n++ % 2 == 0) {
      t = seconds_of(tier_pass);
      r = seconds_of(raw_pass);
    } else {
      r = seconds_of(raw_pass);
      t = seconds_of(tier_pass);
    }
    tier_s += t;
    raw_s += r;
    state.SetIterationTime(t);
  }
  if (failed) state.SkipWithError("a transfer failed");
  const double bytes = static_cast<double>(state.iterations()) * static_cast<double>(chunks * chunk);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["tier_GBps"] = bytes / tier_s / 1e9;
  state.counters["hiredis_GBps"] = bytes / raw_s / 1e9;
  state.counters["ratio"] = raw_s / tier_s;
  state.counters["tier_p50_us"] = percentile(tier_lat, 0.50);
  state.counters["tier_p99_us"] = percentile(tier_lat, 0.99);
  state.counters["hiredis_p50_us"] = percentile(raw_lat, 0.50);
  state.counters["hiredis_p99_us"] = percentile(raw_lat, 0.99);
}

void redis_put(benchmark::State& state) { transfer(state, true); }
void redis_get(benchmark::State& state) { transfer(state, false); }

// contains() of 32 stored chunks against one PING on the same (or, for the cluster, one) server.
void contains_vs_ping(benchmark::State& state, bool in_cluster) {
  std::vector<kvortex::redis_endpoint> eps;
  int ping_port;
  if (in_cluster) {
    eps = cluster().seeds();
    ping_port = cluster().node(0).port();
  } else {
    eps = {server().endpoint()};
    ping_port = server().port();
  }
  auto tier = open_tier(eps, in_cluster ? kvortex::redis_mode::cluster : kvortex::redis_mode::standalone);
  hiredis_conn raw(ping_port);
  std::vector<kvortex::chunk_key> keys(32);
  const auto p = random_bytes(4096, 5);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    keys[i] = key(1000000 + i);
    take(tier.put(keys[i], p), "redis_tier::put");
  }
  // In standalone mode also the same 32 EXISTS pipelined by hand on a hiredis connection: the
  // tier's own cost is the difference.
  std::vector<std::string> names;
  for (const auto& k : keys) names.push_back(tier.key_of(k));
  std::vector<double> c_lat, p_lat, e_lat;
  bool failed = false;
  for (auto _ : state) {
    const auto t0 = clock_type::now();
    failed |= tier.contains(keys) != keys.size();
    const auto t1 = clock_type::now();
    auto* r = static_cast<redisReply*>(redisCommand(raw.c, "PING"));
    const auto t2 = clock_type::now();
    failed |= r == nullptr || r->type != REDIS_REPLY_STATUS;
    if (r != nullptr) freeReplyObject(r);
    if (!in_cluster) {
      for (const auto& n : names) redisAppendCommand(raw.c, "EXISTS %b", n.data(), n.size());
      for (std::size_t i = 0; i < names.size(); ++i) {
        void* e = nullptr;
        failed |= redisGetReply(raw.c, &e) != REDIS_OK || e == nullptr || static_cast<redisReply*>(e)->integer != 1;
        if (e != nullptr) freeReplyObject(e);
      }
      e_lat.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t2).count());
    }
    c_lat.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    p_lat.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
  if (failed) state.SkipWithError("contains or PING failed");
  state.counters["contains_p50_us"] = percentile(c_lat, 0.50);
  state.counters["contains_p99_us"] = percentile(c_lat, 0.99);
  state.counters["ping_p50_us"] = percentile(p_lat, 0.50);
  state.counters["ping_p99_us"] = percentile(p_lat, 0.99);
  state.counters["p50_ratio"] = percentile(c_lat, 0.50) / percentile(p_lat, 0.50);
  if (!in_cluster) state.counters["hiredis_exists_p50_us"] = percentile(e_lat, 0.50);
}

void contains_single(benchmark::State& state) { contains_vs_ping(state, false); }
void contains_cluster(benchmark::State& state) { contains_vs_ping(state, true); }

// redis-benchmark -t set,get -d <value bytes> -P 16 -c 1 against the same server (one key, so
// the GETs read what the SETs wrote).
void redis_benchmark_tool(benchmark::State& state) {
  const auto chunk = static_cast<std::size_t>(state.range(0)) << 10;
  const std::size_t requests = bytes_per_pass / chunk;
  const std::string cmd = "redis-benchmark -h 127.0.0.1 -p " + std::to_string(server().port()) + " -t set,get -d " +
                          std::to_string(chunk + kvortex::detail::chunk_record_fixed_bytes) + " -n " + std::to_string(requests) +
                          " -P 16 -c 1 --csv 2>/dev/null";
  double set_rps = 0, get_rps = 0;
  for (auto _ : state) {
    std::FILE* f = ::popen(cmd.c_str(), "r");
    if (f == nullptr) {
      state.SkipWithError("redis-benchmark did not start");
      return;
    }
    char line[512];
    double set = 0, get = 0;
    while (std::fgets(line, sizeof line, f) != nullptr) {
      // "SET","12345.67",...: the second field is requests per second.
      const bool is_set = std::strncmp(line, "\"SET\",\"", 7) == 0, is_get = std::strncmp(line, "\"GET\",\"", 7) == 0;
      if (is_set) set = std::strtod(line + 7, nullptr);
      if (is_get) get = std::strtod(line + 7, nullptr);
    }
    if (::pclose(f) != 0 || set <= 0 || get <= 0) {
      state.SkipWithError("redis-benchmark failed (is redis-tools installed?)");
      return;
    }
    set_rps += set;
    get_rps += get;
    state.SetIterationTime(static_cast<double>(requests) / set + static_cast<double>(requests) / get);
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["set_GBps"] = set_rps / iters * static_cast<double>(chunk) / 1e9;
  state.counters["get_GBps"] = get_rps / iters * static_cast<double>(chunk) / 1e9;
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(2 * requests * chunk));
}

void transfer_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"chunk_KiB", "batch"});
  for (const int kib : {256, 1024})
    for (const int batch : {1, 16}) b->Args({kib, batch});
  b->Args({8192, 4});  // a 256-token chunk of a 1B model, in the batches a tiered retrieve reads
}

}  // namespace

BENCHMARK(redis_put)->Name("redis/put")->Apply(transfer_args)->Unit(benchmark::kMillisecond)->UseManualTime()->MinTime(1.0);
BENCHMARK(redis_get)->Name("redis/get")->Apply(transfer_args)->Unit(benchmark::kMillisecond)->UseManualTime()->MinTime(1.0);
BENCHMARK(contains_single)->Name("redis/contains/keys:32")->Unit(benchmark::kMicrosecond)->UseManualTime()->Iterations(3000);
BENCHMARK(contains_cluster)->Name("redis/contains/keys:32/cluster")->Unit(benchmark::kMicrosecond)->UseManualTime()->Iterations(3000);
BENCHMARK(redis_benchmark_tool)
    ->Name("redis/redis-benchmark/set+get")
    ->ArgName("chunk_KiB")
    ->Arg(256)
    ->Arg(1024)
    ->Unit(benchmark::kMillisecond)
    ->UseManualTime()
    ->Iterations(3);

#endif
