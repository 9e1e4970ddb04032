#pragma once
/// @file token_bytes.hpp
/// @brief The bytes a hasher digests: a compact, injective encoding of a parent key and a chunk.

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "kvortex/types.hpp"

namespace kvortex::detail {

/// @brief The root's domain prefix, "kvortex-root" and its terminating NUL, so a root can never
/// collide with a chain step (whose input starts with a 32-byte key and a width tag).
/// Hash all `sizeof root_prefix` (13) bytes.
inline constexpr char root_prefix[] = "kvortex-root";

/// @brief `parent (32 bytes) || width (1 byte) || tokens`, each token little-endian in `width`
/// bytes: 3 when every id of the chunk is below 2^24 (any real vocabulary), else 4. The width tag
/// keeps the encoding injective; the narrow form hashes a quarter fewer bytes, which is most of a
/// lookup's cost. The view is valid until the calling thread's next call.
[[nodiscard]] inline std::span<const std::byte> chain_message(const chunk_key& parent,
                                                              std::span<const token_id> tokens) {
  thread_local std::vector<std::byte> buf;
  const std::size_t need = parent.bytes.size() + 1 + 4 * tokens.size() + 1;  // +1: the 4-byte store's overhang
  if (buf.size() < need) buf.resize(need);
  std::memcpy(buf.data(), parent.bytes.data(), parent.bytes.size());
  std::byte* out = buf.data() + parent.bytes.size() + 1;
  std::uint32_t all = 0;
  for (const token_id t : tokens) all |= static_cast<std::uint32_t>(t);
  const std::size_t width = all < (std::uint32_t{1} << 24) ? 3 : 4;
  buf[parent.bytes.size()] = static_cast<std::byte>(width);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    auto v = static_cast<std::uint32_t>(tokens[i]);
    if constexpr (std::endian::native == std::endian::big) v = std::byteswap(v);
    std::memcpy(out + i * width, &v, 4);  // with width 3 the next token overwrites the zero high byte
  }
  return {buf.data(), parent.bytes.size() + 1 + width * tokens.size()};
}

}  // namespace kvortex::detail
