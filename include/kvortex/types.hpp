#pragma once
/// @file types.hpp
/// @brief Vocabulary types: token ids, chunk keys, copy operations.

#include <array>
#include <bit>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>

namespace kvortex {

/// @brief A token id as inference engines hand them over (vLLM, SGLang and TensorRT-LLM use 32 bits).
using token_id = std::int32_t;

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

/// @brief Hash functor for unordered containers: the key is already a digest, so take 8 of its bytes.
struct chunk_key_hash {
  [[nodiscard]] std::size_t operator()(const chunk_key& k) const noexcept {
    std::uint64_t v = 0;
    std::memcpy(&v, k.bytes.data(), sizeof v);
    return static_cast<std::size_t>(v);
  }
};

/// @brief One contiguous copy of `bytes` from `src` to `dst`; ranges never overlap.
struct copy_op {
  const std::byte* src{};
  std::byte* dst{};
  std::size_t bytes{};
};

}  // namespace kvortex

template <>
struct std::hash<kvortex::chunk_key> : kvortex::chunk_key_hash {};
