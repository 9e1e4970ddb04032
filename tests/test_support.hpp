#pragma once
// Shared fixtures: a small model geometry, deterministic KV bytes, and paged host caches.

#include <kvortex/kvortex.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <span>
#include <vector>

namespace kvt {

// 2 layers x 2 planes x 2 heads x 8 x 2 B: 32-byte rows, 128 bytes a token, 4 KiB a 32-token chunk.
inline kvortex::engine_config small_config(std::size_t capacity_chunks = 64) {
  kvortex::engine_config c;
  c.ns.model_id = "test-model";
  c.geometry = {.num_layers = 2, .kv_planes = 2, .kv_heads = 2, .head_dim = 8, .element_bytes = 2};
  c.chunk_tokens = 32;
  c.block_tokens = 16;
  c.capacity_bytes = capacity_chunks * c.chunk_bytes();
  c.transfer_threads = 1;
  return c;
}

inline std::vector<kvortex::token_id> make_tokens(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<kvortex::token_id> t(n);
  for (auto& x : t) x = static_cast<kvortex::token_id>(rng() % 128000);
  return t;
}

// The KV byte of (token value, position, layer, plane, byte within the row): identical prefixes
// give identical KV, as in a real model.
inline std::byte kv_byte(kvortex::token_id tok, std::size_t pos, std::size_t layer, std::size_t plane,
                         std::size_t i) {
  std::uint64_t h = static_cast<std::uint64_t>(static_cast<std::uint32_t>(tok)) * 0x9E3779B97F4A7C15ULL;
  h ^= (pos + 1) * 0xC2B2AE3D27D4EB4FULL + layer * 0x165667B19E3779F9ULL + plane * 0x27D4EB2F165667C5ULL + i;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 32;
  return static_cast<std::byte>(h & 0xFF);
}

// A host KV cache in vLLM's FlashAttention layout (NHD or HND), one tensor per layer.
struct paged_cache {
  kvortex::kv_geometry g;
  std::size_t num_blocks, block_tokens;
  kvortex::kv_order order;
  std::vector<std::vector<std::byte>> layers;
  std::vector<std::byte*> ptrs;

  paged_cache(const kvortex::kv_geometry& geo, std::size_t blocks, std::size_t bt,
              kvortex::kv_order o = kvortex::kv_order::nhd)
      : g(geo), num_blocks(blocks), block_tokens(bt), order(o) {
    layers.assign(g.num_layers, std::vector<std::byte>(2 * blocks * bt * g.row_bytes()));
    for (auto& l : layers) ptrs.push_back(l.data());
  }
  [[nodiscard]] kvortex::kv_layout layout() const {
    return kvortex::kv_layout::flash_attn(ptrs, g, num_blocks, block_tokens, order).value();
  }
  // Byte address of (layer, plane, physical block, slot, head, byte within the head).
  std::byte* at(std::size_t l, std::size_t p, std::size_t block, std::size_t slot, std::size_t h, std::size_t b) {
    const std::size_t hb = std::size_t{g.head_dim} * g.element_bytes;
    const std::size_t blk = block_tokens * g.row_bytes();
    std::size_t off = p * num_blocks * blk + block * blk;
    off += order == kvortex::kv_order::nhd ? slot * g.row_bytes() + h * hb : h * block_tokens * hb + slot * hb;
    return layers[l].data() + off + b;
  }
  void for_each_byte(std::size_t pos, std::span<const std::int32_t> table,
                     const std::function<void(std::size_t l, std::size_t p, std::size_t i, std::byte*)>& f) {
    const std::size_t hb = std::size_t{g.head_dim} * g.element_bytes;
    const std::size_t block = table.empty() ? pos / block_tokens : static_cast<std::size_t>(table[pos / block_tokens]);
    for (std::size_t l = 0; l < g.num_layers; ++l)
      for (std::size_t p = 0; p < g.kv_planes; ++p)
        for (std::size_t h = 0; h < g.kv_heads; ++h)
          for (std::size_t b = 0; b < hb; ++b) f(l, p, h * hb + b, at(l, p, block, pos % block_tokens, h, b));
  }
  // Writes the model's KV for `tokens` at the table's blocks.
  void fill(std::span<const kvortex::token_id> tokens, std::span<const std::int32_t> table) {
    for (std::size_t pos = 0; pos < tokens.size(); ++pos)
      for_each_byte(pos, table, [&](std::size_t l, std::size_t p, std::size_t i, std::byte* b) {
        *b = kv_byte(tokens[pos], pos, l, p, i);
      });
  }
  // Number of bytes among the first `n` tokens that differ from the model's KV.
  std::size_t mismatches(std::span<const kvortex::token_id> tokens, std::size_t n, std::span<const std::int32_t> table) {
    std::size_t bad = 0;
    for (std::size_t pos = 0; pos < n; ++pos)
      for_each_byte(pos, table, [&](std::size_t l, std::size_t p, std::size_t i, std::byte* b) {
        bad += *b != kv_byte(tokens[pos], pos, l, p, i);
      });
    return bad;
  }
  void clear() {
    for (auto& l : layers) std::memset(l.data(), 0, l.size());
  }
};

// A random block table of `n` distinct blocks out of `num_blocks`.
inline std::vector<std::int32_t> random_table(std::size_t n, std::size_t num_blocks, std::uint32_t seed) {
  std::vector<std::int32_t> all(num_blocks);
  for (std::size_t i = 0; i < num_blocks; ++i) all[i] = static_cast<std::int32_t>(i);
  std::shuffle(all.begin(), all.end(), std::mt19937(seed));
  all.resize(n);
  return all;
}

// A scheduler that holds every batch until the test releases it, to observe in-flight states.
// Copies share one gate, so a test keeps a copy to steer the engine's.
class gated_scheduler {
 public:
  void submit(std::span<const kvortex::copy_op> ops, kvortex::transfer_callback done) {
    std::lock_guard lk(g_->m);
    g_->held.push_back({ops, std::move(done)});
  }
  void drain() { release_all(); }
  void release_all() {
    for (auto& b : take()) {
      for (const auto& op : b.ops) kvortex::copy_host(op);
      b.done(kvortex::result<void>{});
    }
  }
  void fail_all() {
    for (auto& b : take()) b.done(kvortex::fail(kvortex::errc::transfer_failure, "injected"));
  }
  std::size_t held() const {
    std::lock_guard lk(g_->m);
    return g_->held.size();
  }

 private:
  struct batch {
    std::span<const kvortex::copy_op> ops;
    kvortex::transfer_callback done;
  };
  struct gate {
    std::mutex m;
    std::vector<batch> held;
  };
  std::vector<batch> take() {
    std::vector<batch> now;
    std::lock_guard lk(g_->m);
    now.swap(g_->held);
    return now;
  }
  std::shared_ptr<gate> g_ = std::make_shared<gate>();
};
static_assert(kvortex::transfer_scheduler<gated_scheduler>);

}  // namespace kvt
