#pragma once
/// @file host_mapping.hpp
/// @brief Large anonymous mappings on 2 MiB boundaries, and binding them to a NUMA node.

#include <sys/mman.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#ifdef KVORTEX_WITH_NUMA
#include <numa.h>
#include <numaif.h>
#endif

#include "kvortex/detail/align.hpp"
#include "kvortex/error.hpp"

namespace kvortex::detail {

/// A mapping of at least `bytes`, 2 MiB aligned and sized, advised to use transparent huge pages.
/// Pages are neither touched nor reserved (MAP_NORESERVE) until first use.
struct huge_mapping {
  std::byte* base;
  std::size_t span;
};

/// @param owner names the caller in error messages.
[[nodiscard]] inline result<huge_mapping> map_huge_aligned(std::size_t bytes, const char* owner) {
  const std::size_t span = round_up(bytes, huge_page);
  if (bytes == 0 || span == 0 || span > SIZE_MAX - huge_page)
    return fail(errc::out_of_memory, std::string(owner) + ": " + std::to_string(bytes) + " bytes cannot be mapped");
  // Over-map by one huge page so the start can move to a 2 MiB boundary, then trim both ends.
  const std::size_t over = span + huge_page;
  void* raw = ::mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED)
    return fail(errc::out_of_memory,
                std::string(owner) + ": mmap of " + std::to_string(over) + " bytes failed: " + std::strerror(errno));
  auto* const lo = static_cast<std::byte*>(raw);
  const auto addr = reinterpret_cast<std::uintptr_t>(lo);
  auto* const base = lo + (round_up(addr, huge_page) - addr);
  if (base != lo) ::munmap(lo, static_cast<std::size_t>(base - lo));
  if (auto* const end = base + span; end != lo + over) ::munmap(end, static_cast<std::size_t>(lo + over - end));
#ifdef MADV_HUGEPAGE
  (void)::madvise(base, span, MADV_HUGEPAGE);  // a hint: without THP only speed changes
#endif
  return huge_mapping{base, span};
}

/// Binds untouched pages to `node` with `mbind(MPOL_BIND)`; returns the node bound, or -1 where
/// NUMA is absent, `node` is negative or unknown, or the kernel refuses.
[[nodiscard]] inline int bind_to_node([[maybe_unused]] void* p, [[maybe_unused]] std::size_t n,
                                      [[maybe_unused]] int node) noexcept {
#ifdef KVORTEX_WITH_NUMA
  if (node < 0 || numa_available() < 0 || node > numa_max_node()) return -1;
  bitmask* mask = numa_allocate_nodemask();
  if (mask == nullptr) return -1;
  numa_bitmask_setbit(mask, static_cast<unsigned>(node));
  const long rc = ::mbind(p, n, MPOL_BIND, mask->maskp, mask->size + 1, 0);
  numa_free_nodemask(mask);
  return rc == 0 ? node : -1;
#else
  return -1;
#endif
}

}  // namespace kvortex::detail
