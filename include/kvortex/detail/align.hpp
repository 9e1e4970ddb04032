#pragma once
/// @file align.hpp
/// @brief Alignment constants and rounding shared by the allocators.

#include <cstddef>
#include <limits>

namespace kvortex::detail {

/// Cache-line alignment every block gets (also what vectorized copies want).
inline constexpr std::size_t cache_line = 64;
/// Transparent huge page size on x86-64 and most aarch64 kernels.
inline constexpr std::size_t huge_page = std::size_t{2} << 20;

/// @brief `n` rounded up to a multiple of the power of two `a`, or 0 when that overflows.
[[nodiscard]] constexpr std::size_t round_up(std::size_t n, std::size_t a) noexcept {
  if (n > std::numeric_limits<std::size_t>::max() - (a - 1)) return 0;
  return (n + a - 1) & ~(a - 1);
}

}  // namespace kvortex::detail
