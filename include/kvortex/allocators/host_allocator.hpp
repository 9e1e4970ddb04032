#pragma once
/// @file host_allocator.hpp
/// @brief Plain, pageable host memory from the C heap.

#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <string>

#include "kvortex/concepts/allocator.hpp"
#include "kvortex/detail/align.hpp"
#include "kvortex/error.hpp"

namespace kvortex {

/// @brief Allocates each block separately from the C heap, 64-byte aligned; blocks of 2 MiB or
/// more are 2 MiB aligned and advised to use transparent huge pages.
///
/// It enforces no limit (the engine enforces `engine_config::capacity_bytes`); it fails with
/// `errc::out_of_memory` only when the heap does. Thread-safe. Move-only: the moved-from
/// allocator reports zero bytes reserved, and outstanding blocks may be given back to either.
class host_allocator {
 public:
  host_allocator() = default;
  host_allocator(const host_allocator&) = delete;
  host_allocator& operator=(const host_allocator&) = delete;
  host_allocator(host_allocator&& o) noexcept
      : reserved_(o.reserved_.exchange(0, std::memory_order_relaxed)) {}
  host_allocator& operator=(host_allocator&& o) noexcept {
    if (this != &o) reserved_.store(o.reserved_.exchange(0, std::memory_order_relaxed), std::memory_order_relaxed);
    return *this;
  }
  ~host_allocator() = default;

  /// @brief `n > 0` bytes, aligned to 64 (2 MiB when `n >= 2 MiB`).
  [[nodiscard]] result<void*> allocate(std::size_t n) {
    if (n == 0) return fail(errc::invalid_argument, "host_allocator: cannot allocate 0 bytes");
    const bool huge = n >= detail::huge_page;
    const std::size_t align = huge ? detail::huge_page : detail::cache_line;
    // aligned_alloc wants a size that is a multiple of the alignment.
    const std::size_t size = detail::round_up(n, align);
    void* p = size == 0 ? nullptr : std::aligned_alloc(align, size);
    if (p == nullptr)
      return fail(errc::out_of_memory, "host_allocator: the heap refused " + std::to_string(n) + " bytes");
#ifdef MADV_HUGEPAGE
    // Only a hint: failure (THP disabled) changes nothing but speed.
    if (huge) (void)::madvise(p, size, MADV_HUGEPAGE);
#endif
    reserved_.fetch_add(n, std::memory_order_relaxed);
    return p;
  }

  /// @brief Gives back a block from `allocate(n)`.
  void deallocate(void* p, std::size_t n) noexcept {
    if (p == nullptr) return;
    std::free(p);
    reserved_.fetch_sub(n, std::memory_order_relaxed);
  }

  /// @brief Bytes currently handed out, as requested (not rounded).
  [[nodiscard]] std::size_t bytes_reserved() const noexcept { return reserved_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::size_t> reserved_{0};
};

static_assert(allocator<host_allocator>, "host_allocator does not satisfy kvortex::allocator");

}  // namespace kvortex
