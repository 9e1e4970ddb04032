#pragma once
/// @file token_bytes.hpp
/// @brief Feeds tokens to a hash as little-endian 32-bit integers on any host.

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>

#include "kvortex/types.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVORTEX_PACK_SSSE3 1
#endif

namespace kvortex::detail {

/// @brief The root's domain prefix, "kvortex-root" and its terminating NUL, so a root can never
/// collide with a chain step (whose input starts with a 32-byte key, a digest).
/// Hash all `sizeof root_prefix` (13) bytes.
inline constexpr char root_prefix[] = "kvortex-root";

/// @brief Calls `sink(const void*, std::size_t)` on the tokens' little-endian bytes, in order.
/// Little-endian hosts pass the tokens' own storage in one call.
template <class Sink>
void for_each_token_bytes(std::span<const token_id> tokens, Sink&& sink) {
  if constexpr (std::endian::native == std::endian::little) {
    if (!tokens.empty()) sink(static_cast<const void*>(tokens.data()), tokens.size_bytes());
  } else {
    std::array<std::uint32_t, 256> buf;
    while (!tokens.empty()) {
      const std::size_t n = tokens.size() < buf.size() ? tokens.size() : buf.size();
      for (std::size_t i = 0; i < n; ++i) buf[i] = std::byteswap(static_cast<std::uint32_t>(tokens[i]));
      sink(static_cast<const void*>(buf.data()), n * sizeof(std::uint32_t));
      tokens = tokens.subspan(n);
    }
  }
}

/// @brief Packs `n` (a multiple of 4) ids into 3 bytes each, little-endian: four ids fill three
/// words. Returns the OR of the ids, so the caller learns whether they all fit in 24 bits.
/// `__restrict` lets the compiler keep the loop in registers.
inline std::uint32_t pack_24bit(const std::uint32_t* __restrict in, std::size_t n,
                                std::uint32_t* __restrict out) noexcept {
  std::uint32_t all = 0;
  for (std::size_t i = 0, j = 0; i + 4 <= n; i += 4, j += 3) {
    const std::uint32_t a = in[i], b = in[i + 1], c = in[i + 2], d = in[i + 3];
    all |= a | b | c | d;
    out[j] = a | b << 24;
    out[j + 1] = b >> 8 | c << 16;
    out[j + 2] = c >> 16 | d << 8;
  }
  return all;
}

#ifdef KVORTEX_PACK_SSSE3
/// @brief `pack_24bit` with one byte shuffle per four ids; writes up to 4 bytes past `3 * n`.
[[gnu::target("ssse3")]] inline std::uint32_t pack_24bit_ssse3(const std::uint32_t* in, std::size_t n,
                                                               unsigned char* out) noexcept {
  const __m128i pick = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
  __m128i all = _mm_setzero_si128();
  for (std::size_t i = 0; i + 4 <= n; i += 4, out += 12) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    all = _mm_or_si128(all, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(v, pick));
  }
  all = _mm_or_si128(all, _mm_shuffle_epi32(all, 0x4E));
  all = _mm_or_si128(all, _mm_shuffle_epi32(all, 0xB1));
  return static_cast<std::uint32_t>(_mm_cvtsi128_si32(all));
}
#endif

/// @brief Calls `sink(const void*, std::size_t)` on the compact chain message
/// `parent || tokens || width`: each token little-endian in `width` bytes, 3 when every id of the
/// chunk is below 2^24 (any real vocabulary), else 4. The trailing width byte keeps the encoding
/// injective; the narrow form hashes a quarter fewer bytes, which is most of a SHA-256 lookup's
/// cost. Chunks of up to 1024 tokens go to `sink` in one call.
template <class Sink>
void for_each_compact_chain_bytes(const chunk_key& parent, std::span<const token_id> tokens, Sink&& sink) {
  constexpr std::uint32_t narrow_limit = std::uint32_t{1} << 24;
  const auto wide = [&] {
    const auto width = std::byte{4};
    sink(parent.bytes.data(), parent.bytes.size());
    for_each_token_bytes(tokens, sink);
    sink(&width, 1);
  };
  constexpr std::size_t slice = 1024;
  if (std::endian::native != std::endian::little || tokens.size() > slice) {
    // Rare: decide the width first, then stream (byte by byte where the host is big-endian).
    std::uint32_t all = 0;
    for (const token_id t : tokens) all |= static_cast<std::uint32_t>(t);
    if (all >= narrow_limit) return wide();
    sink(parent.bytes.data(), parent.bytes.size());
    for (const token_id t : tokens) {
      const auto v = static_cast<std::uint32_t>(t);
      const unsigned char b[3] = {static_cast<unsigned char>(v), static_cast<unsigned char>(v >> 8),
                                  static_cast<unsigned char>(v >> 16)};
      sink(b, 3);
    }
    const auto width = std::byte{3};
    sink(&width, 1);
    return;
  }
  // Words: the parent (8), the packed ids (3/4 of a word each), and one more for the width byte
  // and the shuffle's overhang. Packing also tells whether the ids fit: if not, start over wide.
  alignas(16) std::uint32_t buf[8 + 3 * slice / 4 + 1];
  auto* const bytes = reinterpret_cast<unsigned char*>(buf);
  std::memcpy(buf, parent.bytes.data(), parent.bytes.size());
  const auto* ids = reinterpret_cast<const std::uint32_t*>(tokens.data());
  const std::size_t whole = tokens.size() & ~std::size_t{3};
  std::uint32_t all;
#ifdef KVORTEX_PACK_SSSE3
  static const bool ssse3 = __builtin_cpu_supports("ssse3");
  if (ssse3)
    all = pack_24bit_ssse3(ids, whole, bytes + parent.bytes.size());
  else
#endif
    all = pack_24bit(ids, whole, buf + parent.bytes.size() / 4);
  std::size_t at = parent.bytes.size() + 3 * whole;
  for (std::size_t i = whole; i < tokens.size(); ++i, at += 3) {
    all |= ids[i];
    std::memcpy(bytes + at, &ids[i], 3);  // little-endian: the low three bytes first
  }
  if (all >= narrow_limit) return wide();
  bytes[at++] = 3;
  sink(bytes, at);
}

}  // namespace kvortex::detail
