// Store a prompt's KV from a vLLM-style paged cache, then bring it back into another paged cache
// whose block table differs, and check every byte.

#include <kvortex/kvortex.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <span>
#include <sstream>
#include <string>
#include <vector>

namespace {

// A small model: 4 layers, 2 KV heads of 64 bf16 elements -> 256 B per token row, 2 KiB per token.
constexpr kvortex::kv_geometry geometry{
    .num_layers = 4, .kv_planes = 2, .kv_heads = 2, .head_dim = 64, .element_bytes = 2};
constexpr std::size_t block_tokens = 16;  // vLLM's default page size
constexpr std::size_t num_blocks = 32;    // pages per layer in each cache

// One layer's FlashAttention cache: [2 (K, V)][num_blocks][block_tokens][kv_heads][head_dim], NHD.
struct paged_cache {
  std::vector<std::vector<std::byte>> tensors;
  std::vector<std::byte*> layer_ptrs;

  paged_cache() {
    for (std::size_t l = 0; l < geometry.num_layers; ++l) {
      tensors.emplace_back(2 * num_blocks * block_tokens * geometry.row_bytes());
      layer_ptrs.push_back(tensors.back().data());
    }
  }
  // Where token `t` of a request lives, for one layer and plane (K = 0, V = 1).
  std::byte* row(std::size_t layer, std::size_t plane, std::span<const std::int32_t> table, std::size_t t) {
    const std::size_t block = static_cast<std::size_t>(table[t / block_tokens]);
    return layer_ptrs[layer] + ((plane * num_blocks + block) * block_tokens + t % block_tokens) * geometry.row_bytes();
  }
};

// Stands in for the model's output: a byte that depends on layer, plane, position and offset.
std::byte pattern(std::size_t layer, std::size_t plane, std::size_t t, std::size_t i) {
  return static_cast<std::byte>((layer * 131 + plane * 71 + t * 13 + i * 7 + 1) & 0xFF);
}

int report(const kvortex::error& e) {
  std::fprintf(stderr, "error: %s\n", e.what().c_str());
  return 1;
}

}  // namespace

int main() {
  kvortex::engine_config cfg;
  cfg.ns.model_id = "example/tiny-llama";
  cfg.geometry = geometry;
  cfg.chunk_tokens = 64;  // 4 pages per chunk, 128 KiB
  cfg.block_tokens = block_tokens;
  cfg.capacity_bytes = std::size_t{64} << 20;

  auto engine = kvortex::host_engine::create(cfg);
  if (!engine) return report(engine.error());

  // A 200-token prompt: three full chunks (192 tokens) are stored, the 8-token tail is not.
  std::vector<kvortex::token_id> prompt(200);
  std::iota(prompt.begin(), prompt.end(), 1000);
  const std::size_t pages = (prompt.size() + block_tokens - 1) / block_tokens;  // 13

  // The request's pages in the source cache: 3, 5, 7, ... (any distinct blocks would do).
  std::vector<std::int32_t> src_table(pages);
  for (std::size_t i = 0; i < pages; ++i) src_table[i] = static_cast<std::int32_t>(3 + 2 * i);

  paged_cache src;
  for (std::size_t l = 0; l < geometry.num_layers; ++l)
    for (std::size_t p = 0; p < 2; ++p)
      for (std::size_t t = 0; t < prompt.size(); ++t) {
        std::byte* r = src.row(l, p, src_table, t);
        for (std::size_t i = 0; i < geometry.row_bytes(); ++i) r[i] = pattern(l, p, t, i);
      }

  auto src_layout =
      kvortex::kv_layout::flash_attn(src.layer_ptrs, geometry, num_blocks, block_tokens, kvortex::kv_order::nhd);
  if (!src_layout) return report(src_layout.error());

  // store() returns a ticket; wait() yields the tokens newly written.
  auto stored = engine->store(prompt, *src_layout, src_table);
  if (!stored) return report(stored.error());
  auto stored_tokens = stored->wait();
  if (!stored_tokens) return report(stored_tokens.error());

  // A later request with the same prompt asks how much of it is cached.
  auto hit = engine->lookup(prompt);
  if (!hit) return report(hit.error());
  std::printf("stored %zu tokens; lookup finds %zu of %zu prompt tokens\n", *stored_tokens, *hit, prompt.size());
  if (*stored_tokens != 192 || *hit != 192) {
    std::fprintf(stderr, "error: expected 192 tokens stored and found\n");
    return 1;
  }

  // Bring it back into another cache, into pages 30, 28, 26, ... (reverse order, other blocks).
  std::vector<std::int32_t> dst_table(pages);
  for (std::size_t i = 0; i < pages; ++i) dst_table[i] = static_cast<std::int32_t>(30 - 2 * i);
  paged_cache dst;
  auto dst_layout =
      kvortex::kv_layout::flash_attn(dst.layer_ptrs, geometry, num_blocks, block_tokens, kvortex::kv_order::nhd);
  if (!dst_layout) return report(dst_layout.error());
  auto loaded = engine->retrieve(prompt, *dst_layout, dst_table);
  if (!loaded) return report(loaded.error());
  auto loaded_tokens = loaded->wait();
  if (!loaded_tokens) return report(loaded_tokens.error());

  // Every byte of the cached tokens must match; the uncached tail must be left alone (zero).
  std::size_t bad = 0;
  for (std::size_t l = 0; l < geometry.num_layers; ++l)
    for (std::size_t p = 0; p < 2; ++p)
      for (std::size_t t = 0; t < prompt.size(); ++t) {
        const std::byte* r = dst.row(l, p, dst_table, t);
        for (std::size_t i = 0; i < geometry.row_bytes(); ++i)
          bad += r[i] != (t < *loaded_tokens ? pattern(l, p, t, i) : std::byte{0});
      }
  std::printf("retrieved %zu tokens into a different block table: %zu bad bytes\n", *loaded_tokens, bad);
  if (*loaded_tokens != *hit || bad != 0) {
    std::fprintf(stderr, "error: retrieved KV does not match what was stored\n");
    return 1;
  }

  const kvortex::engine_stats s = engine->stats();
  std::printf("chunks held: %llu (%llu bytes of %llu), hit tokens %llu of %llu queried\n",
              static_cast<unsigned long long>(s.chunks), static_cast<unsigned long long>(s.current_bytes),
              static_cast<unsigned long long>(s.capacity_bytes), static_cast<unsigned long long>(s.hit_tokens),
              static_cast<unsigned long long>(s.queried_tokens));

  // The same counters in the Prometheus text format, for a /metrics endpoint (excerpt).
  std::istringstream metrics(kvortex::to_prometheus(s));
  std::printf("Prometheus excerpt:\n");
  for (std::string line; std::getline(metrics, line);)
    for (const char* name : {"kvortex_hit_tokens_total", "kvortex_stored_bytes_total", "kvortex_retrieve_seconds_sum",
                             "kvortex_retrieve_seconds_count"})
      if (line.find(name) != std::string::npos) std::printf("  %s\n", line.c_str());
  return 0;
}
