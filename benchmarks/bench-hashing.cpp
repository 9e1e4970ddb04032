// Chained hashing throughput of each shipped hasher: one 8192-token prompt cut into 256-token
// chunks (kvortex's default) and into 16-token blocks (vLLM's block size). One iteration hashes
// the whole prompt, so the reported time is the time per prompt.

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <random>
#include <span>
#include <vector>

#include "kvortex/hashers/sha256_hasher.hpp"
#include "kvortex/hashers/xxh3_hasher.hpp"
#include "kvortex/types.hpp"

namespace {

constexpr std::size_t prompt_tokens = 8192;

std::vector<kvortex::token_id> random_tokens(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<kvortex::token_id> dist(0, 128255);
  std::vector<kvortex::token_id> t(n);
  for (auto& x : t) x = dist(rng);
  return t;
}

template <class H>
H make_hasher() {
  if constexpr (requires { H::create(); }) {
    auto h = H::create();
    if (!h) {
      std::fprintf(stderr, "hasher: %s\n", h.error().message.c_str());
      std::abort();
    }
    return std::move(*h);
  } else {
    return H{};
  }
}

// range(0): tokens per chunk.
template <class H>
void chain_prompt(benchmark::State& state) {
  const auto chunk = static_cast<std::size_t>(state.range(0));
  const auto tokens = random_tokens(prompt_tokens, 1);
  const std::span<const kvortex::token_id> all(tokens);
  const H h = make_hasher<H>();
  const std::byte seed[] = {std::byte{1}, std::byte{2}};
  const kvortex::chunk_key root = h.root(seed);
  const std::size_t chunks = prompt_tokens / chunk;
  for (auto _ : state) {
    kvortex::chunk_key k = root;
    for (std::size_t i = 0; i < chunks; ++i) k = h.chain(k, all.subspan(i * chunk, chunk));
    benchmark::DoNotOptimize(k);
  }
  // Bytes are the tokens' bytes; the 32-byte parent hashed with each chunk is overhead, not payload.
  const auto iters = static_cast<std::int64_t>(state.iterations());
  state.SetBytesProcessed(iters * static_cast<std::int64_t>(prompt_tokens * sizeof(kvortex::token_id)));
  state.counters["chunks"] = static_cast<double>(chunks);
  // Seconds per chunk (the invert of a chunk rate).
  state.counters["s_per_chunk"] = benchmark::Counter(
      static_cast<double>(chunks), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

}  // namespace

BENCHMARK_TEMPLATE(chain_prompt, kvortex::sha256_hasher)
    ->Name("hash/sha256/prompt:8192")->ArgName("chunk_tokens")->Arg(256)->Arg(16)->Unit(benchmark::kMicrosecond);
#ifdef KVORTEX_HAS_XXH3_HASHER
BENCHMARK_TEMPLATE(chain_prompt, kvortex::xxh3_hasher)
    ->Name("hash/xxh3/prompt:8192")->ArgName("chunk_tokens")->Arg(256)->Arg(16)->Unit(benchmark::kMicrosecond);
#endif
