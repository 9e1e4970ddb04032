#pragma once
/// @file config.hpp
/// @brief Engine configuration: the namespace that isolates keys, the model's KV geometry, limits.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "kvortex/error.hpp"

namespace kvortex {

/// @brief Everything that makes two KV caches incompatible. It seeds the root of every key chain,
/// so two models, dtypes, layouts or tensor-parallel ranks can never share a key.
struct kv_namespace {
  std::string model_id;                ///< e.g. "meta-llama/Llama-3.1-8B"
  std::string dtype{"bfloat16"};       ///< element type of the cache
  std::string layout{"kv_2ltd"};       ///< the engine-side KV layout family
  std::uint32_t tp_rank{0};            ///< this process's tensor-parallel rank
  std::uint32_t tp_size{1};            ///< tensor-parallel world size
  std::string cache_salt;              ///< optional: isolates tenants or adapters sharing a model
};

/// @brief Shape of one token's KV across all layers. A stored chunk holds
/// `[layer][plane][token][kv_heads * head_dim]` elements: two planes (K, V), or one for MLA.
struct kv_geometry {
  std::uint32_t num_layers{0};
  std::uint32_t kv_planes{2};          ///< 2 for K and V; 1 for MLA's joint latent
  std::uint32_t kv_heads{0};           ///< heads held by this rank
  std::uint32_t head_dim{0};           ///< elements per head (576 for DeepSeek MLA)
  std::uint32_t element_bytes{2};      ///< 2 for fp16/bf16, 1 for fp8, 4 for fp32

  /// @brief Bytes of one token's row in one layer and plane.
  [[nodiscard]] constexpr std::size_t row_bytes() const noexcept {
    return std::size_t{kv_heads} * head_dim * element_bytes;
  }
  /// @brief Bytes of one token across all layers and planes.
  [[nodiscard]] constexpr std::size_t token_bytes() const noexcept {
    return row_bytes() * kv_planes * num_layers;
  }
  friend constexpr bool operator==(const kv_geometry&, const kv_geometry&) = default;
};

/// @brief When chunks flow from host memory down to the storage tiers of a `tiered_backend`.
enum class write_policy : std::uint8_t {
  write_through,  ///< every stored chunk is queued for the tiers below as soon as it is readable
  write_back,     ///< a chunk goes down only when evicted from host memory (and not already below)
};

/// @brief How an engine with storage tiers below host memory (`tiered_backend`) moves chunks.
/// Ignored by engines whose backend has no tiers.
struct tiering_config {
  write_policy write{write_policy::write_through};
  /// Demotions waiting for a tier thread, at most. A store never waits for one: a demotion that
  /// finds the queue full is dropped and counted (`tier_report::demotions_dropped`).
  std::size_t demotion_queue_chunks{4096};
  /// Bytes of host memory queued demotions may hold, at most (write-through: the chunks stay
  /// pinned in the cache until written; write-back: evicted chunks' memory is kept until written).
  std::size_t demotion_queue_bytes{std::size_t{1} << 30};
  /// Background threads writing demotions and running prefetches; 1 to 64.
  unsigned tier_threads{2};
  /// How long a retrieve (or `prefetch`) may spend bringing chunks up from the tiers below; after
  /// it, the prefix already in host memory is served. Also bounds the wait for a chunk another
  /// call is bringing up.
  std::chrono::milliseconds promotion_timeout{2000};
  /// Chunks read from a tier per batch (one pipelined round trip to Redis, one queue of reads on
  /// disk); the copy of one batch into the caller's cache overlaps the read of the next.
  std::size_t promotion_batch_chunks{4};
  /// At shutdown, finish the demotions already queued (bounded by each tier's own timeouts)
  /// instead of dropping them.
  bool drain_on_shutdown{true};

  /// @brief Checks every field; the error names the first bad one.
  [[nodiscard]] result<void> validate() const {
    if (write != write_policy::write_through && write != write_policy::write_back)
      return fail(errc::invalid_config, "tiering.write is not a write_policy value");
    if (demotion_queue_chunks == 0) return fail(errc::invalid_config, "tiering.demotion_queue_chunks must be > 0");
    if (tier_threads == 0 || tier_threads > 64)
      return fail(errc::invalid_config, "tiering.tier_threads must be in [1, 64], got " + std::to_string(tier_threads));
    if (promotion_timeout.count() < 0 || promotion_timeout > std::chrono::hours(1))
      return fail(errc::invalid_config, "tiering.promotion_timeout must be in [0, 1 h], got " +
                                            std::to_string(promotion_timeout.count()) + " ms");
    if (promotion_batch_chunks == 0 || promotion_batch_chunks > 4096)
      return fail(errc::invalid_config, "tiering.promotion_batch_chunks must be in [1, 4096], got " +
                                            std::to_string(promotion_batch_chunks));
    return {};
  }
};

/// @brief How an engine is built. `validate()` is called by `create()`.
struct engine_config {
  kv_namespace ns;
  kv_geometry geometry;
  std::size_t capacity_bytes{0};       ///< hard limit on bytes held, reserved chunks included
  std::size_t chunk_tokens{256};       ///< tokens per stored chunk; a multiple of block_tokens
  std::size_t block_tokens{16};        ///< the inference engine's page size in tokens
  bool store_partial_chunks{false};    ///< also keep a prompt's trailing partial chunk
  /// Host copy threads, the caller's included; 0 picks from the hardware (at most 8). At most
  /// `max_transfer_threads`: validate() rejects more.
  unsigned transfer_threads{0};
  std::size_t parallel_copy_bytes{std::size_t{8} << 20};  ///< batches this large use the copy threads
  /// A transfer reaches the scheduler in batches of about this many bytes, so its first copies run
  /// while the rest is planned; 0 hands it over in one batch.
  std::size_t transfer_batch_bytes{std::size_t{32} << 20};
  int numa_node{-1};                   ///< node for host memory; -1 leaves it to the allocator
  tiering_config tiering;              ///< data flow to and from the tiers of a `tiered_backend`

  /// @brief The most `transfer_threads` a configuration may ask for.
  static constexpr unsigned max_transfer_threads = 256;

  /// @brief Bytes of one full chunk.
  [[nodiscard]] constexpr std::size_t chunk_bytes() const noexcept {
    return geometry.token_bytes() * chunk_tokens;
  }

  /// @brief Checks every field; the error names the first bad one.
  [[nodiscard]] result<void> validate() const {
    const auto& g = geometry;
    if (g.num_layers == 0) return fail(errc::invalid_config, "geometry.num_layers must be > 0");
    if (g.kv_planes != 1 && g.kv_planes != 2)
      return fail(errc::invalid_config, "geometry.kv_planes must be 1 (MLA) or 2 (K and V), got " +
                                            std::to_string(g.kv_planes));
    if (g.kv_heads == 0) return fail(errc::invalid_config, "geometry.kv_heads must be > 0");
    if (g.head_dim == 0) return fail(errc::invalid_config, "geometry.head_dim must be > 0");
    if (g.element_bytes != 1 && g.element_bytes != 2 && g.element_bytes != 4 && g.element_bytes != 8)
      return fail(errc::invalid_config, "geometry.element_bytes must be 1, 2, 4 or 8, got " +
                                            std::to_string(g.element_bytes));
    if (block_tokens == 0) return fail(errc::invalid_config, "block_tokens must be > 0");
    if (chunk_tokens == 0 || chunk_tokens % block_tokens != 0)
      return fail(errc::invalid_config, "chunk_tokens (" + std::to_string(chunk_tokens) +
                                            ") must be a positive multiple of block_tokens (" +
                                            std::to_string(block_tokens) + ")");
    {  // chunk_bytes() must not wrap: every product of the sizes stays below 2^62
      constexpr std::uint64_t limit = std::uint64_t{1} << 62;
      std::uint64_t product = 1;
      for (const std::uint64_t f : {std::uint64_t{g.num_layers}, std::uint64_t{g.kv_planes}, std::uint64_t{g.kv_heads},
                                    std::uint64_t{g.head_dim}, std::uint64_t{g.element_bytes}, std::uint64_t{chunk_tokens}}) {
        if (product > limit / f)
          return fail(errc::invalid_config, "a chunk of " + std::to_string(chunk_tokens) +
                                                " tokens of this geometry is too large to address");
        product *= f;
      }
    }
    if (ns.tp_size == 0 || ns.tp_rank >= ns.tp_size)
      return fail(errc::invalid_config, "tp_rank (" + std::to_string(ns.tp_rank) +
                                            ") must be below tp_size (" + std::to_string(ns.tp_size) + ")");
    if (transfer_threads > max_transfer_threads)
      return fail(errc::invalid_config, "transfer_threads (" + std::to_string(transfer_threads) +
                                            ") must be at most " + std::to_string(max_transfer_threads));
    if (capacity_bytes < chunk_bytes())
      return fail(errc::invalid_config, "capacity_bytes (" + std::to_string(capacity_bytes) +
                                            ") is smaller than one chunk (" +
                                            std::to_string(chunk_bytes()) + " bytes)");
    return tiering.validate();
  }
};

}  // namespace kvortex
