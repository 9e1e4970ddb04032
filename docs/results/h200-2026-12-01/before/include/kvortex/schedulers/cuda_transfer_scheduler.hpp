#pragma once
/// @file cuda_transfer_scheduler.hpp
/// @brief Moves KV fragments between a paged GPU cache and pinned host chunks at PCIe speed.

#include <cuda_runtime.h>

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kvortex/concepts/transfer_scheduler.hpp"
#include "kvortex/config.hpp"
#include "kvortex/detail/cuda_runtime.hpp"
#include "kvortex/detail/nvrtc_program.hpp"
#include "kvortex/detail/transfer_kernels.hpp"
#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Tuning of the staged copy path, per direction. Chosen by `select_cuda_transfer_tuning`
/// from the compute capability; override through `cuda_transfer_scheduler::options`.
struct cuda_transfer_tuning {
  std::size_t slab_bytes;              ///< device staging slab size
  unsigned slabs;                      ///< slabs in flight (>= 2): gather k+1 overlaps the DMA of k
  unsigned ctas;                       ///< CTAs per gather/scatter launch; 0 = one per SM
  unsigned threads;                    ///< threads per CTA (multiple of 32, <= 1024)
  std::size_t max_fragment_bytes;      ///< longer copies are cut so the warps share the work
  std::size_t dma_min_fragment_bytes;  ///< mean fragment >= this goes DMA-only in `automatic` mode; 0 = never
  unsigned dma_streams;                ///< streams the DMA-only path spreads its batches over
  std::size_t descriptor_capacity;     ///< fragment descriptors in flight per direction
};

/// @brief The tuning for a device of compute capability `major.minor`.
[[nodiscard]] constexpr cuda_transfer_tuning select_cuda_transfer_tuning(int major, [[maybe_unused]] int minor) noexcept {
  constexpr std::size_t MiB = std::size_t{1} << 20, KiB = std::size_t{1} << 10;
  // One short CTA per SM: beside a GEMM that holds every SM, the kernels only get SMs between its
  // kernels, and must gather a whole slab in that gap (16 CTAs kept 40% of PCIe there, a full
  // grid 74-87%, for the same GEMM cost; H100, see benchmarks/gpu-bench-transfer.cpp).
  if (major >= 9)  // Hopper and later: ~55 GB/s PCIe Gen5
    return {.slab_bytes = 32 * MiB, .slabs = 4, .ctas = 0, .threads = 512, .max_fragment_bytes = 64 * KiB,
            .dma_min_fragment_bytes = 0, .dma_streams = 4, .descriptor_capacity = std::size_t{1} << 18};
  if (major == 8)
    return {.slab_bytes = 16 * MiB, .slabs = 3, .ctas = 0, .threads = 512, .max_fragment_bytes = 64 * KiB,
            .dma_min_fragment_bytes = 0, .dma_streams = 4, .descriptor_capacity = std::size_t{1} << 17};
  return {.slab_bytes = 8 * MiB, .slabs = 2, .ctas = 8, .threads = 256, .max_fragment_bytes = 32 * KiB,
          .dma_min_fragment_bytes = 0, .dma_streams = 2, .descriptor_capacity = std::size_t{1} << 16};
}

/// @brief How device copies are performed.
enum class cuda_transfer_mode : std::uint8_t {
  automatic,  ///< staged, or DMA-only when the mean fragment reaches `dma_min_fragment_bytes`
  staged,     ///< gather/scatter kernel + one DMA per contiguous run (needs NVRTC)
  dma,        ///< `cudaMemcpyBatchAsync` of the fragments, no kernels
};

/// @brief GPU transfer scheduler: staged gather/scatter kernels plus bulk DMA.
///
/// Store (`to_store`, fragments on the device, chunk buffers in pinned host memory): a gather
/// kernel packs fragments into a device staging slab laid out like the destination, then one
/// `cudaMemcpyAsync` per contiguous destination run moves the slab to the host. Retrieve is the
/// mirror image (DMA into a slab, then a scatter kernel). Several slabs are in flight; the kernels
/// run on a high-priority stream, one short CTA per SM, so a slab is gathered in the gaps between
/// a concurrent model's kernels. Kernels come from NVRTC at first use
/// (`detail/nvrtc_program.hpp`); without NVRTC every batch goes through `cudaMemcpyBatchAsync`.
/// Host-to-host batches are copied with `memcpy` on the caller's thread.
///
/// `submit` enqueues all GPU work before it returns (blocking only when the descriptor ring is
/// full), so the hints' events and streams are ordered against the caller's stream at call time:
/// a store waits for `hints.wait_event`, and after a retrieve `hints.stream` waits for its scatter.
/// `done` runs on one completion thread per direction, which may call CUDA. Every CUDA failure
/// becomes a `kvortex::error` passed to `done`; nothing throws.
class cuda_transfer_scheduler {
 public:
  static constexpr bool reaches_device_memory = true;

  /// @brief Construction options.
  struct options {
    int device{-1};                              ///< -1: the current device
    std::optional<cuda_transfer_tuning> tuning;  ///< empty: `select_cuda_transfer_tuning`
    cuda_transfer_mode mode{cuda_transfer_mode::automatic};
  };

  /// @brief A scheduler on the current device; fails with `errc::unsupported` when there is none.
  [[nodiscard]] static result<cuda_transfer_scheduler> create(const engine_config&) { return create(options{}); }
  /// @brief A scheduler with explicit options.
  [[nodiscard]] static result<cuda_transfer_scheduler> create(const options& o) {
    auto info = detail::cuda::query(o.device);
    if (!info) return std::unexpected(info.error());
    cuda_transfer_tuning t = o.tuning ? *o.tuning : select_cuda_transfer_tuning(info->cc_major, info->cc_minor);
    if (t.slabs < 2 || t.slab_bytes < 4096 || t.threads < 32 || t.threads > 1024 || t.threads % 32 != 0 ||
        t.max_fragment_bytes == 0 || t.max_fragment_bytes > (std::size_t{1} << 31) || t.dma_streams == 0 ||
        t.descriptor_capacity < 1024)
      return fail(errc::invalid_config, "cuda_transfer_scheduler: unusable tuning (slabs >= 2, slab_bytes >= 4096, "
                                        "threads a multiple of 32 in [32, 1024], max_fragment_bytes in [1, 2 GiB], "
                                        "descriptor_capacity >= 1024)");
    if (t.ctas == 0) t.ctas = static_cast<unsigned>(std::max(1, info->sm_count));
    std::unique_ptr<impl> p;
    try {
      p = std::make_unique<impl>(*info, t, o.mode);
    } catch (const std::exception& e) {
      return fail(errc::out_of_memory, std::string("cuda_transfer_scheduler: ") + e.what());
    }
    if (auto r = p->init(); !r) return std::unexpected(r.error());
    return cuda_transfer_scheduler(std::move(p));
  }

  cuda_transfer_scheduler(cuda_transfer_scheduler&&) noexcept = default;
  cuda_transfer_scheduler& operator=(cuda_transfer_scheduler&&) noexcept = default;
  cuda_transfer_scheduler(const cuda_transfer_scheduler&) = delete;
  cuda_transfer_scheduler& operator=(const cuda_transfer_scheduler&) = delete;
  ~cuda_transfer_scheduler() = default;

  /// @brief Copies `ops`; the direction is inferred from the first and last op's pointers.
  void submit(std::span<const copy_op> ops, transfer_callback done) {
    if (!p_) {
      done(fail(errc::shut_down, "cuda_transfer_scheduler: used after move"));
      return;
    }
    p_->submit(ops, nullptr, std::move(done));
  }

  /// @brief Copies `ops` as `hints` describe (direction, cache side, event to wait for, stream to release).
  void submit(std::span<const copy_op> ops, const transfer_hints& hints, transfer_callback done) {
    if (!p_) {
      done(fail(errc::shut_down, "cuda_transfer_scheduler: used after move"));
      return;
    }
    p_->submit(ops, &hints, std::move(done));
  }

  /// @brief Blocks until every submitted batch has called its `done`.
  void drain() {
    if (p_) p_->drain();
  }

  /// @brief The tuning in use.
  [[nodiscard]] const cuda_transfer_tuning& tuning() const noexcept { return p_->tune; }
  /// @brief The device the scheduler copies to and from.
  [[nodiscard]] int device() const noexcept { return p_ ? p_->dev.id : -1; }
  /// @brief True when the staged kernels are loaded; false means every device batch is DMA-only.
  [[nodiscard]] bool uses_kernels() const noexcept { return p_ && p_->kernels.has_value(); }
  /// @brief Why the kernels are not in use (empty when they are).
  [[nodiscard]] const std::string& kernel_status() const noexcept { return p_->kernel_note; }

 private:
  enum class route : std::uint8_t { host, store, retrieve, mixed };

  struct slab {
    std::byte* dev{nullptr};
    cudaEvent_t ready{};  // filled (store: gathered; retrieve: DMA'd in)
    cudaEvent_t free{};   // drained (store: DMA'd out; retrieve: scattered)
  };

  struct window {
    std::size_t begin, end;
    cudaEvent_t ev;
  };

  struct completion {
    cudaEvent_t ev{};  // null: `res` is already known
    result<void> res;
    transfer_callback done;
  };

  // Host bytes [host, host + bytes) mirrored at slab offset `slab_off`. The fragments placed in it
  // (descriptors [first_frag, end_frag) of the window) fill `covered` bytes of it: all of it when
  // they tile the span (1D runs; the heads of an HND block), and then one DMA moves the run.
  struct run {
    std::byte* host;
    std::size_t slab_off;
    std::size_t bytes;
    std::size_t covered;
    std::size_t first_frag, end_frag;
  };

  struct planned_slab {
    std::size_t first_frag{0}, frags{0};
    std::vector<run> runs;
  };

  // One direction: its own streams, slabs, descriptor ring and completion thread.
  struct lane {
    std::mutex m;  // serializes enqueueing
    bool ready{false};
    cudaStream_t stage{};  // kernels, high priority
    cudaStream_t copy{};   // slab DMA
    std::vector<cudaStream_t> dma;
    std::vector<slab> slabs;
    std::size_t next_slab{0};
    detail::kernel_fragment* hdesc{nullptr};  // pinned
    detail::kernel_fragment* ddesc{nullptr};
    std::size_t cap{0}, head{0};
    std::deque<window> windows;
    std::vector<cudaEvent_t> event_pool;
    std::vector<void*> dma_dst, dma_src;
    std::vector<std::size_t> dma_size;
    planned_slab plan;  // reused: no allocation per slab

    std::mutex cm;
    std::condition_variable ccv;
    std::deque<completion> queue;
    std::size_t pending{0};
    bool stop{false};
    std::thread worker;
  };

  struct impl {
    impl(const detail::cuda::device_info& d, const cuda_transfer_tuning& t, cuda_transfer_mode m)
        : dev(d), tune(t), mode(m) {}
    impl(const impl&) = delete;
    impl& operator=(const impl&) = delete;

    detail::cuda::device_info dev;
    cuda_transfer_tuning tune;
    cuda_transfer_mode mode;
    std::optional<detail::nvrtc::transfer_kernels> kernels;
    std::string kernel_note;
    lane lanes[2];  // 0: store (device -> host), 1: retrieve (host -> device)

    result<void> init() {
      detail::cuda::device_guard g(dev.id);
      if (mode != cuda_transfer_mode::dma) {
        auto k = detail::nvrtc::load_transfer_kernels(dev.id);
        if (k)
          kernels = *k;
        else
          kernel_note = k.error().what();
      } else {
        kernel_note = "DMA-only mode requested";
      }
      int lo = 0, hi = 0;
      if (auto r = detail::cuda::check(cudaDeviceGetStreamPriorityRange(&lo, &hi), "cudaDeviceGetStreamPriorityRange"); !r)
        return r;
      for (auto& l : lanes) {
        if (auto r = detail::cuda::check(cudaStreamCreateWithPriority(&l.stage, cudaStreamNonBlocking, hi),
                                         "cudaStreamCreateWithPriority");
            !r)
          return r;
        if (auto r = detail::cuda::check(cudaStreamCreateWithFlags(&l.copy, cudaStreamNonBlocking), "cudaStreamCreate"); !r)
          return r;
        l.dma.resize(tune.dma_streams);
        for (auto& s : l.dma)
          if (auto r = detail::cuda::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); !r)
            return r;
        lane* lp = &l;
        const int id = dev.id;
        try {
          l.worker = std::thread([lp, id] { complete_loop(*lp, id); });
        } catch (const std::exception& e) {
          return fail(errc::internal, std::string("cuda_transfer_scheduler: cannot start a thread: ") + e.what());
        }
      }
      return {};
    }

    ~impl() {
      drain();
      for (auto& l : lanes) {
        {
          std::lock_guard lk(l.cm);
          l.stop = true;
        }
        l.ccv.notify_all();
        if (l.worker.joinable()) l.worker.join();
      }
      detail::cuda::device_guard g(dev.id);
      for (auto& l : lanes) {
        if (l.stage) (void)cudaStreamSynchronize(l.stage);
        if (l.copy) (void)cudaStreamSynchronize(l.copy);
        for (auto& s : l.dma) (void)cudaStreamSynchronize(s);
        for (auto& w : l.windows) (void)cudaEventDestroy(w.ev);
        for (auto e : l.event_pool) (void)cudaEventDestroy(e);
        for (auto& s : l.slabs) {
          if (s.dev) (void)cudaFree(s.dev);
          if (s.ready) (void)cudaEventDestroy(s.ready);
          if (s.free) (void)cudaEventDestroy(s.free);
        }
        if (l.hdesc) (void)cudaFreeHost(l.hdesc);
        if (l.ddesc) (void)cudaFree(l.ddesc);
        if (l.stage) (void)cudaStreamDestroy(l.stage);
        if (l.copy) (void)cudaStreamDestroy(l.copy);
        for (auto& s : l.dma) (void)cudaStreamDestroy(s);
      }
      (void)cudaGetLastError();
    }

    static void complete_loop(lane& l, int device) {
      (void)cudaSetDevice(device);
      for (;;) {
        completion c;
        {
          std::unique_lock lk(l.cm);
          l.ccv.wait(lk, [&] { return l.stop || !l.queue.empty(); });
          if (l.queue.empty()) return;
          c = std::move(l.queue.front());
          l.queue.pop_front();
        }
        result<void> r = std::move(c.res);
        if (c.ev) {
          if (r) r = detail::cuda::check(cudaEventSynchronize(c.ev), "cuda_transfer_scheduler: transfer");
          (void)cudaEventDestroy(c.ev);
        }
        c.done(std::move(r));
        {
          std::lock_guard lk(l.cm);
          --l.pending;
        }
        l.ccv.notify_all();
      }
    }

    void drain() {
      for (auto& l : lanes) {
        std::unique_lock lk(l.cm);
        l.ccv.wait(lk, [&] { return l.pending == 0; });
      }
    }

    void finish(lane& l, cudaEvent_t ev, result<void> r, transfer_callback done) {
      {
        std::lock_guard lk(l.cm);
        l.queue.push_back({ev, std::move(r), std::move(done)});
      }
      l.ccv.notify_all();
    }

    static bool on_device(const void* p) {
      cudaPointerAttributes a{};
      if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
      }
      return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
    }

    static route classify(std::span<const copy_op> ops, const transfer_hints* h) {
      if (h) {
        if (h->cache_location == memory_location::host) return route::host;
        return h->direction == transfer_direction::to_store ? route::store : route::retrieve;
      }
      const auto one = [](const copy_op& op) {
        if (on_device(op.src)) return route::store;
        if (on_device(op.dst)) return route::retrieve;
        return route::host;
      };
      const route a = one(ops.front());
      if (ops.size() == 1 || a == one(ops.back())) return a;
      return route::host;  // mixed: resolved per op below
    }

    void submit(std::span<const copy_op> ops, const transfer_hints* hints, transfer_callback done) {
      if (ops.empty()) {
        done(result<void>{});
        return;
      }
      detail::cuda::device_guard g(dev.id);
      route rt = classify(ops, hints);
      if (rt == route::host && !hints) {
        // Mixed or host-only batch: anything touching the device goes through the DMA path.
        bool any_dev = false;
        for (const auto& op : ops)
          if (on_device(op.src) || on_device(op.dst)) {
            any_dev = true;
            break;
          }
        if (any_dev) rt = route::mixed;
      }
      if (rt == route::host) {
        for (const auto& op : ops) copy_host(op);
        done(result<void>{});
        return;
      }
      lane& l = lanes[rt == route::retrieve ? 1 : 0];
      {
        std::lock_guard lk(l.cm);
        ++l.pending;
      }
      cudaEvent_t ev{};
      result<void> r;
      {
        std::lock_guard lk(l.m);
        r = enqueue(l, rt, ops, hints, ev);
        if (!r) {
          // Some work may be in flight on the lane's streams and still use the ops' memory.
          (void)cudaStreamSynchronize(l.stage);
          (void)cudaStreamSynchronize(l.copy);
          for (auto s : l.dma) (void)cudaStreamSynchronize(s);
          (void)cudaGetLastError();
          if (ev) {
            (void)cudaEventDestroy(ev);
            ev = nullptr;
          }
        }
      }
      finish(l, ev, std::move(r), std::move(done));
    }

    result<void> lane_init(lane& l) {
      if (l.ready) return {};
      using detail::cuda::check;
      if (kernels) {
        l.slabs.resize(tune.slabs);
        for (auto& s : l.slabs) {
          if (auto r = check(cudaMalloc(reinterpret_cast<void**>(&s.dev), tune.slab_bytes), "cudaMalloc(staging slab)"); !r)
            return r;
          if (auto r = check(cudaEventCreateWithFlags(&s.ready, cudaEventDisableTiming), "cudaEventCreate"); !r) return r;
          if (auto r = check(cudaEventCreateWithFlags(&s.free, cudaEventDisableTiming), "cudaEventCreate"); !r) return r;
        }
        l.cap = tune.descriptor_capacity;
        const std::size_t bytes = l.cap * sizeof(detail::kernel_fragment);
        if (auto r = check(cudaHostAlloc(reinterpret_cast<void**>(&l.hdesc), bytes, cudaHostAllocDefault),
                           "cudaHostAlloc(descriptor ring)");
            !r)
          return r;
        if (auto r = check(cudaMalloc(reinterpret_cast<void**>(&l.ddesc), bytes), "cudaMalloc(descriptor ring)"); !r)
          return r;
      }
      l.ready = true;
      return {};
    }

    result<cudaEvent_t> take_event(lane& l) {
      if (!l.event_pool.empty()) {
        cudaEvent_t e = l.event_pool.back();
        l.event_pool.pop_back();
        return e;
      }
      cudaEvent_t e{};
      if (auto r = detail::cuda::check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate"); !r)
        return std::unexpected(r.error());
      return e;
    }

    // Room for `n` descriptors in the ring; waits for the oldest windows that overlap it.
    result<std::size_t> ring_acquire(lane& l, std::size_t n) {
      std::size_t pos = l.head + n > l.cap ? 0 : l.head;
      std::size_t last = 0;
      bool any = false;
      for (std::size_t i = 0; i < l.windows.size(); ++i) {
        const auto& w = l.windows[i];
        if (pos < w.end && w.begin < pos + n) {
          last = i;
          any = true;
        }
      }
      if (any) {
        for (std::size_t i = 0; i <= last; ++i) {
          auto w = l.windows.front();
          l.windows.pop_front();
          auto r = detail::cuda::check(cudaEventSynchronize(w.ev), "cudaEventSynchronize(descriptor ring)");
          l.event_pool.push_back(w.ev);
          if (!r) return std::unexpected(r.error());
        }
      }
      l.head = pos + n;
      return pos;
    }

    result<void> enqueue(lane& l, route rt, std::span<const copy_op> ops, const transfer_hints* h, cudaEvent_t& done_ev) {
      using detail::cuda::check;
      if (auto r = lane_init(l); !r) return r;
      if (auto r = check(cudaEventCreateWithFlags(&done_ev, cudaEventDisableTiming | cudaEventBlockingSync),
                         "cudaEventCreate");
          !r)
        return r;
      const bool store = rt != route::retrieve;
      auto* wait_ev = static_cast<cudaEvent_t>(h ? h->wait_event : nullptr);
      bool staged = kernels.has_value() && mode != cuda_transfer_mode::dma && rt != route::mixed;
      if (staged && mode == cuda_transfer_mode::automatic && tune.dma_min_fragment_bytes > 0) {
        std::size_t total = 0, frags = 0;
        for (const auto& op : ops) {
          total += total_bytes(op);
          frags += op.rows;
        }
        staged = frags == 0 || total / frags < tune.dma_min_fragment_bytes;
      }
      cudaStream_t last = nullptr;
      auto r = staged ? enqueue_staged(l, store, ops, wait_ev, last) : enqueue_dma(l, ops, wait_ev, last);
      if (!r) return r;
      if (auto e = check(cudaEventRecord(done_ev, last), "cudaEventRecord"); !e) return e;
      if (!store && h && h->stream)
        if (auto e = check(cudaStreamWaitEvent(static_cast<cudaStream_t>(h->stream), done_ev, 0),
                           "cudaStreamWaitEvent(hints.stream)");
            !e)
          return e;
      return {};
    }

    result<void> enqueue_dma(lane& l, std::span<const copy_op> ops, cudaEvent_t wait_ev, cudaStream_t& last) {
      using detail::cuda::check;
      // One batch entry per row: the batch API copies 1D ranges only.
      l.dma_dst.clear();
      l.dma_src.clear();
      l.dma_size.clear();
      for (const auto& op : ops)
        for (std::size_t r = 0; r < op.rows && op.bytes != 0; ++r) {
          l.dma_dst.push_back(op.dst + r * op.dst_pitch);
          l.dma_src.push_back(const_cast<std::byte*>(op.src) + r * op.src_pitch);
          l.dma_size.push_back(op.bytes);
        }
      const std::size_t count = l.dma_size.size();
      last = l.copy;
      if (wait_ev)
        if (auto r = check(cudaStreamWaitEvent(l.copy, wait_ev, 0), "cudaStreamWaitEvent(hints.wait_event)"); !r) return r;
      if (count == 0) return {};
      const std::size_t nstreams = std::min<std::size_t>(l.dma.size(), count);
      // Fork: every DMA stream starts after what the caller asked for and after the lane's earlier work.
      cudaEvent_t fork{};
      if (auto e = take_event(l); !e) return std::unexpected(e.error()); else fork = *e;
      auto give_back = [&](cudaEvent_t e) { l.event_pool.push_back(e); };
      if (auto r = check(cudaEventRecord(fork, l.copy), "cudaEventRecord"); !r) {
        give_back(fork);
        return r;
      }
      cudaMemcpyAttributes attr{};
      attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
      std::size_t attr_idx = 0;
      for (std::size_t s = 0; s < nstreams; ++s) {
        const std::size_t b = count * s / nstreams, e = count * (s + 1) / nstreams;
        if (auto r = check(cudaStreamWaitEvent(l.dma[s], fork, 0), "cudaStreamWaitEvent"); !r) return r;
        cudaError_t err = cudaMemcpyBatchAsync(l.dma_dst.data() + b, l.dma_src.data() + b, l.dma_size.data() + b,
                                               e - b, &attr, &attr_idx, 1, l.dma[s]);
        if (err == cudaErrorNotSupported || err == cudaErrorInvalidValue) {
          // Older drivers, or pointers the batch API refuses: one copy each.
          (void)cudaGetLastError();
          err = cudaSuccess;
          for (std::size_t i = b; i < e && err == cudaSuccess; ++i)
            err = cudaMemcpyAsync(l.dma_dst[i], l.dma_src[i], l.dma_size[i], cudaMemcpyDefault, l.dma[s]);
        }
        if (auto r = check(err, "cudaMemcpyBatchAsync"); !r) return r;
      }
      // Join back onto the copy stream.
      for (std::size_t s = 0; s < nstreams; ++s) {
        auto j = take_event(l);
        if (!j) return std::unexpected(j.error());
        if (auto r = check(cudaEventRecord(*j, l.dma[s]), "cudaEventRecord"); !r) return r;
        if (auto r = check(cudaStreamWaitEvent(l.copy, *j, 0), "cudaStreamWaitEvent"); !r) return r;
        give_back(*j);  // re-recording later is fine: the wait above captured this record
      }
      give_back(fork);
      return {};
    }

    result<void> enqueue_staged(lane& l, bool store, std::span<const copy_op> ops, cudaEvent_t wait_ev,
                                cudaStream_t& last) {
      using detail::cuda::check;
      constexpr std::size_t u32_max = 0xFFFFFFFFu;
      const std::size_t window_cap = std::max<std::size_t>(l.cap / 4, 1);
      const std::size_t slab_bytes = tune.slab_bytes;
      const std::size_t max_frag = tune.max_fragment_bytes;
      if (wait_ev) {
        cudaStream_t first = store ? l.stage : l.copy;
        if (auto r = check(cudaStreamWaitEvent(first, wait_ev, 0), "cudaStreamWaitEvent(hints.wait_event)"); !r) return r;
      }
      // Position in the batch: op, row, byte within the row.
      struct cursor {
        std::size_t op, row, col;
      };
      // The last point where the slab's last run was exactly tiled, saved when a piece breaks the
      // tiling; a slab that fills up mid-tile is cut back to it, so the tile moves whole with the
      // next slab (one DMA instead of one per piece).
      struct checkpoint {
        cursor at;
        std::size_t nfr, runs, used;
        run last;
      };
      cursor at{0, 0, 0};
      while (at.op < ops.size()) {
        // Plan one window of descriptors: whole slabs, each a list of fragments and host runs.
        auto base = ring_acquire(l, window_cap);
        if (!base) return std::unexpected(base.error());
        std::size_t nfr = 0;
        while (at.op < ops.size() && nfr < window_cap) {
          std::byte* const sbase = l.slabs[l.next_slab % l.slabs.size()].dev;
          planned_slab& ps = l.plan;
          ps.first_frag = nfr;
          ps.runs.clear();
          std::size_t used = 0;
          std::optional<checkpoint> cp;
          bool full = false;
          while (at.op < ops.size() && nfr < window_cap) {
            const copy_op& op = ops[at.op];
            if (op.bytes == 0 || op.rows == 0) {
              at = {at.op + 1, 0, 0};
              continue;
            }
            const std::size_t host_pitch = store ? op.dst_pitch : op.src_pitch;
            const std::size_t cache_pitch = store ? op.src_pitch : op.dst_pitch;
            std::byte* host = (store ? op.dst : const_cast<std::byte*>(op.src)) + at.row * host_pitch + at.col;
            std::byte* cache = (store ? const_cast<std::byte*>(op.src) : op.dst) + at.row * cache_pitch + at.col;
            // A piece joins the last run when it starts inside or right at the end of its span.
            run* cur = ps.runs.empty() ? nullptr : &ps.runs.back();
            const auto h = reinterpret_cast<std::uintptr_t>(host);
            const auto h0 = cur != nullptr ? reinterpret_cast<std::uintptr_t>(cur->host) : 0;
            if (op.rows == 1 && cur != nullptr && h - h0 == cur->bytes && cur->covered == cur->bytes) {
              // Common case (1D ops back to back in the chunk): extend a tiled run.
              const std::size_t off = cur->slab_off + cur->bytes;
              if (off >= slab_bytes) {
                full = true;
                break;
              }
              const std::size_t piece = std::min({op.bytes - at.col, max_frag, slab_bytes - off});
              auto& d = l.hdesc[*base + nfr];
              const auto slab_addr = reinterpret_cast<std::uint64_t>(sbase + off);
              const auto cache_addr = reinterpret_cast<std::uint64_t>(cache);
              d = {store ? cache_addr : slab_addr, store ? slab_addr : cache_addr, static_cast<std::uint32_t>(piece), 1, 0, 0};
              ++nfr;
              cur->bytes += piece;
              cur->covered += piece;
              cur->end_frag = nfr;
              used = off + piece;
              if ((at.col += piece) == op.bytes) at = {at.op + 1, 0, 0};
              if (used >= slab_bytes) {
                full = true;
                break;
              }
              continue;
            }
            const bool joins = cur != nullptr && h >= h0 && h - h0 <= cur->bytes;
            std::size_t off = 0;
            if (joins) {
              off = cur->slab_off + (h - h0);
            } else {
              // A new run keeps the host address's alignment so the kernel can use 16-byte accesses.
              off = (used + 255) / 256 * 256 + h % 256;
            }
            if (off >= slab_bytes) {
              full = true;
              break;
            }
            const std::size_t room = slab_bytes - off;
            // Ops that repeat the previous one's rows at a fixed distance on both sides (the heads of
            // an HND block) become one fragment of planes: one descriptor pair instead of one each.
            if (op.rows > 1 && at.row == 0 && at.col == 0 && at.op + 1 < ops.size() && nfr + 2 <= window_cap &&
                2 * op.rows * op.bytes <= max_frag && host_pitch >= op.bytes && host_pitch <= u32_max &&
                cache_pitch <= u32_max) {
              const copy_op& nx = ops[at.op + 1];
              const auto addr = [](const std::byte* x) { return static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(x)); };
              const std::uint64_t ds = addr(nx.src) - addr(op.src), dd = addr(nx.dst) - addr(op.dst);
              const std::uint64_t host_step = store ? dd : ds;
              const std::size_t span1 = (op.rows - 1) * host_pitch + op.bytes;
              std::size_t k = 1;
              if (host_step > 0 && host_step <= u32_max && span1 <= room) {
                const std::size_t most =
                    std::min({max_frag / (op.rows * op.bytes), ops.size() - at.op, (room - span1) / host_step + 1});
                const auto same = [&](const copy_op& a, const copy_op& b) {
                  return b.bytes == a.bytes && b.rows == a.rows && b.src_pitch == a.src_pitch &&
                         b.dst_pitch == a.dst_pitch && addr(b.src) - addr(a.src) == ds && addr(b.dst) - addr(a.dst) == dd;
                };
                while (k < most && same(ops[at.op + k - 1], ops[at.op + k])) ++k;
              }
              if (k >= 2) {
                const std::size_t span = (k - 1) * host_step + span1;
                const std::size_t moved = k * op.rows * op.bytes;
                const bool tiled = cur == nullptr || cur->covered == cur->bytes;
                const bool tiled_after = joins ? cur->covered + moved == std::max(cur->bytes, (h - h0) + span)
                                               : moved == span;
                if (tiled && !tiled_after)
                  cp = checkpoint{at, nfr, ps.runs.size(), used, cur != nullptr ? *cur : run{}};
                const auto slab_addr = reinterpret_cast<std::uint64_t>(sbase + off);
                const auto cache_addr = reinterpret_cast<std::uint64_t>(cache);
                auto& d = l.hdesc[*base + nfr];
                d.src = store ? cache_addr : slab_addr;
                d.dst = store ? slab_addr : cache_addr;
                d.bytes = static_cast<std::uint32_t>(op.bytes);
                d.rows = static_cast<std::uint32_t>(op.rows) | detail::fragment_planes_flag;
                d.src_pitch = static_cast<std::uint32_t>(op.src_pitch);
                d.dst_pitch = static_cast<std::uint32_t>(op.dst_pitch);
                l.hdesc[*base + nfr + 1] = {ds, dd, 0, static_cast<std::uint32_t>(k), 0, 0};
                nfr += 2;
                if (joins) {
                  cur->bytes = std::max(cur->bytes, (h - h0) + span);
                  cur->covered += moved;
                  cur->end_frag = nfr;
                } else {
                  ps.runs.push_back({host, off, span, moved, nfr - 2, nfr});
                }
                used = ps.runs.back().slab_off + ps.runs.back().bytes;
                at = {at.op + k, 0, 0};
                if (used >= slab_bytes) {
                  full = true;
                  break;
                }
                continue;
              }
            }
            // Several rows per piece while rows are short; long rows go one piece of a row at a time.
            std::size_t rows = 1, piece = 0;
            if (op.rows - at.row > 1 && at.col == 0 && op.bytes < max_frag && host_pitch >= op.bytes &&
                host_pitch <= u32_max && cache_pitch <= u32_max) {
              // Divisions only when the whole rest of the op does not fit (they cost more than the rest).
              rows = op.rows - at.row;
              if (rows * op.bytes > max_frag) rows = max_frag / op.bytes;
              if ((rows - 1) * host_pitch + op.bytes > room)
                rows = op.bytes > room ? 0 : std::min(rows, (room - op.bytes) / host_pitch + 1);
              if (rows == 0 && nfr > ps.first_frag) {
                full = true;
                break;
              }
              if (rows > 0) piece = op.bytes;
            }
            if (rows <= 1) {
              rows = 1;
              piece = std::min({op.bytes - at.col, max_frag, room});
            }
            {
              // Will the last run still be tiled after this piece? If not and it is now, remember now.
              const bool tiled = cur == nullptr || cur->covered == cur->bytes;
              const std::size_t span = (rows - 1) * host_pitch + piece;
              const bool tiled_after = joins ? cur->covered + rows * piece == std::max(cur->bytes, (h - h0) + span)
                                             : rows * piece == span;
              if (tiled && !tiled_after)
                cp = checkpoint{at, nfr, ps.runs.size(), used, cur != nullptr ? *cur : run{}};
            }
            auto& d = l.hdesc[*base + nfr];
            const auto slab_addr = reinterpret_cast<std::uint64_t>(sbase + off);
            const auto cache_addr = reinterpret_cast<std::uint64_t>(cache);
            d.src = store ? cache_addr : slab_addr;
            d.dst = store ? slab_addr : cache_addr;
            d.bytes = static_cast<std::uint32_t>(piece);
            d.rows = static_cast<std::uint32_t>(rows);
            d.src_pitch = rows > 1 ? static_cast<std::uint32_t>(store ? cache_pitch : host_pitch) : 0;
            d.dst_pitch = rows > 1 ? static_cast<std::uint32_t>(store ? host_pitch : cache_pitch) : 0;
            ++nfr;
            const std::size_t span = (rows - 1) * host_pitch + piece;
            if (joins) {
              cur->bytes = std::max(cur->bytes, (h - h0) + span);
              cur->covered += rows * piece;
              cur->end_frag = nfr;
            } else {
              ps.runs.push_back({host, off, span, rows * piece, nfr - 1, nfr});
            }
            used = ps.runs.back().slab_off + ps.runs.back().bytes;
            if (rows > 1) {
              at.row += rows;
            } else if ((at.col += piece) == op.bytes) {
              at.col = 0;
              ++at.row;
            }
            if (at.row == op.rows) at = {at.op + 1, 0, 0};
            if (used >= slab_bytes) {
              full = true;
              break;
            }
          }
          if ((full || nfr == window_cap) && at.op < ops.size() && !ps.runs.empty() &&
              ps.runs.back().covered != ps.runs.back().bytes && cp && cp->nfr > ps.first_frag) {
            at = cp->at;
            nfr = cp->nfr;
            ps.runs.resize(cp->runs);
            if (cp->runs != 0) ps.runs.back() = cp->last;
          }
          ps.frags = nfr - ps.first_frag;
          if (ps.frags == 0) break;
          // Enqueued at once, so the GPU starts while later slabs are still being planned.
          if (auto r = enqueue_slab(l, store, *base, ps); !r) return r;
        }
        if (nfr == 0) {
          if (at.op >= ops.size()) {  // only empty ops were left
            l.head = *base;
            break;
          }
          return fail(errc::internal, "cuda_transfer_scheduler: planned an empty window");
        }
        // Give back the part of the window this batch did not use, so that small batches (one
        // layer at a time) do not wait for the ring; recycle finished windows, at most 64 in flight.
        l.head = *base + nfr;
        while (!l.windows.empty()) {
          const window w = l.windows.front();
          if (l.windows.size() < 64 && cudaEventQuery(w.ev) == cudaErrorNotReady) break;
          l.windows.pop_front();
          const auto r = check(cudaEventSynchronize(w.ev), "cudaEventSynchronize(descriptor ring)");
          l.event_pool.push_back(w.ev);
          if (!r) return r;
        }
        auto wev = take_event(l);
        if (!wev) return std::unexpected(wev.error());
        if (auto r = check(cudaEventRecord(*wev, l.stage), "cudaEventRecord"); !r) {
          l.event_pool.push_back(*wev);
          return r;
        }
        l.windows.push_back({*base, *base + nfr, *wev});
      }
      last = store ? l.copy : l.stage;
      return {};
    }

    // Uploads one planned slab's descriptors and queues its kernel and DMAs.
    result<void> enqueue_slab(lane& l, bool store, std::size_t base, const planned_slab& ps) {
      using detail::cuda::check;
      detail::kernel_fragment* d = l.ddesc + base + ps.first_frag;
      // Descriptors go up ahead of the kernel that reads them: for a store on the stage stream
      // (the copy engine going up is idle); for a retrieve on the copy stream before the slab's
      // data, since on the stage stream they would queue behind earlier slabs' uploads and miss
      // the gaps between compute kernels in which the scatter can get SMs.
      if (auto r = check(cudaMemcpyAsync(d, l.hdesc + base + ps.first_frag, ps.frags * sizeof(detail::kernel_fragment),
                                         cudaMemcpyHostToDevice, store ? l.stage : l.copy),
                         "cudaMemcpyAsync(descriptors)");
          !r)
        return r;
      slab& s = l.slabs[l.next_slab++ % l.slabs.size()];
      // One DMA per run; a run its pieces do not tile moves piece by piece (only its own bytes).
      const auto dma = [&](const run& rn) -> result<void> {
        const auto kind = store ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
        if (rn.covered == rn.bytes) {
          void* dst = store ? static_cast<void*>(rn.host) : static_cast<void*>(s.dev + rn.slab_off);
          const void* src = store ? static_cast<const void*>(s.dev + rn.slab_off) : static_cast<const void*>(rn.host);
          return check(cudaMemcpyAsync(dst, src, rn.bytes, kind, l.copy), "cudaMemcpyAsync(slab run)");
        }
        for (std::size_t i = rn.first_frag; i < rn.end_frag; ++i) {
          const detail::kernel_fragment& f = l.hdesc[base + i];
          if (f.bytes == 0) continue;  // extension record
          const bool has_planes = (f.rows & detail::fragment_planes_flag) != 0;
          const std::uint32_t rows = f.rows & ~detail::fragment_planes_flag;
          const std::uint32_t planes = has_planes ? l.hdesc[base + i + 1].rows : 1;
          const std::uint64_t slab_step = has_planes ? (store ? l.hdesc[base + i + 1].dst : l.hdesc[base + i + 1].src) : 0;
          for (std::uint32_t p = 0; p < planes; ++p) {
            auto* slab_p = reinterpret_cast<std::byte*>(store ? f.dst : f.src) + p * slab_step;
            std::byte* host_p = rn.host + (slab_p - (s.dev + rn.slab_off));
            const std::size_t pitch = store ? f.dst_pitch : f.src_pitch;
            void* dst = store ? static_cast<void*>(host_p) : static_cast<void*>(slab_p);
            const void* src = store ? static_cast<const void*>(slab_p) : static_cast<const void*>(host_p);
            const cudaError_t e = rows > 1 ? cudaMemcpy2DAsync(dst, pitch, src, pitch, f.bytes, rows, kind, l.copy)
                                           : cudaMemcpyAsync(dst, src, f.bytes, kind, l.copy);
            if (auto r = check(e, "cudaMemcpyAsync(slab piece)"); !r) return r;
          }
        }
        return {};
      };
      if (store) {
        if (auto r = gather_or_scatter(l, true, d, ps.frags, s.free); !r) return r;
        if (auto r = check(cudaEventRecord(s.ready, l.stage), "cudaEventRecord"); !r) return r;
        if (auto r = check(cudaStreamWaitEvent(l.copy, s.ready, 0), "cudaStreamWaitEvent"); !r) return r;
        for (const auto& rn : ps.runs)
          if (auto r = dma(rn); !r) return r;
        return check(cudaEventRecord(s.free, l.copy), "cudaEventRecord");
      }
      if (auto r = check(cudaStreamWaitEvent(l.copy, s.free, 0), "cudaStreamWaitEvent"); !r) return r;
      for (const auto& rn : ps.runs)
        if (auto r = dma(rn); !r) return r;
      if (auto r = check(cudaEventRecord(s.ready, l.copy), "cudaEventRecord"); !r) return r;
      if (auto r = gather_or_scatter(l, false, d, ps.frags, s.ready); !r) return r;
      return check(cudaEventRecord(s.free, l.stage), "cudaEventRecord");
    }

    // Launches the gather (store) or scatter (retrieve) kernel on the stage stream after `after`.
    result<void> gather_or_scatter(lane& l, bool gather, detail::kernel_fragment* frags, std::size_t n, cudaEvent_t after) {
      using detail::cuda::check;
      if (auto r = check(cudaStreamWaitEvent(l.stage, after, 0), "cudaStreamWaitEvent"); !r) return r;
      auto* f = frags;
      auto count = static_cast<unsigned>(n);
      void* args[] = {&f, &count};
      const unsigned warps_per_cta = tune.threads / 32;
      const unsigned ctas = std::max(1u, std::min(tune.ctas, static_cast<unsigned>((n + warps_per_cta - 1) / warps_per_cta)));
      const cudaKernel_t k = gather ? kernels->gather : kernels->scatter;
      return check(cudaLaunchKernel(reinterpret_cast<const void*>(k), dim3(ctas), dim3(tune.threads), args, 0, l.stage),
                   gather ? "cudaLaunchKernel(gather)" : "cudaLaunchKernel(scatter)");
    }
  };

  explicit cuda_transfer_scheduler(std::unique_ptr<impl> p) noexcept : p_(std::move(p)) {}

  std::unique_ptr<impl> p_;
};

static_assert(transfer_scheduler<cuda_transfer_scheduler>,
              "cuda_transfer_scheduler does not satisfy kvortex::transfer_scheduler");

}  // namespace kvortex
