// Prefix lookup and index operations.
//
// lookup/*: one 8192-token prompt (32 chunks of 256 tokens) on one thread, fully stored (hit) or
// with its first chunk missing (miss), for the SHA-256 and the XXH3 stacks. A tiny geometry
// (32 B a token) keeps storing cheap; the bytes never matter to lookup.
// mt/*: the index under contention (1, 2 and 8 threads on one shared engine): lookups of many
// distinct stored prompts, check_blocks of 32 keys, and save_blocks of tiny blocks that keep the
// engine full, so every save evicts.
// index/insert/*: save_blocks of 20,000 keys into a fresh engine, random keys against keys that
// share their first 8 bytes (a flooding attempt); a thread beside it looks a stored prompt up all
// the while, and the slowest of those lookups is the counter max_lookup_us.

#include <benchmark/benchmark.h>

#include "bench_support.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "kvortex/kvortex.hpp"

namespace {

using kvortex::token_id;

#ifdef KVORTEX_HAS_XXH3_HASHER
using xxh3_engine = kvortex::basic_engine<kvortex::host_allocator, kvortex::xxh3_hasher, kvortex::lru_eviction,
                                          kvortex::cpu_backend, kvortex::host_transfer_scheduler>;
#endif

constexpr std::size_t prompt_tokens = 8192;

using kvb::take;

kvortex::engine_config tiny_config(std::size_t capacity_bytes) {
  kvortex::engine_config cfg;
  cfg.ns.model_id = "bench";
  cfg.geometry = {.num_layers = 1, .kv_planes = 2, .kv_heads = 1, .head_dim = 8, .element_bytes = 2};
  cfg.chunk_tokens = 256;
  cfg.capacity_bytes = capacity_bytes;
  cfg.transfer_threads = 1;
  return cfg;
}

std::vector<token_id> random_tokens(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<token_id> dist(0, 128255);
  std::vector<token_id> t(n);
  for (auto& x : t) x = dist(rng);
  return t;
}

// A source cache for `tokens` tokens in the tiny geometry, and the layout over it.
struct tiny_cache {
  explicit tiny_cache(const kvortex::kv_geometry& g, std::size_t tokens)
      : bytes(g.kv_planes * tokens * g.row_bytes(), std::byte{7}) {
    std::byte* layers[] = {bytes.data()};
    layout = take(kvortex::kv_layout::contiguous(layers, g, tokens), "layout");
  }
  std::vector<std::byte> bytes;
  kvortex::kv_layout layout;
};

template <class Engine>
void store_all(Engine& e, const tiny_cache& src, std::span<const token_id> tokens) {
  auto t = take(e.store(tokens, src.layout), "store");
  (void)take(t.wait(), "store wait");
}

// ------------------------------------------------------------------------------------------------
// Single-thread lookup of one 8192-token prompt.

template <class Engine, bool hit>
void lookup_prompt(benchmark::State& state) {
  const auto cfg = tiny_config(std::size_t{64} << 20);
  auto e = take(Engine::create(cfg), "create");
  const tiny_cache src(cfg.geometry, prompt_tokens);
  auto tokens = random_tokens(prompt_tokens, 1);
  store_all(e, src, tokens);
  if (!hit) tokens[0] ^= 1;  // a different first chunk: the chain misses at once
  const std::size_t expect = hit ? prompt_tokens : 0;
  for (auto _ : state) {
    const auto n = e.lookup(tokens);
    if (!n || *n != expect) {
      state.SkipWithError("lookup returned an unexpected count");
      break;
    }
    std::size_t found = *n;  // an lvalue: newer Google Benchmark deprecates DoNotOptimize(const&)
    benchmark::DoNotOptimize(found);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * (hit ? prompt_tokens : 256) * sizeof(token_id)));
}

// The same chain hashed with no index: lookup's cost beyond hashing is the difference.
template <class Engine>
void chunk_keys_prompt(benchmark::State& state) {
  const auto cfg = tiny_config(std::size_t{64} << 20);
  auto e = take(Engine::create(cfg), "create");
  const auto tokens = random_tokens(prompt_tokens, 1);
  for (auto _ : state) {
    auto k = e.chunk_keys(tokens);
    benchmark::DoNotOptimize(k);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * prompt_tokens * sizeof(token_id)));
}

// ------------------------------------------------------------------------------------------------
// Index operations on one engine shared by every benchmark thread.

constexpr std::size_t mt_prompts = 256;
constexpr std::size_t mt_prompt_tokens = 2048;  // 8 chunks: hashing does not drown the index

template <class Engine>
struct shared_index {
  shared_index() : e(take(Engine::create(tiny_config(std::size_t{256} << 20)), "create")) {
    const auto& g = e.config().geometry;
    const tiny_cache src(g, mt_prompt_tokens);
    prompts.reserve(mt_prompts);
    for (std::size_t p = 0; p < mt_prompts; ++p) {
      prompts.push_back(random_tokens(mt_prompt_tokens, static_cast<std::uint32_t>(100 + p)));
      store_all(e, src, prompts.back());
    }
    // 32 keys per check: the chains of four prompts.
    for (std::size_t p = 0; p < mt_prompts; p += 4) {
      std::vector<kvortex::chunk_key> ks;
      for (std::size_t q = p; q < p + 4; ++q) {
        auto k = take(e.chunk_keys(prompts[q]), "chunk_keys");
        ks.insert(ks.end(), k.begin(), k.end());
      }
      key_sets.push_back(std::move(ks));
    }
  }
  Engine e;
  std::vector<std::vector<token_id>> prompts;
  std::vector<std::vector<kvortex::chunk_key>> key_sets;
};

template <class Engine>
shared_index<Engine>& index_for() {
  static shared_index<Engine> s;  // built once, by whichever thread comes first
  return s;
}

template <class Engine>
void mt_lookup(benchmark::State& state) {
  auto& s = index_for<Engine>();
  std::size_t i = static_cast<std::size_t>(state.thread_index()) * 37;
  for (auto _ : state) {
    const auto n = s.e.lookup(s.prompts[i++ % mt_prompts]);
    if (!n || *n != mt_prompt_tokens) {
      state.SkipWithError("lookup missed a stored prompt");
      break;
    }
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

template <class Engine>
void mt_check_blocks(benchmark::State& state) {
  auto& s = index_for<Engine>();
  std::size_t i = static_cast<std::size_t>(state.thread_index()) * 7;
  for (auto _ : state) {
    const auto m = s.e.check_blocks(s.key_sets[i++ % s.key_sets.size()]);
    if (!m || !m->all()) {
      state.SkipWithError("check_blocks missed a stored key");
      break;
    }
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * 32));
}

// save_blocks: 8 new 256-byte blocks per call into an engine that holds 4096 of them, so once
// full every block saved evicts one (allocator free + malloc, LRU churn, index erase + insert).
constexpr std::size_t tiny_block = 256;
constexpr std::size_t save_batch = 8;

template <class Engine>
struct churn_engine {
  churn_engine() : e(take(Engine::create(tiny_config(std::size_t{1} << 20)), "create")) {}
  Engine e;
  std::atomic<std::uint64_t> next{0};
};

template <class Engine>
void mt_save_blocks(benchmark::State& state) {
  static churn_engine<Engine> s;
  std::vector<std::byte> payload(tiny_block * save_batch, std::byte{3});
  std::vector<const std::byte*> ptrs(save_batch);
  const std::vector<std::size_t> sizes(save_batch, tiny_block);
  for (std::size_t j = 0; j < save_batch; ++j) ptrs[j] = payload.data() + j * tiny_block;
  std::vector<kvortex::chunk_key> keys(save_batch);
  for (auto _ : state) {
    const std::uint64_t base = s.next.fetch_add(save_batch, std::memory_order_relaxed);
    for (std::size_t j = 0; j < save_batch; ++j) {
      // Distinct keys, spread over the hash's 8 leading bytes like real digests.
      const std::uint64_t v = (base + j) * 0x9E3779B97F4A7C15ULL;
      std::memcpy(keys[j].bytes.data(), &v, sizeof v);
      std::memcpy(keys[j].bytes.data() + 8, &base, sizeof base);
    }
    const auto n = s.e.save_blocks(keys, ptrs, sizes);
    if (!n || *n != save_batch) {
      state.SkipWithError("save_blocks stored fewer blocks than asked");
      break;
    }
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * save_batch));
  if (state.thread_index() == 0) state.counters["evictions"] = static_cast<double>(s.e.stats().evictions);
}

// ------------------------------------------------------------------------------------------------
// Index inserts with caller-chosen keys.

constexpr std::size_t flood_keys = 20000;

std::vector<kvortex::chunk_key> insert_keys(bool flooding) {
  std::vector<kvortex::chunk_key> keys(flood_keys);
  std::mt19937_64 rng(42);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    for (std::size_t w = 0; w < 4; ++w) {
      std::uint64_t v = rng();
      if (flooding && w == 0) v = 0xABABABABABABABABULL;  // the first 8 bytes equal in every key
      std::memcpy(keys[i].bytes.data() + 8 * w, &v, sizeof v);
    }
  }
  return keys;
}

void index_insert(benchmark::State& state, bool flooding) {
  const auto keys = insert_keys(flooding);
  std::vector<std::byte> payload(64, std::byte{5});
  const std::vector<const std::byte*> ptrs(keys.size(), payload.data());
  const std::vector<std::size_t> sizes(keys.size(), payload.size());
  const auto prompt = random_tokens(2048, 9);
  double worst_us = 0;
  for (auto _ : state) {
    state.PauseTiming();
    auto cfg = tiny_config(std::size_t{64} << 20);
    auto e = take(kvortex::host_engine::create(cfg), "create");
    const tiny_cache src(cfg.geometry, prompt.size());
    store_all(e, src, prompt);
    std::atomic<bool> stop{false};
    std::thread looker([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        const auto t0 = std::chrono::steady_clock::now();
        (void)e.lookup(prompt);
        worst_us = std::max(worst_us, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      }
    });
    state.ResumeTiming();
    const auto n = e.save_blocks(keys, ptrs, sizes);
    state.PauseTiming();
    stop = true;
    looker.join();
    if (!n || *n != keys.size()) {
      state.SkipWithError("save_blocks stored fewer keys than asked");
      break;
    }
    state.ResumeTiming();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * keys.size()));
  state.counters["max_lookup_us"] = worst_us;
}

}  // namespace

BENCHMARK_CAPTURE(index_insert, random, false)->Name("index/insert/random/keys:20000")
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(index_insert, flooding, true)->Name("index/insert/flooding/keys:20000")
    ->Unit(benchmark::kMillisecond)->UseRealTime();

// Targets (one core): full-hit lookup of 8192 tokens <= 25 us with SHA-256, <= 5 us with XXH3.
BENCHMARK_TEMPLATE(lookup_prompt, kvortex::host_engine, true)->Name("lookup/sha256/hit/tokens:8192")
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(lookup_prompt, kvortex::host_engine, false)->Name("lookup/sha256/miss/tokens:8192")
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(chunk_keys_prompt, kvortex::host_engine)->Name("lookup/sha256/chunk_keys_only/tokens:8192")
    ->Unit(benchmark::kMicrosecond);
#ifdef KVORTEX_HAS_XXH3_HASHER
BENCHMARK_TEMPLATE(lookup_prompt, xxh3_engine, true)->Name("lookup/xxh3/hit/tokens:8192")
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(lookup_prompt, xxh3_engine, false)->Name("lookup/xxh3/miss/tokens:8192")
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(chunk_keys_prompt, xxh3_engine)->Name("lookup/xxh3/chunk_keys_only/tokens:8192")
    ->Unit(benchmark::kMicrosecond);
#endif

BENCHMARK_TEMPLATE(mt_lookup, kvortex::host_engine)->Name("mt/lookup/sha256/tokens:2048")
    ->Threads(1)->Threads(2)->Threads(8)->UseRealTime()->Unit(benchmark::kMicrosecond);
#ifdef KVORTEX_HAS_XXH3_HASHER
BENCHMARK_TEMPLATE(mt_lookup, xxh3_engine)->Name("mt/lookup/xxh3/tokens:2048")
    ->Threads(1)->Threads(2)->Threads(8)->UseRealTime()->Unit(benchmark::kMicrosecond);
#endif
BENCHMARK_TEMPLATE(mt_check_blocks, kvortex::host_engine)->Name("mt/check_blocks/keys:32")
    ->Threads(1)->Threads(2)->Threads(8)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(mt_save_blocks, kvortex::host_engine)->Name("mt/save_blocks_evicting/blocks:8x256B")
    ->Threads(1)->Threads(2)->Threads(8)->UseRealTime()->Unit(benchmark::kMicrosecond);
