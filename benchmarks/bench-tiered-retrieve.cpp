// `retrieve` of an 8192-token prompt whose chunks are only below host memory (on the disk tier, or
// in Redis), against the sum of its parts measured in the same iteration.
//
// tiered_retrieve/{disk,redis}/tokens:8192: a Llama-3.2-1B-shaped KV (16 layers, 8 KV heads x 64,
// bf16: 32 KiB a token, 256 MiB for the prompt, 32 chunks of 256 tokens) was stored once through
// a write-through engine whose host memory (a numa_pool_allocator pool, so pages are reused as in a
// server that has run a while) holds exactly one such prompt. Every iteration, untimed, stores a
// second prompt of the same size, which evicts the first from memory (it stays in the tier), then
// times three things:
//   - the retrieve into a FlashAttention NHD paged cache with a random block table: promotion
//     reads `promotion_batch_chunks` (4) chunks per batch from the tier into reserved memory while
//     the previous batch is copied into the cache (reported time; counter retrieve_GBps);
//   - the tier's reads alone: the same 32 chunks read with the tier's own calls into host buffers
//     (disk_tier::get, or redis_tier::get_many in batches of 4) (read_s);
//   - the copies alone: a second retrieve of the same prompt, now from host memory (copy_s).
// Counters: read_s, copy_s, sum_s = read_s + copy_s, ratio_to_sum = retrieve / sum (below 1 means
// the reads and the copies overlapped), and promoted (chunks brought up per retrieve, 32 when
// nothing failed).
//
// The disk directory is a fresh one under $KVORTEX_BENCH_DIR, else $TMPDIR, else /tmp; the Redis
// server is started by the benchmark (tests/redis_support.hpp) on a free loopback port.

#if defined(KVORTEX_WITH_XXHASH) && __has_include(<xxhash.h>)

#include <benchmark/benchmark.h>

#include "bench_support.hpp"

#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kvortex/kvortex.hpp"
#include "kvortex/tiers/disk_tier.hpp"

#if defined(KVORTEX_WITH_HIREDIS)
#include "../tests/redis_support.hpp"
#include "kvortex/tiers/redis_tier.hpp"
#endif

namespace {

constexpr std::size_t prompt_tokens = 8192;
constexpr std::size_t block_tokens = 16;
constexpr kvortex::kv_geometry geometry{.num_layers = 16, .kv_planes = 2, .kv_heads = 8, .head_dim = 64, .element_bytes = 2};

kvortex::engine_config bench_config() {
  kvortex::engine_config c;
  c.ns.model_id = "bench-llama-3.2-1b";
  c.geometry = geometry;
  c.chunk_tokens = 256;
  c.block_tokens = block_tokens;
  c.capacity_bytes = std::size_t{256} << 20;  // one prompt
  c.tiering.write = kvortex::write_policy::write_through;
  c.tiering.promotion_timeout = std::chrono::seconds(60);
  return c;
}

// The inference engine's paged cache, per layer [2][blocks][16][8][64] bf16, and a random table.
struct bench_cache {
  std::size_t blocks = prompt_tokens / block_tokens + 16;
  std::vector<std::unique_ptr<std::byte[]>> layers;
  std::vector<std::byte*> ptrs;
  std::vector<std::int32_t> table;
  bench_cache() {
    const std::size_t bytes = 2 * blocks * block_tokens * geometry.row_bytes();
    for (std::size_t l = 0; l < geometry.num_layers; ++l) {
      layers.push_back(std::make_unique_for_overwrite<std::byte[]>(bytes));
      std::memset(layers.back().get(), 1, bytes);
      ptrs.push_back(layers.back().get());
    }
    table.resize(blocks);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(7));
    table.resize(prompt_tokens / block_tokens);
  }
  [[nodiscard]] kvortex::kv_layout layout() const {
    return kvortex::kv_layout::flash_attn(ptrs, geometry, blocks, block_tokens, kvortex::kv_order::nhd).value();
  }
};

std::vector<kvortex::token_id> prompt(std::uint32_t seed = 11) {
  std::vector<kvortex::token_id> t(prompt_tokens);
  std::mt19937 rng(seed);
  for (auto& x : t) x = static_cast<kvortex::token_id>(rng() % 128000);
  return t;
}

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One iteration's three timings over engine `e` (fresh: memory empty) and a reader of the tier.
template <class Engine, class ReadAll>
void measure(benchmark::State& state, Engine& e, ReadAll&& read_all, bench_cache& cache,
             const std::vector<kvortex::token_id>& tokens, double& retr_s, double& read_s, double& copy_s,
             double& promoted) {
  const auto layout = cache.layout();
  const auto t0 = std::chrono::steady_clock::now();
  auto r = e.retrieve(tokens, layout, cache.table);
  auto n = r ? r->wait() : kvortex::result<std::size_t>(std::unexpected(r.error()));
  const double retrieve_s = since(t0);
  if (!n || *n != tokens.size()) {
    state.SkipWithError(("retrieve served " + (n ? std::to_string(*n) : n.error().message) + " tokens").c_str());
    return;
  }
  state.SetIterationTime(retrieve_s);
  retr_s += retrieve_s;
  promoted += static_cast<double>(e.stats().tiers[0].promoted_chunks);  // the caller subtracts the earlier count
  const auto t1 = std::chrono::steady_clock::now();
  read_all();
  read_s += since(t1);
  const auto t2 = std::chrono::steady_clock::now();
  auto again = e.retrieve(tokens, layout, cache.table);
  if (!again || !again->wait()) {
    state.SkipWithError("the retrieve from memory failed");
    return;
  }
  copy_s += since(t2);
}

void report(benchmark::State& state, double retr_s, double read_s, double copy_s, double promoted) {
  const double it = static_cast<double>(state.iterations());
  if (it == 0) return;
  const double bytes = double(prompt_tokens) * double(geometry.token_bytes());
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes * it));
  state.counters["read_s"] = read_s / it;
  state.counters["copy_s"] = copy_s / it;
  state.counters["sum_s"] = (read_s + copy_s) / it;
  state.counters["ratio_to_sum"] = read_s + copy_s > 0 ? retr_s / (read_s + copy_s) : 0;
  state.counters["promoted"] = promoted / it;
  state.counters["retrieve_GBps"] =
      benchmark::Counter(bytes * it / 1e9, benchmark::Counter::kIsRate);  // over the manual time
}

struct disk_fixture {
  std::string dir;
  disk_fixture() {
    const char* base = std::getenv("KVORTEX_BENCH_DIR");
    if (base == nullptr || *base == '\0') base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/kvortex-bench-tiers-XXXXXX";
    if (::mkdtemp(tmpl.data()) != nullptr) dir = tmpl;
  }
  ~disk_fixture() {
    std::error_code ec;
    if (!dir.empty()) std::filesystem::remove_all(dir, ec);
  }
  [[nodiscard]] kvortex::result<kvortex::disk_tier> open(const kvortex::engine_config& c) const {
    kvortex::disk_tier_config d;
    d.directory = dir;
    d.capacity_bytes = std::uint64_t{1} << 30;
    d.ns = kvortex::tier_namespace<kvortex::sha256_hasher>(c).value();
    return kvortex::disk_tier::open(d);
  }
};

template <class Tier>
using pooled_engine = kvortex::basic_engine<kvortex::numa_pool_allocator, kvortex::sha256_hasher, kvortex::lru_eviction,
                                            kvortex::tiered_backend<kvortex::cpu_backend, Tier>,
                                            kvortex::host_transfer_scheduler>;

// The iterations over an engine whose tier already holds `tokens`.
template <class Engine, class ReadAll>
void iterate(benchmark::State& state, Engine& e, ReadAll&& read_all, bench_cache& cache,
             const std::vector<kvortex::token_id>& tokens) {
  const auto filler = prompt(12);
  double retr_s = 0, read_s = 0, copy_s = 0, promoted = 0;
  for (auto _ : state) {
    state.PauseTiming();
    auto s = e.store(filler, cache.layout(), cache.table);  // evicts `tokens` from memory
    if (!s || !s->wait()) return state.SkipWithError("the filler store failed");
    e.flush();
    auto where = e.lookup_tiers(tokens);
    if (!where || where->memory_tokens != 0 || where->tokens != tokens.size())
      return state.SkipWithError("the prompt is not (only) in the tier");
    const auto before = e.stats().tiers[0].promoted_chunks;
    state.ResumeTiming();
    measure(state, e, read_all, cache, tokens, retr_s, read_s, copy_s, promoted);
    promoted -= static_cast<double>(before);
  }
  report(state, retr_s, read_s, copy_s, promoted);
}

template <class Tier>
kvortex::result<pooled_engine<Tier>> make_pooled(const kvortex::engine_config& c, Tier tier) {
  auto a = kvortex::numa_pool_allocator::create(c);
  if (!a) return std::unexpected(a.error());
  auto h = kvortex::sha256_hasher::create();
  if (!h) return std::unexpected(h.error());
  auto s = kvortex::host_transfer_scheduler::create(c);
  if (!s) return std::unexpected(s.error());
  return pooled_engine<Tier>::create(c, std::move(*a), std::move(*h), kvortex::lru_eviction{},
                                     kvortex::tiered_backend<kvortex::cpu_backend, Tier>(kvortex::cpu_backend{}, std::move(tier)),
                                     std::move(*s));
}

void tiered_retrieve_disk(benchmark::State& state) {
  const auto c = bench_config();
  const auto tokens = prompt();
  disk_fixture fx;
  bench_cache cache;
  if (fx.dir.empty()) return state.SkipWithError("no temporary directory");
  auto t = fx.open(c);
  if (!t) return state.SkipWithError(t.error().message.c_str());
  auto e = make_pooled(c, std::move(*t));
  if (!e) return state.SkipWithError(e.error().message.c_str());
  auto st = e->store(tokens, cache.layout(), cache.table);
  if (!st || !st->wait()) return state.SkipWithError("store failed");
  e->flush();
  const auto keys = e->chunk_keys(tokens).value();
  std::vector<std::byte> buffer(c.chunk_bytes());
  auto& tier = e->get_backend().template tier<0>();
  iterate(state, *e, [&] {
    for (const auto& k : keys) benchmark::DoNotOptimize(tier.get(k, buffer));
  }, cache, tokens);
}
BENCHMARK(tiered_retrieve_disk)->Name("tiered_retrieve/disk/tokens:8192")->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);

#if defined(KVORTEX_WITH_HIREDIS)
void tiered_retrieve_redis(benchmark::State& state) {
  const auto c = bench_config();
  const auto tokens = prompt();
  bench_cache cache;
  static kvr::redis_server server = [] {
    kvr::server_options o;
    o.args = {"--maxmemory", "2gb", "--proto-max-bulk-len", "64mb"};
    return kvr::redis_server(o);
  }();
  kvortex::redis_tier_config rc;
  rc.servers = {server.endpoint()};
  rc.ns = kvortex::tier_namespace<kvortex::sha256_hasher>(c).value();
  rc.command_timeout = std::chrono::seconds(5);
  rc.connect_timeout = std::chrono::seconds(2);
  rc.require_connection = true;
  auto t = kvortex::redis_tier::open(rc);
  if (!t) return state.SkipWithError(t.error().message.c_str());
  auto e = make_pooled(c, std::move(*t));
  if (!e) return state.SkipWithError(e.error().message.c_str());
  auto st = e->store(tokens, cache.layout(), cache.table);
  if (!st || !st->wait()) return state.SkipWithError("store failed");
  e->flush();
  if (e->stats().tiers[0].demoted_chunks != prompt_tokens / c.chunk_tokens)
    return state.SkipWithError("not every chunk reached Redis");
  const auto keys = e->chunk_keys(tokens).value();
  std::vector<std::vector<std::byte>> buffers(4, std::vector<std::byte>(c.chunk_bytes()));
  std::vector<std::span<std::byte>> outs(buffers.begin(), buffers.end());
  auto& tier = e->get_backend().template tier<0>();
  iterate(state, *e, [&] {
    for (std::size_t i = 0; i < keys.size(); i += 4) {
      const std::size_t n = std::min<std::size_t>(4, keys.size() - i);
      benchmark::DoNotOptimize(tier.get_many(std::span(keys).subspan(i, n), std::span(outs).first(n)));
    }
  }, cache, tokens);
}
BENCHMARK(tiered_retrieve_redis)->Name("tiered_retrieve/redis/tokens:8192")->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
#endif

}  // namespace

#endif
