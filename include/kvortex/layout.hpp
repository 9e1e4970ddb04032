#pragma once
/// @file layout.hpp
/// @brief Descriptors of where an inference engine keeps its KV cache, and how chunks map onto it.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kvortex/concepts/transfer_scheduler.hpp"
#include "kvortex/config.hpp"
#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Order of the dimensions inside one block of a paged cache.
enum class kv_order : std::uint8_t {
  nhd,  ///< `[block_tokens][kv_heads][head_dim]`: one token's heads are contiguous
  hnd,  ///< `[kv_heads][block_tokens][head_dim]`: one head's tokens are contiguous
};

/// @brief A validated view of an engine's KV cache: per-layer base pointers plus byte strides.
///
/// Element `(layer, plane, block, token, head)` starts at
/// `layers[layer] + plane*plane_stride + block*block_stride + token*token_stride + head*head_stride`
/// and spans `head_bytes` contiguous bytes. A request's tokens map to blocks through a block table:
/// token `t` lives in physical block `table[t / block_tokens]` at slot `t % block_tokens`.
/// Build one with the factories, which check it against the geometry and the tensor extents;
/// the engine checks it again against its own geometry before any copy.
class kv_layout {
 public:
  /// @brief The most layers `cross_layer` builds pointers for (real models have a few hundred).
  static constexpr std::uint32_t max_layers = 65536;

  /// @brief A retrieve's block-table entry for a block the destination already holds: the block
  /// is not written. Only destinations accept it (`check_table` with `skips`).
  static constexpr std::int32_t skip_block = -1;

  /// @brief A contiguous cache per layer, `[planes][max_tokens][kv_heads][head_dim]`, as used by
  /// simple C++ servers; block tables may be left empty (identity).
  [[nodiscard]] static result<kv_layout> contiguous(std::span<std::byte* const> layer_ptrs,
                                                    const kv_geometry& g, std::size_t max_tokens) {
    if (auto v = check_sizes(g, 1, max_tokens, 0, "contiguous"); !v) return std::unexpected(v.error());
    const std::size_t row = g.row_bytes();
    strides s{};
    s.plane = static_cast<std::int64_t>(max_tokens * row);
    s.block = 0;
    s.token = static_cast<std::int64_t>(row);
    s.head = static_cast<std::int64_t>(std::size_t{g.head_dim} * g.element_bytes);
    return make(layer_ptrs, g, /*num_blocks=*/1, /*block_tokens=*/max_tokens, s,
                /*layer_bytes=*/g.kv_planes * max_tokens * row, "contiguous");
  }

  /// @brief vLLM's FlashAttention cache per layer: logical `[2, num_blocks, block_tokens, kv_heads,
  /// head_dim]`, stored NHD (as written) or HND (`[2, num_blocks, kv_heads, block_tokens, head_dim]`).
  [[nodiscard]] static result<kv_layout> flash_attn(std::span<std::byte* const> layer_ptrs,
                                                    const kv_geometry& g, std::size_t num_blocks,
                                                    std::size_t block_tokens, kv_order order = kv_order::nhd) {
    if (auto v = check_sizes(g, num_blocks, block_tokens, 0, "flash_attn"); !v) return std::unexpected(v.error());
    if (g.kv_planes != 2)
      return fail(errc::invalid_layout, "flash_attn layout needs kv_planes == 2, got " +
                                            std::to_string(g.kv_planes));
    const std::size_t hb = std::size_t{g.head_dim} * g.element_bytes;
    const std::size_t block = block_tokens * g.row_bytes();
    strides s{};
    s.plane = static_cast<std::int64_t>(num_blocks * block);
    s.block = static_cast<std::int64_t>(block);
    s.token = static_cast<std::int64_t>(order == kv_order::nhd ? g.row_bytes() : hb);
    s.head = static_cast<std::int64_t>(order == kv_order::nhd ? hb : block_tokens * hb);
    return make(layer_ptrs, g, num_blocks, block_tokens, s, 2 * num_blocks * block,
                order == kv_order::nhd ? "flash_attn_nhd" : "flash_attn_hnd");
  }

  /// @brief FlashInfer's cache per layer: `[num_blocks, 2, block_tokens, kv_heads, head_dim]` (NHD)
  /// or `[num_blocks, 2, kv_heads, block_tokens, head_dim]` (HND): a block's K and V are adjacent.
  [[nodiscard]] static result<kv_layout> flashinfer(std::span<std::byte* const> layer_ptrs, const kv_geometry& g,
                                                    std::size_t num_blocks, std::size_t block_tokens,
                                                    kv_order order = kv_order::nhd) {
    if (auto v = check_sizes(g, num_blocks, block_tokens, 0, "flashinfer"); !v) return std::unexpected(v.error());
    if (g.kv_planes != 2)
      return fail(errc::invalid_layout, "flashinfer layout needs kv_planes == 2, got " + std::to_string(g.kv_planes));
    const std::size_t hb = std::size_t{g.head_dim} * g.element_bytes;
    const std::size_t plane = block_tokens * g.row_bytes();
    strides s{};
    s.plane = static_cast<std::int64_t>(plane);
    s.block = static_cast<std::int64_t>(2 * plane);
    s.token = static_cast<std::int64_t>(order == kv_order::nhd ? g.row_bytes() : hb);
    s.head = static_cast<std::int64_t>(order == kv_order::nhd ? hb : block_tokens * hb);
    return make(layer_ptrs, g, num_blocks, block_tokens, s, 2 * num_blocks * plane,
                order == kv_order::nhd ? "flashinfer_nhd" : "flashinfer_hnd");
  }

  /// @brief vLLM's MLA cache per layer: `[num_blocks, block_tokens, head_dim]`, one latent per token
  /// (geometry: kv_planes 1, kv_heads 1, head_dim e.g. 576; 656 one-byte elements with fp8_ds_mla).
  [[nodiscard]] static result<kv_layout> mla(std::span<std::byte* const> layer_ptrs, const kv_geometry& g,
                                             std::size_t num_blocks, std::size_t block_tokens) {
    if (auto v = check_sizes(g, num_blocks, block_tokens, 0, "mla"); !v) return std::unexpected(v.error());
    if (g.kv_planes != 1 || g.kv_heads != 1)
      return fail(errc::invalid_layout, "mla layout needs kv_planes == 1 and kv_heads == 1, got " +
                                            std::to_string(g.kv_planes) + " and " + std::to_string(g.kv_heads));
    const std::size_t row = g.row_bytes();
    strides s{0, static_cast<std::int64_t>(block_tokens * row), static_cast<std::int64_t>(row),
              static_cast<std::int64_t>(row)};
    return make(layer_ptrs, g, num_blocks, block_tokens, s, num_blocks * block_tokens * row, "mla");
  }

  /// @brief All layers in one tensor. `blocks_outermost` false: `[num_layers, 2, num_blocks,
  /// block_tokens, kv_heads, head_dim]` (layers as the leading dimension); true:
  /// `[num_blocks, num_layers, 2, block_tokens, kv_heads, head_dim]`, where one block of every layer
  /// is contiguous. For `kv_planes == 1` the `2` is absent.
  [[nodiscard]] static result<kv_layout> cross_layer(std::byte* base, const kv_geometry& g, std::size_t num_blocks,
                                                     std::size_t block_tokens, bool blocks_outermost = false) {
    if (base == nullptr) return fail(errc::invalid_layout, "cross_layer layout: base pointer is null");
    if (auto v = check_sizes(g, num_blocks, block_tokens, 0, "cross_layer"); !v) return std::unexpected(v.error());
    // Checked before any pointer is computed from them.
    if (g.num_layers == 0 || num_blocks == 0 || block_tokens == 0 || g.kv_heads == 0 || g.head_dim == 0 ||
        g.element_bytes == 0 || (g.kv_planes != 1 && g.kv_planes != 2))
      return fail(errc::invalid_layout, "cross_layer layout: num_layers, num_blocks, block_tokens, kv_heads, head_dim and "
                                        "element_bytes must be > 0 and kv_planes 1 or 2");
    if (g.num_layers > max_layers)
      return fail(errc::invalid_layout, "cross_layer layout: " + std::to_string(g.num_layers) + " layers, more than " +
                                            std::to_string(max_layers));
    const std::size_t row = g.row_bytes();
    const std::size_t plane_block = block_tokens * row;  // one plane of one block of one layer
    const std::size_t layer_block = g.kv_planes * plane_block;
    const std::size_t total = std::size_t{g.num_layers} * num_blocks * layer_block;
    const std::size_t layer_step = blocks_outermost ? layer_block : num_blocks * layer_block;
    std::vector<std::byte*> ptrs;
    try {
      ptrs.resize(g.num_layers);
    } catch (const std::bad_alloc&) {
      return fail(errc::out_of_memory, "cross_layer layout: cannot hold " + std::to_string(g.num_layers) + " layer pointers");
    }
    for (std::size_t l = 0; l < ptrs.size(); ++l) ptrs[l] = base + l * layer_step;
    strides s{};
    s.plane = static_cast<std::int64_t>(blocks_outermost ? plane_block : num_blocks * plane_block);
    s.block = static_cast<std::int64_t>(blocks_outermost ? std::size_t{g.num_layers} * layer_block : plane_block);
    s.token = static_cast<std::int64_t>(row);
    s.head = static_cast<std::int64_t>(std::size_t{g.head_dim} * g.element_bytes);
    // The last layer starts furthest in; its extent is what is left of the tensor.
    const std::size_t extent = total - (g.num_layers == 0 ? 0 : (g.num_layers - 1) * layer_step);
    return make(ptrs, g, num_blocks, block_tokens, s, extent,
                blocks_outermost ? "cross_layer_blocks_outermost" : "cross_layer");
  }

  /// @brief Opaque pages: each layer's cache is `num_blocks` pages of `kv_planes * block_tokens *
  /// row_bytes` bytes at `page_stride`, whatever their inner order (how vLLM's own offloading views
  /// any attention backend). Pages round-trip bit-exact; the bytes of one token are not located,
  /// so store and retrieve through the same kind of layout, in whole blocks.
  [[nodiscard]] static result<kv_layout> pages(std::span<std::byte* const> layer_ptrs, const kv_geometry& g,
                                               std::size_t num_blocks, std::size_t block_tokens,
                                               std::size_t page_stride) {
    if (auto v = check_sizes(g, num_blocks, block_tokens, page_stride, "pages"); !v) return std::unexpected(v.error());
    const std::size_t row = g.row_bytes();
    const std::size_t page = g.kv_planes * block_tokens * row;
    if (page_stride < page)
      return fail(errc::invalid_layout, "pages layout: page_stride " + std::to_string(page_stride) +
                                            " is smaller than a page (" + std::to_string(page) + " bytes)");
    // Viewed as [plane][token][row] inside each page: a fixed, invertible slicing of its bytes.
    strides s{static_cast<std::int64_t>(block_tokens * row), static_cast<std::int64_t>(page_stride),
              static_cast<std::int64_t>(row), static_cast<std::int64_t>(std::size_t{g.head_dim} * g.element_bytes)};
    auto out = make(layer_ptrs, g, num_blocks, block_tokens, s, (num_blocks - 1) * page_stride + page, "pages");
    if (out) out->whole_blocks_ = true;
    return out;
  }

  /// @brief K and V kept in separate tensors per layer, each `[num_blocks * block_tokens][kv_heads][head_dim]`
  /// (`kv_order::nhd`, as transformers' `PagedAttentionCache` and SGLang's token pools keep them)
  /// or `[num_blocks][kv_heads][block_tokens][head_dim]` (`kv_order::hnd`), contiguous, anywhere in
  /// memory: `keys[l]` is plane 0 of layer `l`, `values[l]` plane 1. `layers()` gives the K tensors.
  /// Fails with `errc::invalid_layout` when the counts differ from the geometry's layers, a pointer
  /// is null, or `kv_planes != 2`. Tensors that overlap make a layout that only a store may read
  /// (`check_destination` names the two tensors).
  [[nodiscard]] static result<kv_layout> split_kv(std::span<std::byte* const> keys, std::span<std::byte* const> values,
                                                  const kv_geometry& g, std::size_t num_blocks,
                                                  std::size_t block_tokens, kv_order order = kv_order::nhd) {
    try {
      if (g.kv_planes != 2)
        return fail(errc::invalid_layout, "split_kv layout needs kv_planes == 2, got " + std::to_string(g.kv_planes));
      if (keys.size() != values.size())
        return fail(errc::invalid_layout, "split_kv layout: " + std::to_string(keys.size()) + " key tensors and " +
                                              std::to_string(values.size()) + " value tensors");
      for (std::size_t l = 0; l < keys.size(); ++l)
        if (keys[l] == nullptr || values[l] == nullptr)
          return fail(errc::invalid_layout, std::string("split_kv layout: ") + (keys[l] == nullptr ? "keys[" : "values[") +
                                                std::to_string(l) + "] is null");
      if (keys.size() != g.num_layers || g.num_layers > std::numeric_limits<std::uint32_t>::max() / 2)
        return fail(errc::invalid_layout, "split_kv layout: " + std::to_string(keys.size()) +
                                              " layer tensors for a geometry of " + std::to_string(g.num_layers) + " layers");
      // Validated as 2L single-plane layers [k0, v0, k1, v1, ...]: the same checks, one extent per tensor.
      std::vector<std::byte*> planes;
      planes.reserve(2 * keys.size());
      for (std::size_t l = 0; l < keys.size(); ++l) {
        planes.push_back(keys[l]);
        planes.push_back(values[l]);
      }
      kv_geometry one = g;
      one.kv_planes = 1;
      one.num_layers = 2 * g.num_layers;
      if (auto v = check_sizes(g, num_blocks, block_tokens, 0, "split_kv"); !v) return std::unexpected(v.error());
      const std::size_t row = g.row_bytes();
      const auto hb = static_cast<std::int64_t>(std::size_t{g.head_dim} * g.element_bytes);
      const auto bt = static_cast<std::int64_t>(block_tokens);
      strides s{0, static_cast<std::int64_t>(block_tokens * row), order == kv_order::nhd ? static_cast<std::int64_t>(row) : hb,
                order == kv_order::nhd ? hb : bt * hb};
      auto out = make(planes, one, num_blocks, block_tokens, s, num_blocks * block_tokens * row, "split_kv");
      if (!out) return out;
      if (!out->aliasing_.empty()) out->aliasing_ = plane_overlap(planes, num_blocks * block_tokens * row);
      out->plane_ptrs_ = std::move(planes);
      out->layers_.assign(keys.begin(), keys.end());
      out->geometry_ = g;
      return out;
    } catch (const std::bad_alloc&) {
      return fail(errc::out_of_memory, "layout: cannot allocate the descriptor");
    }
  }

  /// @brief Any layout given by explicit byte strides; `layer_bytes` is each layer tensor's extent.
  [[nodiscard]] static result<kv_layout> strided(std::span<std::byte* const> layer_ptrs, const kv_geometry& g,
                                                 std::size_t num_blocks, std::size_t block_tokens,
                                                 std::int64_t plane_stride, std::int64_t block_stride,
                                                 std::int64_t token_stride, std::int64_t head_stride,
                                                 std::size_t layer_bytes) {
    return make(layer_ptrs, g, num_blocks, block_tokens,
                strides{plane_stride, block_stride, token_stride, head_stride}, layer_bytes, "strided");
  }

  /// @brief Marks the tensors as device memory (only a GPU transfer scheduler accepts these).
  kv_layout& on_device() noexcept {
    location_ = memory_location::device;
    return *this;
  }

  [[nodiscard]] std::size_t num_layers() const noexcept { return layers_.size(); }
  [[nodiscard]] std::size_t num_blocks() const noexcept { return num_blocks_; }
  [[nodiscard]] std::size_t block_tokens() const noexcept { return block_tokens_; }
  [[nodiscard]] const kv_geometry& geometry() const noexcept { return geometry_; }
  [[nodiscard]] memory_location location() const noexcept { return location_; }
  [[nodiscard]] const std::string& kind() const noexcept { return kind_; }
  [[nodiscard]] std::span<std::byte* const> layers() const noexcept { return layers_; }
  /// @brief True when only whole blocks may be copied (opaque pages).
  [[nodiscard]] bool whole_blocks_only() const noexcept { return whole_blocks_; }

  /// @brief True when no byte belongs to two layers. Layers may interleave (cross-layer layouts
  /// with blocks outermost) as long as their elements stay apart.
  [[nodiscard]] bool layers_disjoint() const noexcept { return aliasing_.empty(); }

  /// @brief Whether this cache may be written by a retrieve: fails with `errc::invalid_layout`
  /// (naming the layers) when two layers share or overlap memory, since copies split across
  /// threads would then write the same bytes. Reading (a store) from such a cache is fine.
  [[nodiscard]] result<void> check_destination() const {
    if (aliasing_.empty()) return {};
    return fail(errc::invalid_layout, kind_ + " layout: " + aliasing_ + "; it cannot be a destination");
  }

  /// @brief Checks that a block table can address `tokens` tokens; an empty table means identity.
  /// With `distinct` (destinations), no physical block may appear twice among the entries used:
  /// fails with `errc::invalid_argument` naming both positions. With `skips`, entries equal to
  /// `skip_block` are accepted and name no block.
  [[nodiscard]] result<void> check_table(std::span<const std::int32_t> table, std::size_t tokens,
                                         bool distinct = false, bool skips = false) const {
    const std::size_t need = (tokens + block_tokens_ - 1) / block_tokens_;
    if (table.empty()) {
      if (need > num_blocks_)
        return fail(errc::size_mismatch, std::to_string(tokens) + " tokens need " + std::to_string(need) +
                                             " blocks but the " + kind_ + " layout has " +
                                             std::to_string(num_blocks_));
      return {};
    }
    if (table.size() < need)
      return fail(errc::size_mismatch, std::to_string(tokens) + " tokens need " + std::to_string(need) +
                                           " block table entries, got " + std::to_string(table.size()));
    for (std::size_t i = 0; i < need; ++i)
      if ((table[i] < 0 && !(skips && table[i] == skip_block)) || (table[i] >= 0 && static_cast<std::size_t>(table[i]) >= num_blocks_))
        return fail(errc::invalid_argument, "block_table[" + std::to_string(i) + "] = " +
                                                std::to_string(table[i]) + " is outside [0, " +
                                                std::to_string(num_blocks_) + ")");
    if (distinct && need > 1) {
      std::vector<std::pair<std::int32_t, std::size_t>> seen;
      seen.reserve(need);
      for (std::size_t i = 0; i < need; ++i)
        if (table[i] != skip_block) seen.emplace_back(table[i], i);
      std::sort(seen.begin(), seen.end());
      for (std::size_t i = 1; i < seen.size(); ++i)
        if (seen[i].first == seen[i - 1].first)
          return fail(errc::invalid_argument, "block_table[" + std::to_string(seen[i - 1].second) + "] and block_table[" +
                                                  std::to_string(seen[i].second) + "] both name block " +
                                                  std::to_string(seen[i].first) + "; a destination block is written once");
    }
    return {};
  }

  /// @brief At most how many ops `append_copies` appends for `count` tokens of the given layers.
  /// Callers that build one batch from many chunks reserve the sum up front: growing a vector of
  /// ops chunk by chunk costs more than building them (new pages, copies).
  [[nodiscard]] std::size_t max_copies(std::size_t count, std::size_t layer_first = 0,
                                       std::size_t layer_count = static_cast<std::size_t>(-1)) const noexcept {
    if (layer_first >= layers_.size() || count == 0) return 0;
    const std::size_t layers = std::min(layer_count, layers_.size() - layer_first);
    const std::size_t row = geometry_.row_bytes();
    const std::size_t hb = row / geometry_.kv_heads;
    const bool rows_contiguous = geometry_.kv_heads == 1 || strides_.head == static_cast<std::int64_t>(hb);
    const std::size_t blocks = (count + block_tokens_ - 1) / block_tokens_ + 1;  // a range may straddle one more
    return layers * geometry_.kv_planes * blocks * (rows_contiguous ? 1 : geometry_.kv_heads);
  }

  /// @brief Appends the copies between this cache and a chunk buffer for tokens
  /// `[first, first + count)` of layers `[layer_first, layer_first + layer_count)`.
  ///
  /// Runs contiguous on both sides become one 1D op, merged across physically adjacent blocks.
  /// Where a token's row is not contiguous in the cache (HND: heads apart), each head of each block
  /// becomes one 2D op whose rows are that head's tokens (cache pitch: the token stride; chunk pitch:
  /// the row), and the heads of a block follow each other, so together they tile the block's rows in
  /// the chunk. Where rows are contiguous but not packed, each block is one 2D op of whole rows.
  /// @param chunk the chunk's bytes, laid out `[layer][plane][count][row]` (all layers).
  /// @param to_chunk true copies cache -> chunk (store), false chunk -> cache (retrieve).
  /// The table must have passed `check_table` for `first + count` tokens; blocks whose entry is
  /// `skip_block` get no copies.
  void append_copies(std::vector<copy_op>& out, std::span<const std::int32_t> table, std::size_t first,
                     std::size_t count, std::byte* chunk, bool to_chunk, std::size_t layer_first = 0,
                     std::size_t layer_count = static_cast<std::size_t>(-1)) const {
    const std::size_t layer_end = layer_first + std::min(layer_count, layers_.size() - layer_first);
    const std::size_t row = geometry_.row_bytes();
    const std::size_t heads = geometry_.kv_heads;
    const std::size_t hb = row / heads;
    const bool rows_contiguous = heads == 1 || strides_.head == static_cast<std::int64_t>(hb);
    const std::size_t pieces = rows_contiguous ? 1 : heads;
    const std::size_t piece_bytes = rows_contiguous ? row : hb;
    const auto token_pitch = static_cast<std::size_t>(strides_.token);
    // Tokens of one block are one run when rows are contiguous and packed back to back.
    const bool runs = rows_contiguous && token_pitch == row;
    // Grow once per call, geometrically: callers append chunk after chunk into one vector.
    const std::size_t need = out.size() + max_copies(count, layer_first, layer_count);
    if (need > out.capacity()) out.reserve(std::max(need, 2 * out.capacity()));
    std::byte* cursor = chunk + layer_first * geometry_.kv_planes * count * row;
    for (std::size_t l = layer_first; l < layer_end; ++l) {
      for (std::size_t p = 0; p < geometry_.kv_planes; ++p) {
        std::byte* plane_base = plane_ptrs_.empty() ? layers_[l] + static_cast<std::ptrdiff_t>(p) * strides_.plane
                                                    : plane_ptrs_[l * geometry_.kv_planes + p];
        for (std::size_t t = first; t < first + count;) {
          const std::size_t logical = t / block_tokens_;
          const std::size_t slot = t % block_tokens_;
          const std::size_t n = std::min(block_tokens_ - slot, first + count - t);
          if (!table.empty() && table[logical] == skip_block) {
            cursor += n * row;
            t += n;
            continue;
          }
          const std::size_t block = table.empty() ? logical : static_cast<std::size_t>(table[logical]);
          std::byte* tok = plane_base + static_cast<std::ptrdiff_t>(block) * strides_.block +
                           static_cast<std::ptrdiff_t>(slot) * strides_.token;
          if (runs || n == 1) {
            for (std::size_t h = 0; h < pieces; ++h) {
              std::byte* c = tok + static_cast<std::ptrdiff_t>(h) * strides_.head;
              std::byte* k = cursor + h * piece_bytes;
              const std::size_t bytes = runs ? n * row : piece_bytes;
              push(out, to_chunk ? copy_op{c, k, bytes} : copy_op{k, c, bytes});
            }
          } else {
            for (std::size_t h = 0; h < pieces; ++h) {
              std::byte* c = tok + static_cast<std::ptrdiff_t>(h) * strides_.head;
              std::byte* k = cursor + h * piece_bytes;
              out.push_back(to_chunk ? copy_op{c, k, piece_bytes, n, token_pitch, row}
                                     : copy_op{k, c, piece_bytes, n, row, token_pitch});
            }
          }
          cursor += n * row;
          t += n;
        }
      }
    }
  }

 private:
  struct strides {
    std::int64_t plane, block, token, head;
  };

  // Appends a 1D op, extending the previous one when both sides continue it.
  static void push(std::vector<copy_op>& out, copy_op op) {
    if (!out.empty()) {
      auto& b = out.back();
      if (b.rows == 1 && b.src + b.bytes == op.src && b.dst + b.bytes == op.dst) {
        b.bytes += op.bytes;
        return;
      }
    }
    out.push_back(op);
  }

  // Every size product (geometry, blocks, tokens, and a page stride times the blocks) stays below
  // 2^62, so no stride or extent computed from them can wrap around.
  static result<void> check_sizes(const kv_geometry& g, std::size_t num_blocks, std::size_t block_tokens,
                                  std::size_t page_stride, const char* kind) {
    constexpr std::uint64_t limit = std::uint64_t{1} << 62;
    std::uint64_t product = 1;
    for (const std::uint64_t f : {std::uint64_t{g.kv_heads}, std::uint64_t{g.head_dim}, std::uint64_t{g.element_bytes},
                                  std::uint64_t{g.kv_planes}, std::uint64_t{g.num_layers}, std::uint64_t{num_blocks},
                                  std::uint64_t{block_tokens}}) {
      if (f == 0) continue;  // zeros are refused later; they must not hide the other factors' size
      if (product > limit / f)
        return fail(errc::invalid_layout, std::string(kind) + " layout: sizes too large (" + std::to_string(num_blocks) +
                                              " blocks of " + std::to_string(block_tokens) + " tokens)");
      product *= f;
    }
    if (page_stride != 0 && num_blocks != 0 && page_stride > limit / num_blocks)
      return fail(errc::invalid_layout, std::string(kind) + " layout: page_stride " + std::to_string(page_stride) +
                                            " times " + std::to_string(num_blocks) + " blocks is too large");
    return {};
  }

  struct dim {
    std::int64_t stride;
    std::int64_t count;
    const char* name;
  };

  // The byte span of the elements the dimensions enumerate, each `hb` bytes. Sorted by stride,
  // each dimension must step past the span of those inside it, which proves no two elements
  // overlap. Returns an empty string, or what is wrong.
  static std::string nested_span(std::span<dim> dims, std::int64_t hb, std::int64_t& span) {
    std::sort(dims.begin(), dims.end(), [](const dim& a, const dim& b) { return a.stride < b.stride; });
    span = hb;
    for (const auto& d : dims) {
      if (d.count <= 1) continue;
      if (d.stride < span)
        return std::string(d.name) + " stride " + std::to_string(d.stride) + " makes elements overlap (needs >= " +
               std::to_string(span) + ")";
      if (d.stride > (std::numeric_limits<std::int64_t>::max() - span) / (d.count - 1))
        return std::string(d.name) + " stride " + std::to_string(d.stride) + " overflows the tensor's extent";
      span = d.stride * (d.count - 1) + span;
    }
    return {};
  }

  // Empty when no byte belongs to two layers, else which layers collide. Layers whose spans are
  // apart are disjoint; layers that interleave must start at equal steps that nest with the
  // other dimensions (cross-layer caches with blocks outermost).
  static std::string layer_aliasing(std::span<std::byte* const> ptrs, std::int64_t span, std::array<dim, 4> dims,
                                    std::int64_t hb) {
    const std::size_t n = ptrs.size();
    if (n < 2) return {};
    std::vector<std::pair<std::uintptr_t, std::size_t>> at(n);
    for (std::size_t i = 0; i < n; ++i) at[i] = {reinterpret_cast<std::uintptr_t>(ptrs[i]), i};
    std::sort(at.begin(), at.end());
    bool apart = true;
    for (std::size_t i = 1; i < n && apart; ++i) apart = at[i].first - at[i - 1].first >= static_cast<std::uint64_t>(span);
    if (apart) return {};
    const auto collide = [&](std::size_t i) {
      return "layers " + std::to_string(at[i - 1].second) + " and " + std::to_string(at[i].second) + " overlap";
    };
    const std::uintptr_t step = at[1].first - at[0].first;
    for (std::size_t i = 1; i < n; ++i)
      if (at[i].first - at[i - 1].first != step || step == 0) return collide(i);
    if (step > static_cast<std::uintptr_t>(std::numeric_limits<std::int64_t>::max())) return collide(1);
    std::array<dim, 5> with_layers{{dims[0], dims[1], dims[2], dims[3],
                                    {static_cast<std::int64_t>(step), static_cast<std::int64_t>(n), "layer"}}};
    std::int64_t unused = 0;
    if (!nested_span(std::span<dim>(with_layers), hb, unused).empty()) return collide(1);
    return {};
  }

  // Names two split K/V tensors (`planes` = [k0, v0, k1, v1, ...], each `extent` bytes) that share bytes.
  static std::string plane_overlap(std::span<std::byte* const> planes, std::size_t extent) {
    std::vector<std::pair<std::uintptr_t, std::size_t>> at(planes.size());
    for (std::size_t i = 0; i < planes.size(); ++i) at[i] = {reinterpret_cast<std::uintptr_t>(planes[i]), i};
    std::sort(at.begin(), at.end());
    const auto name = [](std::size_t i) { return std::string(i % 2 ? "values[" : "keys[") + std::to_string(i / 2) + "]"; };
    for (std::size_t i = 1; i < at.size(); ++i)
      if (at[i].first - at[i - 1].first < extent) return name(at[i - 1].second) + " and " + name(at[i].second) + " overlap";
    return "two tensors overlap";
  }

  static result<kv_layout> make(std::span<std::byte* const> layer_ptrs, const kv_geometry& g,
                                std::size_t num_blocks, std::size_t block_tokens, strides s,
                                std::size_t layer_bytes, std::string kind) noexcept {
    try {
      return make_checked(layer_ptrs, g, num_blocks, block_tokens, s, layer_bytes, std::move(kind));
    } catch (const std::bad_alloc&) {
      return fail(errc::out_of_memory, "layout: cannot allocate the descriptor");
    }
  }

  static result<kv_layout> make_checked(std::span<std::byte* const> layer_ptrs, const kv_geometry& g,
                                        std::size_t num_blocks, std::size_t block_tokens, strides s,
                                        std::size_t layer_bytes, std::string kind) {
    const auto bad = [&](std::string m) { return fail(errc::invalid_layout, kind + " layout: " + std::move(m)); };
    if (layer_ptrs.empty()) return bad("no layer pointers");
    if (layer_ptrs.size() != g.num_layers)
      return bad(std::to_string(layer_ptrs.size()) + " layer pointers for a geometry of " +
                 std::to_string(g.num_layers) + " layers");
    for (std::size_t i = 0; i < layer_ptrs.size(); ++i)
      if (layer_ptrs[i] == nullptr) return bad("layer pointer " + std::to_string(i) + " is null");
    if (g.kv_heads == 0 || g.head_dim == 0 || g.element_bytes == 0 || (g.kv_planes != 1 && g.kv_planes != 2))
      return bad("geometry has a zero dimension or kv_planes not in {1, 2}");
    if (num_blocks == 0 || block_tokens == 0) return bad("num_blocks and block_tokens must be > 0");
    if (auto v = check_sizes(g, num_blocks, block_tokens, 0, kind.c_str()); !v) return std::unexpected(v.error());
    if (s.plane < 0 || s.block < 0 || s.token < 0 || s.head < 0) return bad("negative stride");

    // Elements must not overlap: sorted by stride, each dimension must step past the span of those
    // inside it. Then the last element must end inside the tensor.
    const auto hb = static_cast<std::int64_t>(std::size_t{g.head_dim} * g.element_bytes);
    std::array<dim, 4> dims{{{s.head, g.kv_heads, "head"},
                             {s.token, static_cast<std::int64_t>(block_tokens), "token"},
                             {s.block, static_cast<std::int64_t>(num_blocks), "block"},
                             {s.plane, g.kv_planes, "plane"}}};
    std::int64_t span = 0;
    if (auto e = nested_span(std::span<dim>(dims), hb, span); !e.empty()) return bad(std::move(e));
    if (static_cast<std::uint64_t>(span) > layer_bytes)
      return bad("the last element ends at byte " + std::to_string(span) + " of a " +
                 std::to_string(layer_bytes) + "-byte layer tensor");

    kv_layout out;
    out.aliasing_ = layer_aliasing(layer_ptrs, span, dims, hb);
    out.layers_.assign(layer_ptrs.begin(), layer_ptrs.end());
    out.geometry_ = g;
    out.num_blocks_ = num_blocks;
    out.block_tokens_ = block_tokens;
    out.strides_ = s;
    out.kind_ = std::move(kind);
    return out;
  }

  std::vector<std::byte*> layers_;
  std::vector<std::byte*> plane_ptrs_;  // split_kv: [layer][plane] bases; empty: layers_ + plane stride
  kv_geometry geometry_{};
  std::size_t num_blocks_{0};
  std::size_t block_tokens_{0};
  strides strides_{};
  memory_location location_{memory_location::host};
  std::string kind_;
  std::string aliasing_;  // empty, or why two layers share bytes
  bool whole_blocks_{false};
};

}  // namespace kvortex
