#pragma once
/// @file host_transfer_scheduler.hpp
/// @brief Host-to-host copies: small batches inline, large ones split across a thread pool.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "kvortex/concepts/transfer_scheduler.hpp"
#include "kvortex/config.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Copies with `memcpy`. A batch below `parallel_bytes` runs on the caller's thread (a
/// thread hand-off costs more than copying a few MiB); a larger one is cut into equal byte ranges,
/// one per thread, the caller's thread included, since one core cannot saturate memory bandwidth.
/// The ranges count the bytes of every op row after row, so a 2D op is split between rows or
/// inside one.
class host_transfer_scheduler {
 public:
  /// @param threads copy threads including the caller's; 0 picks `hardware_concurrency`, capped at 8.
  /// @param parallel_bytes batches of at least this many bytes are split across threads.
  explicit host_transfer_scheduler(unsigned threads = 0, std::size_t parallel_bytes = std::size_t{8} << 20)
      : pool_(std::make_unique<pool>(pick_threads(threads), parallel_bytes)) {}

  /// @brief Takes `transfer_threads` and `parallel_copy_bytes` from the engine's configuration.
  explicit host_transfer_scheduler(const engine_config& cfg)
      : host_transfer_scheduler(cfg.transfer_threads, cfg.parallel_copy_bytes) {}

  host_transfer_scheduler(host_transfer_scheduler&&) noexcept = default;
  host_transfer_scheduler& operator=(host_transfer_scheduler&&) noexcept = default;
  ~host_transfer_scheduler() = default;

  /// @brief Copy threads, the caller's included.
  [[nodiscard]] unsigned threads() const noexcept { return static_cast<unsigned>(pool_->workers.size()) + 1; }

  void submit(std::span<const copy_op> ops, transfer_callback done) {
    std::size_t total = 0;
    for (const auto& op : ops) total += total_bytes(op);
    const std::size_t parts = pool_->workers.empty() || total < pool_->parallel_bytes ? 1 : threads();
    if (parts == 1) {
      copy_range(ops, 0, total);
      done(result<void>{});
      return;
    }
    auto b = std::make_shared<batch>(ops, std::move(done), parts);
    {
      std::lock_guard lk(pool_->m);
      ++pool_->pending;
      for (std::size_t i = 1; i < parts; ++i)
        pool_->queue.emplace_back([b, i, total, parts] { b->run(total * i / parts, total * (i + 1) / parts); });
    }
    pool_->work.notify_all();
    b->run(0, total / parts);
    // The last part to finish has already called done; only the pending count remains.
    std::lock_guard lk(pool_->m);
    if (--pool_->pending == 0) pool_->idle.notify_all();
  }

  void drain() {
    std::unique_lock lk(pool_->m);
    pool_->idle.wait(lk, [&] { return pool_->pending == 0 && pool_->queue.empty() && pool_->busy == 0; });
  }

 private:
  static unsigned pick_threads(unsigned requested) {
    if (requested != 0) return requested;
    return std::clamp(std::thread::hardware_concurrency(), 1u, 8u);
  }

  // Copies bytes [begin, end) of the batch, counted across its ops in order.
  static void copy_range(std::span<const copy_op> ops, std::size_t begin, std::size_t end) {
    std::size_t at = 0;
    for (const auto& op : ops) {
      const std::size_t n = total_bytes(op);
      const std::size_t lo = std::max(begin, at), hi = std::min(end, at + n);
      if (lo < hi) copy_host(op, lo - at, hi - at);
      at += n;
      if (at >= end) break;
    }
  }

  struct batch {
    batch(std::span<const copy_op> o, transfer_callback d, std::size_t parts)
        : ops(o), done(std::move(d)), left(parts) {}
    void run(std::size_t begin, std::size_t end) {
      copy_range(ops, begin, end);
      if (left.fetch_sub(1, std::memory_order_acq_rel) == 1) done(result<void>{});
    }
    std::span<const copy_op> ops;
    transfer_callback done;
    std::atomic<std::size_t> left;
  };

  struct pool {
    pool(unsigned threads, std::size_t bytes) : parallel_bytes(bytes) {
      for (unsigned i = 1; i < threads; ++i) workers.emplace_back([this](std::stop_token st) { loop(st); });
    }
    ~pool() {
      for (auto& w : workers) w.request_stop();
      work.notify_all();
    }
    void loop(std::stop_token st) {
      for (;;) {
        std::function<void()> task;
        {
          std::unique_lock lk(m);
          work.wait(lk, [&] { return st.stop_requested() || !queue.empty(); });
          if (queue.empty()) return;
          task = std::move(queue.front());
          queue.pop_front();
          ++busy;
        }
        task();
        std::lock_guard lk(m);
        if (--busy == 0 && queue.empty() && pending == 0) idle.notify_all();
      }
    }
    std::size_t parallel_bytes;
    std::mutex m;
    std::condition_variable work, idle;
    std::deque<std::function<void()>> queue;
    std::size_t pending{0}, busy{0};
    std::vector<std::jthread> workers;  // last: joined first, while the members above still live
  };

  std::unique_ptr<pool> pool_;
};

static_assert(transfer_scheduler<host_transfer_scheduler>,
              "host_transfer_scheduler does not satisfy kvortex::transfer_scheduler");

}  // namespace kvortex
