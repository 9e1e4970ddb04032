#pragma once
/// @file host_transfer_scheduler.hpp
/// @brief Host-to-host copies: small batches inline, large ones split across a thread pool.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
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
///
/// Threads: at most `max_threads` (256), the caller's included. `create` fails when a copy thread
/// cannot be started; the constructors keep the threads that did start (`threads()` says how many).
class host_transfer_scheduler {
 public:
  /// @brief Upper bound on copy threads, the caller's included; larger requests are capped to it.
  static constexpr unsigned max_threads = 256;

  /// @param threads copy threads including the caller's; 0 picks `hardware_concurrency`, capped at 8.
  /// @param parallel_bytes batches of at least this many bytes are split across threads.
  explicit host_transfer_scheduler(unsigned threads = 0, std::size_t parallel_bytes = std::size_t{8} << 20)
      : pool_(std::make_unique<pool>(parallel_bytes)) {
    pool_->start(pick_threads(threads));
  }

  /// @brief Takes `transfer_threads` and `parallel_copy_bytes` from the engine's configuration.
  explicit host_transfer_scheduler(const engine_config& cfg)
      : host_transfer_scheduler(cfg.transfer_threads, cfg.parallel_copy_bytes) {}

  /// @brief As the configuration constructor, but fails with `errc::internal` (naming the system
  /// error) when a copy thread cannot be started, and with `errc::out_of_memory` when the pool
  /// cannot be allocated. The engine builds its scheduler through this.
  [[nodiscard]] static result<host_transfer_scheduler> create(const engine_config& cfg) noexcept {
    std::unique_ptr<pool> p;
    try {
      p = std::make_unique<pool>(cfg.parallel_copy_bytes);
    } catch (...) {
      return fail(errc::out_of_memory, "host_transfer_scheduler: cannot allocate the thread pool");
    }
    const unsigned want = pick_threads(cfg.transfer_threads);
    if (auto started = p->start(want); !started) return std::unexpected(started.error());
    return host_transfer_scheduler(std::move(p));
  }

  host_transfer_scheduler(host_transfer_scheduler&&) noexcept = default;
  host_transfer_scheduler& operator=(host_transfer_scheduler&&) noexcept = default;
  ~host_transfer_scheduler() = default;

  /// @brief Copy threads, the caller's included (0 once moved from).
  [[nodiscard]] unsigned threads() const noexcept {
    return pool_ ? static_cast<unsigned>(pool_->workers.size()) + 1 : 0;
  }

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
    if (!pool_) return;
    std::unique_lock lk(pool_->m);
    pool_->idle.wait(lk, [&] { return pool_->pending == 0 && pool_->queue.empty() && pool_->busy == 0; });
  }

 private:
  struct pool;
  explicit host_transfer_scheduler(std::unique_ptr<pool> p) noexcept : pool_(std::move(p)) {}

  static unsigned pick_threads(unsigned requested) noexcept {
    if (requested != 0) return std::min(requested, max_threads);
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
    explicit pool(std::size_t bytes) : parallel_bytes(bytes) {}
    pool(const pool&) = delete;
    pool& operator=(const pool&) = delete;
    // The stop flag is set under the mutex: a worker between its predicate check and its wait
    // cannot miss it.
    ~pool() {
      {
        std::lock_guard lk(m);
        stopping = true;
      }
      work.notify_all();
      for (auto& w : workers) w.join();
    }

    // Starts workers until `threads` copy threads exist (the caller's counts as one); on failure
    // the ones started keep serving and the error names the cause.
    result<void> start(unsigned threads) noexcept {
      try {
        workers.reserve(threads > 0 ? threads - 1 : 0);
        for (unsigned i = 1; i < threads; ++i) workers.emplace_back([this] { loop(); });
      } catch (const std::exception& e) {
        return fail(errc::internal, "host_transfer_scheduler: started " + std::to_string(workers.size()) + " of " +
                                        std::to_string(threads - 1) + " copy threads: " + e.what());
      }
      return {};
    }

    void loop() {
      for (;;) {
        std::function<void()> task;
        {
          std::unique_lock lk(m);
          work.wait(lk, [&] { return stopping || !queue.empty(); });
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
    bool stopping{false};
    std::vector<std::thread> workers;
  };

  std::unique_ptr<pool> pool_;
};

static_assert(transfer_scheduler<host_transfer_scheduler>,
              "host_transfer_scheduler does not satisfy kvortex::transfer_scheduler");

}  // namespace kvortex
