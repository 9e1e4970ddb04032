#pragma once
/// @file xxh3_hasher.hpp
/// @brief XXH3-128 chunk keys (xxHash, header-only). Defined only where <xxhash.h> is found.

#if defined(KVORTEX_WITH_XXHASH) || __has_include(<xxhash.h>)
#define KVORTEX_HAS_XXH3_HASHER 1

#include <cstddef>
#include <array>
#include <bit>
#include <cstring>
#include <span>
#include <string_view>

#include "kvortex/detail/xxhash_include.hpp"

#include "kvortex/concepts/hasher.hpp"
#include "kvortex/detail/token_bytes.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Chains chunk keys with XXH3-128: many times faster than SHA-256, and NOT
/// cryptographic.
///
/// Anyone who can choose token sequences can construct two prompts with the same key and make
/// one request read another's KV cache, so use it only in trusted single-tenant deployments;
/// `sha256_hasher` is the safe default. Same chaining as `sha256_hasher`:
/// `root(seed) = H("kvortex-root\0" || seed)`, `chain(parent, tokens) = H(parent's 32 bytes ||
/// tokens as little-endian int32)`. The 16 digest bytes (canonical big-endian form, equal on
/// every platform) fill the key's first 16 bytes; the other 16 are zero. Stateless; thread-safe.
class xxh3_hasher {
 public:
  static constexpr std::string_view name = "xxh3_128";

  /// @brief The root key of a chain for a serialized namespace `seed`.
  [[nodiscard]] chunk_key root(std::span<const std::byte> seed) const noexcept {
    XXH3_state_t st;
    XXH3_INITSTATE(&st);
    XXH3_128bits_reset(&st);
    XXH3_128bits_update(&st, detail::root_prefix, sizeof detail::root_prefix);
    if (!seed.empty()) XXH3_128bits_update(&st, seed.data(), seed.size());
    return to_key(XXH3_128bits_digest(&st));
  }

  /// @brief The key of the chunk `tokens` following the chunk keyed `parent`.
  [[nodiscard]] chunk_key chain(const chunk_key& parent, std::span<const token_id> tokens) const noexcept {
    // One-shot over a contiguous copy: the streaming API buffers its input and costs more.
    constexpr std::size_t max_tokens = 1024;
    if (std::endian::native == std::endian::little && tokens.size() <= max_tokens) {
      std::array<std::byte, 32 + 4 * max_tokens> buf;
      std::memcpy(buf.data(), parent.bytes.data(), 32);
      if (!tokens.empty()) std::memcpy(buf.data() + 32, tokens.data(), tokens.size_bytes());
      return to_key(XXH3_128bits(buf.data(), 32 + tokens.size_bytes()));
    }
    XXH3_state_t st;
    XXH3_INITSTATE(&st);
    XXH3_128bits_reset(&st);
    XXH3_128bits_update(&st, parent.bytes.data(), parent.bytes.size());
    detail::for_each_token_bytes(tokens, [&st](const void* p, std::size_t n) { XXH3_128bits_update(&st, p, n); });
    return to_key(XXH3_128bits_digest(&st));
  }

 private:
  static chunk_key to_key(XXH128_hash_t h) noexcept {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    chunk_key k;
    static_assert(sizeof c.digest == 16);
    std::memcpy(k.bytes.data(), c.digest, sizeof c.digest);
    return k;
  }
};

static_assert(hasher<xxh3_hasher>, "xxh3_hasher does not satisfy kvortex::hasher");

}  // namespace kvortex

#endif
