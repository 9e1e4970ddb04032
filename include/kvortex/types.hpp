#pragma once
/// @file types.hpp
/// @brief Vocabulary types: token ids, chunk keys, copy operations.

#include <algorithm>
#include <array>
#include <bit>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <span>
#include <string>

#include "kvortex/detail/key_hash.hpp"

namespace kvortex {

/// @brief A token id as inference engines hand them over (vLLM, SGLang and TensorRT-LLM use 32 bits).
using token_id = std::int32_t;

/// @brief Bytes that scope a prompt's keys inside the engine's namespace: a tenant's cache salt,
/// a LoRA adapter, the identity of a multimodal input. A prompt stored under one salt is found only
/// under the same salt; the empty salt is the namespace alone. Any length; 0 bytes is not 1 zero byte.
using key_salt = std::span<const std::byte>;

/// @brief A chunk's identity: a 32-byte digest chaining every token before and in the chunk.
///
/// Hashers with shorter digests fill the leading bytes and zero the rest.
struct chunk_key {
  std::array<std::byte, 32> bytes{};

  // memcmp: the defaulted operator compares byte by byte, a hot spot in index lookups.
  friend bool operator==(const chunk_key& a, const chunk_key& b) noexcept {
    return std::memcmp(a.bytes.data(), b.bytes.data(), a.bytes.size()) == 0;
  }
  friend std::strong_ordering operator<=>(const chunk_key& a, const chunk_key& b) noexcept {
    return std::memcmp(a.bytes.data(), b.bytes.data(), a.bytes.size()) <=> 0;
  }

  /// @brief Lower-case hex of all 32 bytes.
  [[nodiscard]] std::string hex() const {
    static constexpr char digits[] = "0123456789abcdef";
    std::string s(64, '0');
    for (std::size_t i = 0; i < bytes.size(); ++i) {
      const auto b = static_cast<unsigned>(bytes[i]);
      s[2 * i] = digits[b >> 4];
      s[2 * i + 1] = digits[b & 0xF];
    }
    return s;
  }
};

/// @brief 32 bytes that identify a namespace (model, dtype, layout, rank, salt) in stored records,
/// supplied by whoever builds the tier (`tier_namespace(cfg)` gives an engine's). A record written under
/// another namespace is foreign: never served.
using namespace_digest = std::array<std::byte, 32>;

/// @brief Hash functor for unordered containers: all 32 bytes, mixed with a per-process random
/// seed (`detail/key_hash.hpp`), so keys a caller chooses cannot be made to share buckets.
/// Values differ between processes; never persist them.
struct chunk_key_hash {
  [[nodiscard]] std::size_t operator()(const chunk_key& k) const noexcept {
    return static_cast<std::size_t>(detail::seeded_key_hash(k.bytes.data(), k.bytes.size()));
  }
};

/// @brief A copy of `rows` rows of `bytes` each: row `r` goes from `src + r*src_pitch` to
/// `dst + r*dst_pitch`. `{src, dst, bytes}` is one contiguous row (the pitches are then unused).
/// With several rows each pitch is at least `bytes`; no two bytes copied overlap.
struct copy_op {
  const std::byte* src{};
  std::byte* dst{};
  std::size_t bytes{};       ///< bytes per row
  std::size_t rows{1};       ///< rows; 1 for a plain contiguous copy
  std::size_t src_pitch{0};  ///< distance between rows at `src`
  std::size_t dst_pitch{0};  ///< distance between rows at `dst`
};

/// @brief Bytes an op copies in all.
[[nodiscard]] constexpr std::size_t total_bytes(const copy_op& op) noexcept { return op.bytes * op.rows; }

/// @brief Performs `op` in host memory.
inline void copy_host(const copy_op& op) noexcept {
  if (op.bytes == 0) return;
  if (op.rows == 1) {
    std::memcpy(op.dst, op.src, op.bytes);
    return;
  }
  const std::byte* s = op.src;
  std::byte* d = op.dst;
  for (std::size_t r = 0; r < op.rows; ++r, s += op.src_pitch, d += op.dst_pitch) std::memcpy(d, s, op.bytes);
}

/// @brief Performs bytes `[begin, end)` of `op` in host memory, counted row after row
/// (`0 <= begin <= end <= total_bytes(op)`); lets a large op be split across threads.
inline void copy_host(const copy_op& op, std::size_t begin, std::size_t end) noexcept {
  if (begin >= end || op.bytes == 0) return;
  if (op.rows == 1) {
    std::memcpy(op.dst + begin, op.src + begin, end - begin);
    return;
  }
  std::size_t r = begin / op.bytes, c = begin % op.bytes;
  for (std::size_t at = begin; at < end; ++r, c = 0) {
    const std::size_t n = std::min(op.bytes - c, end - at);
    std::memcpy(op.dst + r * op.dst_pitch + c, op.src + r * op.src_pitch + c, n);
    at += n;
  }
}

}  // namespace kvortex

template <>
struct std::hash<kvortex::chunk_key> : kvortex::chunk_key_hash {};
