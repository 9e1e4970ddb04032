#pragma once
/// @file host_allocator.hpp
/// @brief Plain, pageable host memory from the C heap.

#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvortex/concepts/allocator.hpp"
#include "kvortex/detail/align.hpp"
#include "kvortex/error.hpp"

namespace kvortex {

/// @brief Allocates each block separately from the C heap, 64-byte aligned; blocks of 2 MiB or
/// more are 2 MiB aligned and advised to use transparent huge pages.
///
/// Freed blocks are kept for the next request of the same size: the heap would hand large blocks
/// back to the kernel, and every reuse would fault its pages in again (a fifth of a store's time).
/// So it holds at most the peak of what was handed out; `trim()` returns the spare blocks.
/// It enforces no limit (the engine enforces `engine_config::capacity_bytes`); it fails with
/// `errc::out_of_memory` only when the heap does. Thread-safe. Move-only: the moved-from
/// allocator reports zero bytes reserved, and outstanding blocks may be given back to either.
class host_allocator {
 public:
  host_allocator() = default;
  host_allocator(const host_allocator&) = delete;
  host_allocator& operator=(const host_allocator&) = delete;
  host_allocator(host_allocator&& o) noexcept
      : reserved_(o.reserved_.exchange(0, std::memory_order_relaxed)), spare_(std::move(o.spare_)) {}
  host_allocator& operator=(host_allocator&& o) noexcept {
    if (this != &o) {
      trim();
      reserved_.store(o.reserved_.exchange(0, std::memory_order_relaxed), std::memory_order_relaxed);
      spare_ = std::move(o.spare_);
    }
    return *this;
  }
  ~host_allocator() { trim(); }

  /// @brief Frees the blocks kept for reuse.
  void trim() noexcept {
    if (!spare_) return;
    std::lock_guard lk(spare_->m);
    for (auto& [size, blocks] : spare_->blocks)
      for (void* p : blocks) std::free(p);
    spare_->blocks.clear();
  }

  /// @brief `n > 0` bytes, aligned to 64 (2 MiB when `n >= 2 MiB`).
  [[nodiscard]] result<void*> allocate(std::size_t n) {
    if (n == 0) return fail(errc::invalid_argument, "host_allocator: cannot allocate 0 bytes");
    const bool huge = n >= detail::huge_page;
    const std::size_t align = huge ? detail::huge_page : detail::cache_line;
    // aligned_alloc wants a size that is a multiple of the alignment.
    const std::size_t size = detail::round_up(n, align);
    if (void* reused = take_spare(size)) {
      reserved_.fetch_add(n, std::memory_order_relaxed);
      return reused;
    }
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
    reserved_.fetch_sub(n, std::memory_order_relaxed);
    const std::size_t size = detail::round_up(n, n >= detail::huge_page ? detail::huge_page : detail::cache_line);
    if (!spare_) {  // moved from
      std::free(p);
      return;
    }
    try {
      std::lock_guard lk(spare_->m);
      spare_->blocks[size].push_back(p);
    } catch (...) {  // no memory to remember it: give it back instead
      std::free(p);
    }
  }

  /// @brief Bytes currently handed out, as requested (not rounded).
  [[nodiscard]] std::size_t bytes_reserved() const noexcept { return reserved_.load(std::memory_order_relaxed); }

 private:
  struct spare_blocks {
    std::mutex m;
    std::unordered_map<std::size_t, std::vector<void*>> blocks;  // by rounded size
  };

  void* take_spare(std::size_t size) noexcept {
    if (!spare_) return nullptr;
    std::lock_guard lk(spare_->m);
    const auto it = spare_->blocks.find(size);
    if (it == spare_->blocks.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    return p;
  }

  std::atomic<std::size_t> reserved_{0};
  std::unique_ptr<spare_blocks> spare_ = std::make_unique<spare_blocks>();
};

static_assert(allocator<host_allocator>, "host_allocator does not satisfy kvortex::allocator");

}  // namespace kvortex
