#pragma once
/// @file slab_region.hpp
/// @brief A mapped region carved into exact-size slabs with a free list per size.

#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>

#include "kvortex/detail/align.hpp"
#include "kvortex/error.hpp"

namespace kvortex {

namespace detail {

/// The mapping and its slab bookkeeping; lives behind a pointer so the allocator moves cheaply.
class slab_region {
 public:
  /// `owner` names the allocator in error messages.
  slab_region(std::byte* base, std::size_t mapped, std::size_t usable, int node,
              const char* owner = "numa_pool_allocator") noexcept
      : base_(base), mapped_(mapped), usable_(usable), node_(node), owner_(owner) {}
  slab_region(const slab_region&) = delete;
  slab_region& operator=(const slab_region&) = delete;
  ~slab_region() { ::munmap(base_, mapped_); }

  [[nodiscard]] result<void*> allocate(std::size_t n) {
    if (n == 0) return fail(errc::invalid_argument, std::string(owner_) + ": cannot allocate 0 bytes");
    const std::size_t cls = round_up(n, cache_line);
    if (cls == 0 || cls > usable_)
      return fail(errc::out_of_memory, std::string(owner_) + ": " + std::to_string(n) +
                                           " bytes exceed the pool's " + std::to_string(usable_));
    std::unique_lock lock(mutex_);
    auto it = classes_.find(cls);
    if (it != classes_.end() && it->second != nullptr) {
      free_block* b = it->second;
      it->second = b->next;
      lock.unlock();
      reserved_.fetch_add(n, std::memory_order_relaxed);
      return static_cast<void*>(b);
    }
    if (usable_ - carved_ < cls)
      return fail(errc::out_of_memory, std::string(owner_) + ": pool of " + std::to_string(usable_) +
                                           " bytes has no free slab of " + std::to_string(cls) + " bytes");
    if (it == classes_.end()) {
      // Created here, never in deallocate, so giving a block back cannot allocate.
      try {
        classes_.emplace(cls, nullptr);
      } catch (const std::bad_alloc&) {
        return fail(errc::out_of_memory, std::string(owner_) + ": no memory for a size class");
      }
    }
    void* p = base_ + carved_;
    carved_ += cls;
    lock.unlock();
    reserved_.fetch_add(n, std::memory_order_relaxed);
    return p;
  }

  void deallocate(void* p, std::size_t n) noexcept {
    if (p == nullptr) return;
    const std::size_t cls = round_up(n, cache_line);
    {
      std::lock_guard lock(mutex_);
      auto it = classes_.find(cls);
      // A block of a size never allocated cannot be ours; dropping it keeps the lists sound.
      if (it == classes_.end()) return;
      auto* b = ::new (p) free_block{it->second};
      it->second = b;
    }
    reserved_.fetch_sub(n, std::memory_order_relaxed);
  }

  [[nodiscard]] std::size_t bytes_reserved() const noexcept { return reserved_.load(std::memory_order_relaxed); }
  [[nodiscard]] std::size_t bytes_carved() const noexcept {
    std::lock_guard lock(mutex_);
    return carved_;
  }
  [[nodiscard]] std::size_t capacity() const noexcept { return usable_; }
  [[nodiscard]] int node() const noexcept { return node_; }
  [[nodiscard]] const std::byte* base() const noexcept { return base_; }

 private:
  // A free slab's first bytes link it into its class's list.
  struct free_block {
    free_block* next;
  };

  std::byte* base_;
  std::size_t mapped_;
  std::size_t usable_;
  int node_;
  const char* owner_;
  mutable std::mutex mutex_;
  std::size_t carved_{0};
  std::unordered_map<std::size_t, free_block*> classes_;
  std::atomic<std::size_t> reserved_{0};
};

}  // namespace detail

}  // namespace kvortex
