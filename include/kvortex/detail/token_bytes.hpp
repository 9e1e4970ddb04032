#pragma once
/// @file token_bytes.hpp
/// @brief Feeds tokens to a hash as little-endian 32-bit integers on any host.

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>

#include "kvortex/types.hpp"

namespace kvortex::detail {

/// @brief The root's domain prefix, "kvortex-root" and its terminating NUL, so a root can never
/// collide with a chain step (whose input starts with a 32-byte key).
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

}  // namespace kvortex::detail
