#pragma once
/// @file pinned_host_allocator.hpp
/// @brief A pinned (page-locked) host pool that serves as soon as its first piece is registered.

#include <cuda_runtime.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kvortex/concepts/allocator.hpp"
#include "kvortex/config.hpp"
#include "kvortex/detail/align.hpp"
#include "kvortex/detail/cuda_runtime.hpp"
#include "kvortex/detail/host_mapping.hpp"
#include "kvortex/detail/slab_region.hpp"
#include "kvortex/error.hpp"

namespace kvortex {

/// @brief Pinned host memory for chunk buffers: one mapping of the capacity, huge-page advised,
/// bound to the GPU's NUMA node, registered with `cudaHostRegister` piece by piece.
///
/// `create` maps the region, touches and registers the first piece, and returns; a background
/// thread touches (from several threads) and registers the rest, touching piece i+1 while piece
/// i is being registered. An allocation that needs a piece not yet registered waits for it (up to
/// `options::wait_timeout`) instead of failing. Each piece is carved into exact-size slabs with a
/// free list per size (`detail::slab_region`), so a slab never straddles two registrations and a
/// fixed chunk size never fragments. Thread-safe. Move-only; the destructor stops the growth,
/// unregisters and unmaps, so every block must be given back first.
class pinned_host_allocator {
 public:
  /// @brief Construction options.
  struct options {
    std::size_t capacity_bytes{0};
    std::size_t piece_bytes{std::size_t{1} << 30};  ///< registration granularity (rounded to 2 MiB)
    int numa_node{-2};       ///< -2: the GPU's node (from sysfs); -1: no binding; >= 0: that node
    int device{-1};          ///< -1: the current device
    unsigned touch_threads{0};  ///< 0: min(hardware threads, 16)
    std::chrono::milliseconds wait_timeout{std::chrono::seconds(60)};
  };

  /// @brief A pool of `capacity_bytes` on `numa_node` (or, when that is -1, the GPU's node).
  [[nodiscard]] static result<pinned_host_allocator> create(const engine_config& cfg) {
    options o;
    o.capacity_bytes = cfg.capacity_bytes;
    o.numa_node = cfg.numa_node >= 0 ? cfg.numa_node : -2;
    return create(o);
  }

  /// @brief A pool built from explicit options. Fails with `errc::unsupported` without a GPU.
  [[nodiscard]] static result<pinned_host_allocator> create(const options& o) {
    const auto t0 = std::chrono::steady_clock::now();
    if (o.capacity_bytes == 0) return fail(errc::invalid_config, "pinned_host_allocator: capacity is 0 bytes");
    auto info = detail::cuda::query(o.device);
    if (!info) return std::unexpected(info.error());
    const std::size_t piece = std::max(detail::round_up(o.piece_bytes, detail::huge_page), detail::huge_page);
    auto map = detail::map_huge_aligned(o.capacity_bytes, "pinned_host_allocator");
    if (!map) return std::unexpected(map.error());
    const auto [base, span] = *map;
    const int want = o.numa_node == -2 ? info->numa_node : o.numa_node;
    const int bound = detail::bind_to_node(base, span, want);

    std::unique_ptr<state> s;
    try {
      s = std::make_unique<state>();
      s->base = base;
      s->span = span;
      s->piece = piece;
      s->device = info->id;
      s->node = bound;
      s->timeout = o.wait_timeout;
      s->threads = o.touch_threads != 0 ? o.touch_threads : std::clamp(std::thread::hardware_concurrency(), 1u, 16u);
      s->t0 = t0;
      for (std::size_t off = 0; off < span; off += piece) {
        const std::size_t len = std::min(piece, span - off);
        s->regions.push_back(std::make_unique<detail::slab_region>(base + off, len, len, bound, "pinned_host_allocator"));
      }
    } catch (const std::exception&) {
      if (s) {
        for (auto& r : s->regions) (void)r.release();  // the mapping is unmapped below, once
        s->regions.clear();
      }
      ::munmap(base, span);
      return fail(errc::out_of_memory, "pinned_host_allocator: no memory for the pool's bookkeeping");
    }
    // The first piece is ready before create returns; the rest grows in the background.
    if (auto r = s->prepare(0); !r) return std::unexpected(r.error());
    s->ready_pieces.store(1, std::memory_order_release);
    s->first_s = seconds_since(t0);
    if (s->regions.size() == 1) {
      s->all_s.store(s->first_s, std::memory_order_release);
    } else {
      state* sp = s.get();
      try {
        s->grower = std::thread([sp] { sp->grow(); });
      } catch (const std::exception& e) {
        return fail(errc::internal, std::string("pinned_host_allocator: cannot start the growth thread: ") + e.what());
      }
    }
    return pinned_host_allocator(std::move(s));
  }

  pinned_host_allocator(pinned_host_allocator&&) noexcept = default;
  pinned_host_allocator& operator=(pinned_host_allocator&&) noexcept = default;
  pinned_host_allocator(const pinned_host_allocator&) = delete;
  pinned_host_allocator& operator=(const pinned_host_allocator&) = delete;
  ~pinned_host_allocator() = default;

  /// @brief A 64-byte aligned pinned slab of `n` bytes; waits for growth when the ready pieces are full.
  [[nodiscard]] result<void*> allocate(std::size_t n) {
    if (!s_) return fail(errc::invalid_argument, "pinned_host_allocator: used after move");
    if (n == 0) return fail(errc::invalid_argument, "pinned_host_allocator: cannot allocate 0 bytes");
    if (n > s_->piece)
      return fail(errc::invalid_argument, "pinned_host_allocator: " + std::to_string(n) +
                                              " bytes exceed the registration piece of " + std::to_string(s_->piece));
    const auto deadline = std::chrono::steady_clock::now() + s_->timeout;
    for (;;) {
      const std::size_t ready = s_->ready_pieces.load(std::memory_order_acquire);
      for (std::size_t i = 0; i < ready; ++i) {
        auto p = s_->regions[i]->allocate(n);
        if (p) {
          s_->reserved.fetch_add(n, std::memory_order_relaxed);
          return p;
        }
        if (p.error().code != errc::out_of_memory) return std::unexpected(p.error());
      }
      if (ready == s_->regions.size())
        return fail(errc::out_of_memory, "pinned_host_allocator: pool of " + std::to_string(s_->span) +
                                             " bytes has no free slab of " + std::to_string(n) + " bytes");
      std::unique_lock lk(s_->m);
      if (s_->grow_error)
        return fail(errc::out_of_memory, "pinned_host_allocator: the pool stopped growing: " + s_->grow_error->what());
      if (!s_->cv.wait_until(lk, deadline, [&] {
            return s_->ready_pieces.load(std::memory_order_acquire) > ready || s_->grow_error.has_value();
          }))
        return fail(errc::out_of_memory, "pinned_host_allocator: no pinned piece became ready in time");
    }
  }

  /// @brief Returns a slab from `allocate(n)`.
  void deallocate(void* p, std::size_t n) noexcept {
    if (!s_ || p == nullptr) return;
    const auto off = static_cast<std::size_t>(static_cast<std::byte*>(p) - s_->base);
    const std::size_t i = off / s_->piece;
    if (i >= s_->regions.size()) return;
    s_->regions[i]->deallocate(p, n);
    s_->reserved.fetch_sub(n, std::memory_order_relaxed);
  }

  /// @brief Bytes currently handed out, as requested.
  [[nodiscard]] std::size_t bytes_reserved() const noexcept {
    return s_ ? s_->reserved.load(std::memory_order_relaxed) : 0;
  }
  /// @brief Bytes of the pool (the capacity rounded up to 2 MiB).
  [[nodiscard]] std::size_t capacity() const noexcept { return s_ ? s_->span : 0; }
  /// @brief Bytes registered and servable now.
  [[nodiscard]] std::size_t ready_bytes() const noexcept {
    if (!s_) return 0;
    return std::min(s_->span, s_->ready_pieces.load(std::memory_order_acquire) * s_->piece);
  }
  /// @brief Seconds from `create` until the first piece was servable.
  [[nodiscard]] double first_ready_seconds() const noexcept { return s_ ? s_->first_s : -1.0; }
  /// @brief Seconds from `create` until the whole pool was servable; negative while it grows.
  [[nodiscard]] double all_ready_seconds() const noexcept {
    return s_ ? s_->all_s.load(std::memory_order_acquire) : -1.0;
  }
  /// @brief Waits until the whole pool is servable; false on timeout or when growth failed.
  bool wait_all_ready(std::chrono::milliseconds timeout) const {
    if (!s_) return false;
    std::unique_lock lk(s_->m);
    return s_->cv.wait_for(lk, timeout, [&] {
      return s_->ready_pieces.load(std::memory_order_acquire) == s_->regions.size() || s_->grow_error.has_value();
    }) && !s_->grow_error;
  }
  /// @brief Where start-up time went: summed over pieces, touching (committing pages) and
  /// `cudaHostRegister`; the two overlap after the first piece.
  struct growth_time {
    double touch_s;
    double register_s;
  };
  [[nodiscard]] growth_time growth_times() const noexcept {
    if (!s_) return {0, 0};
    return {s_->touch_ns.load(std::memory_order_relaxed) * 1e-9, s_->register_ns.load(std::memory_order_relaxed) * 1e-9};
  }
  /// @brief The NUMA node the pool is bound to, or -1.
  [[nodiscard]] int node() const noexcept { return s_ ? s_->node : -1; }
  /// @brief Whether `p` points into the pool.
  [[nodiscard]] bool owns(const void* p) const noexcept {
    if (!s_) return false;
    const auto a = reinterpret_cast<std::uintptr_t>(p), b = reinterpret_cast<std::uintptr_t>(s_->base);
    return a >= b && a - b < s_->span;
  }

 private:
  struct state {
    std::byte* base{nullptr};
    std::size_t span{0}, piece{0};
    int device{0}, node{-1};
    unsigned threads{1};
    std::chrono::milliseconds timeout{};
    std::chrono::steady_clock::time_point t0;
    std::vector<std::unique_ptr<detail::slab_region>> regions;  // one per piece; each unmaps its piece
    std::atomic<std::size_t> ready_pieces{0};
    std::atomic<std::size_t> reserved{0};
    std::size_t registered{0};  // pieces registered (owned by whoever registers, then the destructor)
    double first_s{-1.0};
    std::atomic<double> all_s{-1.0};
    std::mutex m;
    std::condition_variable cv;
    std::optional<error> grow_error;
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> touch_ns{0}, register_ns{0};
    std::thread grower;

    state() = default;
    state(const state&) = delete;
    state& operator=(const state&) = delete;
    ~state() {
      stop.store(true, std::memory_order_release);
      cv.notify_all();
      if (grower.joinable()) grower.join();
      for (std::size_t i = 0; i < registered; ++i) (void)cudaHostUnregister(base + i * piece);
      (void)cudaGetLastError();
      regions.clear();
    }

    [[nodiscard]] std::size_t piece_len(std::size_t i) const noexcept { return std::min(piece, span - i * piece); }

    // Commits piece i's pages from several threads, so the kernel zeroes them in parallel.
    void touch(std::size_t i) {
      const auto t0 = std::chrono::steady_clock::now();
      std::byte* p = base + i * piece;
      const std::size_t len = piece_len(i);
      const std::size_t parts = std::max<std::size_t>(1, std::min<std::size_t>(threads, len / detail::huge_page));
      const auto work = [p, len, parts](std::size_t k) {
        const std::size_t lo = len * k / parts / detail::huge_page * detail::huge_page;
        const std::size_t hi = k + 1 == parts ? len : len * (k + 1) / parts / detail::huge_page * detail::huge_page;
        if (hi <= lo) return;
#ifdef MADV_POPULATE_WRITE
        // One call per stripe instead of one fault per page.
        if (::madvise(p + lo, hi - lo, MADV_POPULATE_WRITE) == 0) return;
#endif
        for (std::size_t o = lo; o < hi; o += 4096) *static_cast<volatile std::byte*>(p + o) = std::byte{0};
      };
      std::vector<std::thread> ts;
      try {
        for (std::size_t k = 1; k < parts; ++k) ts.emplace_back(work, k);
      } catch (const std::exception&) {
        // Fewer threads only costs time: touch the rest here.
        for (std::size_t k = ts.size() + 1; k < parts; ++k) work(k);
      }
      work(0);
      for (auto& t : ts) t.join();
      touch_ns.fetch_add(static_cast<std::uint64_t>((std::chrono::steady_clock::now() - t0).count()), std::memory_order_relaxed);
    }

    result<void> reg(std::size_t i) {
      const auto t0 = std::chrono::steady_clock::now();
      auto r = detail::cuda::check(cudaHostRegister(base + i * piece, piece_len(i), cudaHostRegisterPortable),
                                   "pinned_host_allocator: cudaHostRegister", errc::out_of_memory);
      if (r) registered = i + 1;
      register_ns.fetch_add(static_cast<std::uint64_t>((std::chrono::steady_clock::now() - t0).count()), std::memory_order_relaxed);
      return r;
    }

    result<void> prepare(std::size_t i) {
      touch(i);
      return reg(i);
    }

    // Touches piece i+1 while registering piece i.
    void grow() {
      (void)cudaSetDevice(device);
      const std::size_t n = regions.size();
      std::size_t touched = 1;
      std::mutex tm;
      std::condition_variable tcv;
      std::thread toucher([&] {
        for (std::size_t i = 1; i < n && !stop.load(std::memory_order_acquire); ++i) {
          touch(i);
          {
            std::lock_guard lk(tm);
            touched = i + 1;
          }
          tcv.notify_all();
        }
        std::lock_guard lk(tm);
        touched = n + 1;  // done (or stopped)
        tcv.notify_all();
      });
      for (std::size_t i = 1; i < n; ++i) {
        {
          std::unique_lock lk(tm);
          tcv.wait(lk, [&] { return touched > i || stop.load(std::memory_order_acquire); });
        }
        if (stop.load(std::memory_order_acquire)) break;
        auto r = reg(i);
        if (!r) {
          std::lock_guard lk(m);
          grow_error = r.error();
          stop.store(true, std::memory_order_release);
          break;
        }
        {
          std::lock_guard lk(m);
          ready_pieces.store(i + 1, std::memory_order_release);
          if (i + 1 == n) all_s.store(seconds_since(t0), std::memory_order_release);
        }
        cv.notify_all();
      }
      toucher.join();
      cv.notify_all();
    }
  };

  explicit pinned_host_allocator(std::unique_ptr<state> s) noexcept : s_(std::move(s)) {}

  static double seconds_since(std::chrono::steady_clock::time_point t0) noexcept {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }


  std::unique_ptr<state> s_;
};

static_assert(allocator<pinned_host_allocator>, "pinned_host_allocator does not satisfy kvortex::allocator");

}  // namespace kvortex
