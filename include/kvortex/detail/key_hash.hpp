#pragma once
/// @file key_hash.hpp
/// @brief The seeded hash of a whole chunk key that the engine's index buckets by.
///
/// Keys of the key API are chosen by the caller, so bucketing by a few of their bytes lets a
/// caller pile thousands of keys into one bucket (hash flooding). Every byte of the key goes in,
/// mixed with a seed drawn once per process from the system's random source: XXH3-64 with that
/// seed where xxHash is installed, SipHash-1-3 keyed by 128 seed bits otherwise.

#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>

#ifndef KVORTEX_KEY_HASH_SIPHASH
#include "kvortex/detail/xxhash_include.hpp"
#ifdef KVORTEX_HAS_XXHASH
#define KVORTEX_KEY_HASH_XXH3 1
#endif
#endif

namespace kvortex::detail {

/// The per-process seed: 128 bits from `std::random_device` (getrandom on Linux); should that
/// source fail, the clock and an address, which still differ between processes.
struct key_hash_seed {
  std::uint64_t k0, k1;

  static const key_hash_seed& get() noexcept {
    static const key_hash_seed s = draw();
    return s;
  }

 private:
  static key_hash_seed draw() noexcept {
    try {
      std::random_device rd;
      const auto word = [&rd] { return (std::uint64_t{rd()} << 32) ^ std::uint64_t{rd()}; };
      const std::uint64_t a = word();
      return {a, word()};
    } catch (...) {
      static const int anchor = 0;
      const auto t = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
      return {t * 0x9E3779B97F4A7C15ULL, static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(&anchor)) ^ t};
    }
  }
};

/// SipHash-c-d (Aumasson and Bernstein) of `n` bytes under the 128-bit key (k0, k1); the index
/// uses SipHash-1-3 where xxHash is absent.
template <int C, int D>
inline std::uint64_t siphash(const std::byte* p, std::size_t n, std::uint64_t k0, std::uint64_t k1) noexcept {
  std::uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
  std::uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
  const auto round = [&] {
    v0 += v1, v1 = std::rotl(v1, 13), v1 ^= v0, v0 = std::rotl(v0, 32);
    v2 += v3, v3 = std::rotl(v3, 16), v3 ^= v2;
    v0 += v3, v3 = std::rotl(v3, 21), v3 ^= v0;
    v2 += v1, v1 = std::rotl(v1, 17), v1 ^= v2, v2 = std::rotl(v2, 32);
  };
  const auto absorb = [&](std::uint64_t m) {
    v3 ^= m;
    for (int i = 0; i < C; ++i) round();
    v0 ^= m;
  };
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t m = 0;
    for (std::size_t b = 0; b < 8; ++b) m |= std::uint64_t{static_cast<unsigned char>(p[i + b])} << (8 * b);
    absorb(m);
  }
  std::uint64_t last = static_cast<std::uint64_t>(n & 0xFF) << 56;
  for (std::size_t b = 0; i + b < n; ++b) last |= std::uint64_t{static_cast<unsigned char>(p[i + b])} << (8 * b);
  absorb(last);
  v2 ^= 0xFF;
  for (int r = 0; r < D; ++r) round();
  return v0 ^ v1 ^ v2 ^ v3;
}

/// The index hash of `n` key bytes. `KVORTEX_KEY_HASH_SIPHASH` selects SipHash-1-3 even where
/// xxHash is installed (it must then be defined alike in every translation unit).
inline std::uint64_t seeded_key_hash(const std::byte* p, std::size_t n) noexcept {
  const auto& s = key_hash_seed::get();
#ifdef KVORTEX_KEY_HASH_XXH3
  return XXH3_64bits_withSeed(p, n, s.k0 ^ std::rotl(s.k1, 17));
#else
  return siphash<1, 3>(p, n, s.k0, s.k1);
#endif
}

}  // namespace kvortex::detail
