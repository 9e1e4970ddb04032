// Host store and retrieve bandwidth against plain memcpy of the same bytes.
//
// Geometry: 1 layer, K and V, 8 KV heads x 128 x 2 B: 4 KiB a token, so a 256-token chunk is
// exactly 1 MiB. A prompt of 64 chunks (16384 tokens, 64 MiB) moves between a contiguous cache
// (`[K|V][token][heads*dim]`) and 64 chunk blocks; each chunk is two 512 KiB runs (its K rows,
// then its V rows).
//
// Page faults decide such comparisons: a copy into never-touched memory runs at a fraction of a
// copy into resident memory. The engine recycles chunk memory (an evicted chunk's block goes back
// to the heap and the next store takes it again), so the fair baseline is memcpy into a resident,
// reused destination: memcpy/reused. memcpy/fresh_destination shows what first touch costs.
// Each benchmark reports minor page faults per iteration to show which regime it ran in.
// host_engine takes chunks from the C heap (host_allocator); pool_engine from numa_pool_allocator's
// slabs, which keep freed chunks mapped.

#include <benchmark/benchmark.h>

#include "bench_support.hpp"
#include <sys/resource.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "kvortex/kvortex.hpp"

namespace {

using kvortex::token_id;

// The host stack with the slab pool instead of the C heap: freed chunks stay mapped for reuse.
using pool_engine = kvortex::basic_engine<kvortex::numa_pool_allocator, kvortex::sha256_hasher, kvortex::lru_eviction,
                                          kvortex::cpu_backend, kvortex::host_transfer_scheduler>;

constexpr std::size_t chunk_tokens = 256;
constexpr std::size_t prompt_chunks = 64;
constexpr std::size_t prompt_tokens = chunk_tokens * prompt_chunks;
constexpr kvortex::kv_geometry geometry{.num_layers = 1, .kv_planes = 2, .kv_heads = 8, .head_dim = 128, .element_bytes = 2};
constexpr std::size_t chunk_bytes = chunk_tokens * geometry.token_bytes();
static_assert(chunk_bytes == std::size_t{1} << 20);
constexpr std::size_t total_bytes = chunk_bytes * prompt_chunks;
constexpr std::size_t half_chunk = chunk_bytes / 2;  // one plane's rows of one chunk

using kvb::take;

// The ticket's count, or the error of submitting or of the copy (GCC 12's std::expected has no
// and_then).
kvortex::result<std::size_t> waited(const kvortex::result<kvortex::transfer_ticket>& t) {
  if (!t) return std::unexpected(t.error());
  return t->wait();
}

long minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

// Resident, page-aligned memory, touched once so the timed copies never fault on it.
struct buffer {
  explicit buffer(std::size_t n) : size(n), data(static_cast<std::byte*>(std::aligned_alloc(4096, n))) {
    if (data == nullptr) std::abort();
    std::memset(data, 0x5A, n);
  }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  ~buffer() { std::free(data); }
  std::size_t size;
  std::byte* data;
};

// The contiguous cache of one layer: [plane][prompt_tokens][row].
constexpr std::size_t cache_bytes = geometry.kv_planes * prompt_tokens * geometry.row_bytes();
static_assert(cache_bytes == total_bytes);

kvortex::kv_layout contiguous_layout(std::byte* base) {
  std::byte* layers[] = {base};
  return take(kvortex::kv_layout::contiguous(layers, geometry, prompt_tokens), "layout");
}

kvortex::engine_config transfer_config(unsigned threads) {
  kvortex::engine_config cfg;
  cfg.ns.model_id = "bench";
  cfg.geometry = geometry;
  cfg.chunk_tokens = chunk_tokens;
  cfg.block_tokens = 16;
  cfg.capacity_bytes = total_bytes;  // exactly one prompt: every store evicts the previous one
  cfg.transfer_threads = threads;
  return cfg;
}

// Distinct tokens per prompt, so no store is deduplicated.
void fill_prompt(std::vector<token_id>& t, std::uint64_t n) {
  const auto base = static_cast<token_id>((n * prompt_tokens) % 100'000'000);
  std::iota(t.begin(), t.end(), base);
}

void finish(benchmark::State& state, long faults_before, std::size_t bytes_per_iter) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes_per_iter));
  state.counters["minflt_per_iter"] =
      benchmark::Counter(static_cast<double>(minor_faults() - faults_before), benchmark::Counter::kAvgIterations);
}

// The memcpy pattern of one store or retrieve: per chunk, its K run and its V run, each 512 KiB.
void copy_chunks(std::byte* cache, std::byte* const* chunks, std::size_t first, std::size_t last, bool to_chunk) {
  for (std::size_t c = first; c < last; ++c)
    for (std::size_t p = 0; p < geometry.kv_planes; ++p) {
      std::byte* cache_run = cache + p * (cache_bytes / geometry.kv_planes) + c * half_chunk;
      std::byte* chunk_run = chunks[c] + p * half_chunk;
      if (to_chunk)
        std::memcpy(chunk_run, cache_run, half_chunk);
      else
        std::memcpy(cache_run, chunk_run, half_chunk);
    }
}

// Splits the chunks across `threads` threads, the caller's included (starting a thread costs tens
// of microseconds against milliseconds of copying).
void copy_chunks_parallel(std::byte* cache, std::byte* const* chunks, bool to_chunk, unsigned threads) {
  std::vector<std::jthread> pool;
  for (unsigned t = 1; t < threads; ++t)
    pool.emplace_back([=] {
      copy_chunks(cache, chunks, prompt_chunks * t / threads, prompt_chunks * (t + 1) / threads, to_chunk);
    });
  copy_chunks(cache, chunks, 0, prompt_chunks / threads, to_chunk);
}

// ------------------------------------------------------------------------------------------------
// Baselines. range(0): copy threads.

// 64 separate 1 MiB blocks, allocated once and reused: what the engine's chunks look like.
void memcpy_reused(benchmark::State& state, bool to_chunk) {
  const auto threads = static_cast<unsigned>(state.range(0));
  buffer cache(cache_bytes);
  std::vector<buffer*> blocks;
  std::vector<std::byte*> ptrs;
  for (std::size_t c = 0; c < prompt_chunks; ++c) {
    blocks.push_back(new buffer(chunk_bytes));
    ptrs.push_back(blocks.back()->data);
  }
  copy_chunks_parallel(cache.data, ptrs.data(), to_chunk, threads);  // warm-up
  const long f0 = minor_faults();
  for (auto _ : state) {
    copy_chunks_parallel(cache.data, ptrs.data(), to_chunk, threads);
    benchmark::ClobberMemory();
  }
  finish(state, f0, total_bytes);
  for (auto* b : blocks) delete b;
}
void memcpy_store_reused(benchmark::State& state) { memcpy_reused(state, true); }
void memcpy_retrieve_reused(benchmark::State& state) { memcpy_reused(state, false); }

// One memcpy of all 64 MiB between two resident buffers: the copy-engine ceiling.
void memcpy_single(benchmark::State& state) {
  buffer src(total_bytes), dst(total_bytes);
  std::memcpy(dst.data, src.data, total_bytes);
  const long f0 = minor_faults();
  for (auto _ : state) {
    std::memcpy(dst.data, src.data, total_bytes);
    benchmark::ClobberMemory();
  }
  finish(state, f0, total_bytes);
}

// Fresh 1 MiB blocks every iteration (malloc, copy, free): first touch of new pages each time
// when the heap hands memory back to the kernel in between.
void memcpy_fresh(benchmark::State& state) {
  buffer cache(cache_bytes);
  std::vector<std::byte*> ptrs(prompt_chunks);
  const long f0 = minor_faults();
  for (auto _ : state) {
    for (auto& p : ptrs) p = static_cast<std::byte*>(std::aligned_alloc(64, chunk_bytes));
    copy_chunks(cache.data, ptrs.data(), 0, prompt_chunks, true);
    benchmark::ClobberMemory();
    state.PauseTiming();
    for (auto* p : ptrs) std::free(p);
    state.ResumeTiming();
  }
  finish(state, f0, total_bytes);
}

// ------------------------------------------------------------------------------------------------
// The engine. range(0): transfer_threads.

// store() + wait() of a new 64-chunk prompt; the engine holds one prompt, so each store first
// evicts the previous prompt's chunks and reuses their memory through the allocator.
template <class Engine>
void engine_store(benchmark::State& state) {
  auto e = take(Engine::create(transfer_config(static_cast<unsigned>(state.range(0)))), "create");
  buffer cache(cache_bytes);
  const auto layout = contiguous_layout(cache.data);
  std::vector<token_id> tokens(prompt_tokens);
  std::uint64_t n = 0;
  for (int warm = 0; warm < 2; ++warm) {  // fill, then recycle once, so the heap holds the blocks
    fill_prompt(tokens, n++);
    (void)take(take(e.store(tokens, layout), "store").wait(), "store wait");
  }
  const long f0 = minor_faults();
  for (auto _ : state) {
    state.PauseTiming();
    fill_prompt(tokens, n++);
    state.ResumeTiming();
    const auto got = waited(e.store(tokens, layout));
    if (!got || *got != prompt_tokens) {
      state.SkipWithError(got ? "store wrote fewer tokens than asked" : got.error().message.c_str());
      break;
    }
  }
  finish(state, f0, total_bytes);
  state.counters["evictions_per_iter"] =
      benchmark::Counter(static_cast<double>(e.stats().evictions), benchmark::Counter::kAvgIterations);
}

// retrieve() + wait() of a stored 64-chunk prompt into a resident contiguous cache.
template <class Engine>
void engine_retrieve(benchmark::State& state) {
  auto e = take(Engine::create(transfer_config(static_cast<unsigned>(state.range(0)))), "create");
  buffer src(cache_bytes), dst(cache_bytes);
  std::vector<token_id> tokens(prompt_tokens);
  fill_prompt(tokens, 0);
  (void)take(take(e.store(tokens, contiguous_layout(src.data)), "store").wait(), "store wait");
  const auto layout = contiguous_layout(dst.data);
  (void)take(take(e.retrieve(tokens, layout), "retrieve").wait(), "retrieve wait");
  const long f0 = minor_faults();
  for (auto _ : state) {
    const auto got = waited(e.retrieve(tokens, layout));
    if (!got || *got != prompt_tokens) {
      state.SkipWithError(got ? "retrieve copied fewer tokens than stored" : got.error().message.c_str());
      break;
    }
  }
  finish(state, f0, total_bytes);
}

// retrieve() into vLLM's FlashAttention paged cache (NHD, 16-token blocks) through a random block
// table: 1024 scattered 32 KiB runs per plane instead of 64 runs of 512 KiB.
constexpr std::size_t paged_block_tokens = 16;

template <class Engine>
void engine_retrieve_paged(benchmark::State& state) {
  auto e = take(Engine::create(transfer_config(static_cast<unsigned>(state.range(0)))), "create");
  buffer src(cache_bytes);
  std::vector<token_id> tokens(prompt_tokens);
  fill_prompt(tokens, 0);
  (void)take(take(e.store(tokens, contiguous_layout(src.data)), "store").wait(), "store wait");
  // Twice the blocks the prompt needs, so the table really scatters.
  const std::size_t num_blocks = 2 * prompt_tokens / paged_block_tokens;
  buffer paged(geometry.kv_planes * num_blocks * paged_block_tokens * geometry.row_bytes());
  std::byte* layers[] = {paged.data};
  const auto layout =
      take(kvortex::kv_layout::flash_attn(layers, geometry, num_blocks, paged_block_tokens, kvortex::kv_order::nhd),
           "flash_attn layout");
  std::vector<std::int32_t> table(num_blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(7));
  table.resize(prompt_tokens / paged_block_tokens);
  (void)take(take(e.retrieve(tokens, layout, table), "retrieve").wait(), "retrieve wait");
  const long f0 = minor_faults();
  for (auto _ : state) {
    const auto got = waited(e.retrieve(tokens, layout, table));
    if (!got || *got != prompt_tokens) {
      state.SkipWithError(got ? "retrieve copied fewer tokens than stored" : got.error().message.c_str());
      break;
    }
  }
  finish(state, f0, total_bytes);
}

// The same scattered pattern with plain memcpy, from resident chunk blocks.
void memcpy_retrieve_paged(benchmark::State& state) {
  std::vector<buffer*> blocks;
  for (std::size_t c = 0; c < prompt_chunks; ++c) blocks.push_back(new buffer(chunk_bytes));
  const std::size_t num_blocks = 2 * prompt_tokens / paged_block_tokens;
  const std::size_t run = paged_block_tokens * geometry.row_bytes();  // one block of one plane
  buffer paged(geometry.kv_planes * num_blocks * run);
  std::vector<std::int32_t> table(num_blocks);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(7));
  const std::size_t blocks_per_chunk = chunk_tokens / paged_block_tokens;
  const auto copy_all = [&] {
    for (std::size_t c = 0; c < prompt_chunks; ++c)
      for (std::size_t p = 0; p < geometry.kv_planes; ++p)
        for (std::size_t b = 0; b < blocks_per_chunk; ++b) {
          const auto phys = static_cast<std::size_t>(table[c * blocks_per_chunk + b]);
          std::memcpy(paged.data + (p * num_blocks + phys) * run, blocks[c]->data + p * half_chunk + b * run, run);
        }
  };
  copy_all();
  const long f0 = minor_faults();
  for (auto _ : state) {
    copy_all();
    benchmark::ClobberMemory();
  }
  finish(state, f0, total_bytes);
  for (auto* b : blocks) delete b;
}

}  // namespace

// One-core group (run pinned to one core): rates from CPU time, which a busy machine's other
// processes do not inflate; every copy runs on the benchmark's own thread.
BENCHMARK(memcpy_single)->Name("transfer/memcpy/one_64MiB_copy")->Unit(benchmark::kMillisecond);
BENCHMARK(memcpy_store_reused)->Name("transfer/memcpy/store_pattern/reused")->ArgName("threads")->Arg(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(memcpy_retrieve_reused)->Name("transfer/memcpy/retrieve_pattern/reused")->ArgName("threads")->Arg(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(memcpy_fresh)->Name("transfer/memcpy/store_pattern/fresh_destination")->Unit(benchmark::kMillisecond);
BENCHMARK(memcpy_retrieve_paged)->Name("transfer/memcpy/retrieve_flash_attn_random_table")
    ->Unit(benchmark::kMillisecond);

// Targets: store and retrieve >= 80% of memcpy/*_pattern/reused at the same thread count.
BENCHMARK_TEMPLATE(engine_store, kvortex::host_engine)->Name("transfer/host_engine/store")
    ->ArgName("transfer_threads")->Arg(1)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(engine_retrieve, kvortex::host_engine)->Name("transfer/host_engine/retrieve")
    ->ArgName("transfer_threads")->Arg(1)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(engine_retrieve_paged, kvortex::host_engine)->Name("transfer/host_engine/retrieve_flash_attn_random_table")
    ->ArgName("transfer_threads")->Arg(1)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(engine_store, pool_engine)->Name("transfer/pool_engine/store")
    ->ArgName("transfer_threads")->Arg(1)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(engine_retrieve, pool_engine)->Name("transfer/pool_engine/retrieve")
    ->ArgName("transfer_threads")->Arg(1)->Unit(benchmark::kMillisecond);

// Multi-thread group (run unpinned): copies on several threads, so rates from wall time.
BENCHMARK(memcpy_store_reused)->Name("mt/transfer/memcpy/store_pattern/reused")->ArgName("threads")->Arg(2)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(memcpy_retrieve_reused)->Name("mt/transfer/memcpy/retrieve_pattern/reused")->ArgName("threads")->Arg(2)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(engine_store, kvortex::host_engine)->Name("mt/transfer/host_engine/store")
    ->ArgName("transfer_threads")->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(engine_retrieve, kvortex::host_engine)->Name("mt/transfer/host_engine/retrieve")
    ->ArgName("transfer_threads")->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(engine_retrieve_paged, kvortex::host_engine)->Name("mt/transfer/host_engine/retrieve_flash_attn_random_table")
    ->ArgName("transfer_threads")->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_TEMPLATE(engine_store, pool_engine)->Name("mt/transfer/pool_engine/store")
    ->ArgName("transfer_threads")->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
