#pragma once
/// @file numa_pool_allocator.hpp
/// @brief One big mapping, optionally bound to a NUMA node, carved into exact-size slabs.

#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>

#include "kvortex/concepts/allocator.hpp"
#include "kvortex/config.hpp"
#include "kvortex/detail/align.hpp"
#include "kvortex/detail/host_mapping.hpp"
#include "kvortex/detail/slab_region.hpp"
#include "kvortex/error.hpp"

namespace kvortex {


/// @brief A fixed pool of host memory: one anonymous mapping of the configured capacity,
/// 2 MiB aligned and advised to use transparent huge pages, bound to a NUMA node when asked.
///
/// Blocks are exact-size slabs: each size (rounded up to 64 bytes) has its own free list, and new
/// slabs are cut from the unused end of the mapping. A freed slab only serves its own size, so a
/// workload of fixed chunk sizes (one per namespace) never fragments: after warm-up the pool stops
/// growing. Space a size class once took is not given to another size. `allocate` fails with
/// `errc::out_of_memory` when the size's free list is empty and the unused end is too short.
///
/// Binding: with `KVORTEX_WITH_NUMA` defined (libnuma linked), `numa_available() >= 0` and a node
/// `>= 0`, the mapping is bound to that node with `mbind(MPOL_BIND)` before any page is touched.
/// Otherwise, or if the kernel refuses (no such node, no permission), the mapping is left to the
/// kernel's default policy; `numa_bound()` and `node()` say which happened.
///
/// Pages are committed on first touch (`MAP_NORESERVE`), so a large pool costs nothing until used.
/// Thread-safe (one mutex). Move-only; the destructor unmaps, so every block must be given back
/// (or abandoned) before it runs.
class numa_pool_allocator {
 public:
  /// @brief A pool of `engine_config::capacity_bytes` on `engine_config::numa_node`.
  /// @return `errc::invalid_config` for a zero capacity, `errc::out_of_memory` if mapping fails.
  [[nodiscard]] static result<numa_pool_allocator> create(const engine_config& cfg) {
    if (cfg.capacity_bytes == 0) return fail(errc::invalid_config, "numa_pool_allocator: capacity_bytes is 0");
    return create(cfg.capacity_bytes, cfg.numa_node);
  }

  /// @brief A pool of `bytes` on NUMA node `node` (-1: no binding).
  [[nodiscard]] static result<numa_pool_allocator> create(std::size_t bytes, int node = -1) {
    if (bytes == 0) return fail(errc::invalid_config, "numa_pool_allocator: capacity is 0 bytes");
    const std::size_t usable = detail::round_up(bytes, detail::cache_line);
    auto map = detail::map_huge_aligned(usable, "numa_pool_allocator");
    if (!map) return std::unexpected(map.error());
    const auto [base, span] = *map;
    const int bound = detail::bind_to_node(base, span, node);
    try {
      return numa_pool_allocator(std::make_unique<detail::slab_region>(base, span, usable, bound));
    } catch (const std::bad_alloc&) {
      ::munmap(base, span);
      return fail(errc::out_of_memory, "numa_pool_allocator: no memory for the pool's bookkeeping");
    }
  }

  numa_pool_allocator(numa_pool_allocator&&) noexcept = default;
  numa_pool_allocator& operator=(numa_pool_allocator&&) noexcept = default;
  numa_pool_allocator(const numa_pool_allocator&) = delete;
  numa_pool_allocator& operator=(const numa_pool_allocator&) = delete;
  ~numa_pool_allocator() = default;

  /// @brief A 64-byte aligned slab of `n` bytes (rounded up to 64 for its size class).
  [[nodiscard]] result<void*> allocate(std::size_t n) {
    if (!region_) return fail(errc::invalid_argument, "numa_pool_allocator: used after move");
    return region_->allocate(n);
  }

  /// @brief Returns a slab from `allocate(n)` to the free list of its size.
  void deallocate(void* p, std::size_t n) noexcept {
    if (region_) region_->deallocate(p, n);
  }

  /// @brief Bytes currently handed out, as requested (not rounded).
  [[nodiscard]] std::size_t bytes_reserved() const noexcept { return region_ ? region_->bytes_reserved() : 0; }
  /// @brief Bytes ever cut from the pool into slabs (the high-water mark of the bump pointer).
  [[nodiscard]] std::size_t bytes_carved() const noexcept { return region_ ? region_->bytes_carved() : 0; }
  /// @brief Usable bytes of the pool.
  [[nodiscard]] std::size_t capacity() const noexcept { return region_ ? region_->capacity() : 0; }
  /// @brief Whether the mapping is bound to a NUMA node.
  [[nodiscard]] bool numa_bound() const noexcept { return node() >= 0; }
  /// @brief The node the mapping is bound to, or -1 when unbound.
  [[nodiscard]] int node() const noexcept { return region_ ? region_->node() : -1; }
  /// @brief Whether `p` points into the pool.
  [[nodiscard]] bool owns(const void* p) const noexcept {
    if (!region_) return false;
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    const auto b = reinterpret_cast<std::uintptr_t>(region_->base());
    return a >= b && a - b < region_->capacity();
  }

 private:
  explicit numa_pool_allocator(std::unique_ptr<detail::slab_region> r) noexcept : region_(std::move(r)) {}


  std::unique_ptr<detail::slab_region> region_;
};

static_assert(allocator<numa_pool_allocator>, "numa_pool_allocator does not satisfy kvortex::allocator");

}  // namespace kvortex
