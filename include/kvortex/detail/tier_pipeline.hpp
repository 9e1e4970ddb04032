#pragma once
/// @file tier_pipeline.hpp
/// @brief How chunks move between host memory and the storage tiers of a `tiered_backend`: the
/// bounded demotion queue and its threads, promotion (batched reads into reserved memory), probes
/// of the tiers for lookups, and prefetch jobs.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "kvortex/config.hpp"
#include "kvortex/detail/chunk_index.hpp"
#include "kvortex/error.hpp"
#include "kvortex/logging.hpp"
#include "kvortex/stats.hpp"
#include "kvortex/types.hpp"

namespace kvortex::detail {

template <class Index, class Backend>
class tier_pipeline final : public eviction_sink<typename Backend::handle> {
 public:
  using handle_type = typename Backend::handle;
  using reservation = typename Index::reservation;
  using clock = std::chrono::steady_clock;
  static constexpr std::size_t tiers = Backend::tier_count;

  tier_pipeline(const tiering_config& cfg, Index& index, Backend& backend) noexcept
      : cfg_(cfg), index_(index), backend_(backend) {}
  tier_pipeline(const tier_pipeline&) = delete;
  tier_pipeline& operator=(const tier_pipeline&) = delete;
  ~tier_pipeline() { stop(false); }

  /// Starts the threads; on failure joins those started and names the system error.
  [[nodiscard]] result<void> start() noexcept {
    try {
      for (unsigned i = 0; i < cfg_.tier_threads; ++i) threads_.emplace_back([this] { run(); });
    } catch (const std::system_error& e) {
      stop(false);
      return fail(errc::internal, std::string("tier threads: cannot start a thread: ") + e.what());
    } catch (const std::bad_alloc&) {
      stop(false);
      return fail(errc::out_of_memory, "tier threads: cannot allocate");
    }
    index_.set_sink(this);
    return {};
  }

  /// Stops the threads: with `drain`, after the queued demotions are written; pending prefetch
  /// jobs are cancelled either way, and what the queue still holds is let go (counted dropped).
  /// Call before the index is torn down.
  void stop(bool drain) noexcept {
    {
      std::unique_lock lk(m_);
      if (stopping_ && threads_.empty()) return;
      stopping_ = true;
      drain_ = drain;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    index_.set_sink(nullptr);
    std::deque<std::function<void(bool)>> jobs;
    std::deque<item> left;
    {
      std::lock_guard lk(m_);
      jobs.swap(jobs_);
      left.swap(queue_);
    }
    for (auto& j : jobs) j(false);
    if (!left.empty()) {
      std::unique_lock ilk(index_.mutex());
      for (const auto& it : left) finish_locked(it, false);
    }
    if (!left.empty()) {
      std::lock_guard lk(m_);
      dropped_ += left.size();
      depth_ -= left.size();
      for (const auto& it : left) queued_bytes_ -= it.bytes;
    }
    idle_.notify_all();
    report_drops();
  }

  // ---- demotion -------------------------------------------------------------------------------

  /// Write-through: queues a chunk just published (the caller holds the index lock exclusively);
  /// pins it until written. Full queue: dropped and counted.
  void enqueue_locked(const chunk_key& k, typename Index::entry& e) noexcept {
    if (!push({k, e.handle, e.bytes, false})) return;
    ++e.pins;
  }

  /// Write-back only: an evicted chunk no tier holds goes down with its memory.
  bool adopt(const chunk_key& k, handle_type h, std::size_t bytes) noexcept override {
    return cfg_.write == write_policy::write_back && push({k, h, bytes, true});
  }

  bool cancel_one() noexcept override {
    item victim;
    {
      std::lock_guard lk(m_);
      // The newest: the oldest is about to be written.
      const auto it = std::find_if(queue_.rbegin(), queue_.rend(), [](const item& i) { return !i.owned; });
      if (it == queue_.rend()) return false;
      victim = *it;
      queue_.erase(std::next(it).base());
      ++dropped_;
      --depth_;
      queued_bytes_ -= victim.bytes;
      if (queue_.empty() && busy_ == 0) idle_.notify_all();
    }
    if (auto* e = index_.find_locked(victim.key)) --e->pins;
    return true;
  }

  bool reclaim_one() noexcept override {
    item victim;
    {
      std::lock_guard lk(m_);
      const auto it = std::find_if(queue_.begin(), queue_.end(), [](const item& i) { return i.owned; });
      if (it == queue_.end()) return false;
      victim = *it;
      queue_.erase(it);
      ++dropped_;
      --depth_;
      queued_bytes_ -= victim.bytes;
      if (queue_.empty() && busy_ == 0) idle_.notify_all();
    }
    index_.free_adopted_locked(victim.key, victim.handle);
    return true;
  }

  /// Waits until every queued demotion is written (or the pipeline stops).
  void flush() {
    std::unique_lock lk(m_);
    idle_.wait(lk, [&] { return (queue_.empty() && busy_ == 0) || stopping_; });
  }

  // ---- lookups --------------------------------------------------------------------------------

  /// How many of `keys` from `from` on the tiers hold, greedily: each tier in order extends the
  /// run where the previous stopped, repeated while one makes progress. `source[i]` gets the tier
  /// of chunk i (resized to keys.size()); `found[j]` the chunks credited to tier j. A lookup's
  /// probe (`count_lookup`) adds to the tiers' lookup hit counters.
  std::size_t probe(std::span<const chunk_key> keys, std::size_t from, std::vector<std::uint8_t>& source,
                    std::array<std::size_t, tiers>& found, bool count_lookup) {
    source.assign(keys.size(), 0);
    found.fill(0);
    std::size_t frontier = from;
    for (bool progress = true; progress && frontier < keys.size();) {
      progress = false;
      for (std::size_t j = 0; j < tiers && frontier < keys.size(); ++j) {
        const std::size_t n = std::min(backend_.tier_contains(j, keys.subspan(frontier)), keys.size() - frontier);
        for (std::size_t i = frontier; i < frontier + n; ++i) source[i] = static_cast<std::uint8_t>(j);
        found[j] += n;
        frontier += n;
        if (n > 0) progress = true;
      }
    }
    if (count_lookup)
      for (std::size_t j = 0; j < tiers; ++j) lookup_hits_[j].fetch_add(found[j], std::memory_order_relaxed);
    return frontier - from;
  }

  // ---- promotion ------------------------------------------------------------------------------

  struct promotion {
    std::size_t chunks{0};  // chunks from `from` on now in memory (pinned when asked)
    bool timed_out{false};
  };

  /// Brings `keys[from, ...)` (with `sizes`) up from the tiers into memory, batch by batch, and
  /// hands each batch's chunks (in key order, pinned when `keep_pinned`) to `on_batch` as soon as
  /// they are readable, so the caller's copies of one batch overlap the reads of the next. Stops
  /// at the first chunk no tier delivers (absent, corrupt, failed), that memory cannot take, or
  /// at `deadline`. Runs in the caller's thread; the caller keeps the engine up meanwhile.
  template <class OnBatch>
  promotion promote(std::span<const chunk_key> keys, std::span<const std::size_t> sizes, std::size_t from,
                    clock::time_point deadline, bool keep_pinned, OnBatch&& on_batch) {
    promotion out;
    if (from >= keys.size()) return out;
    std::vector<std::uint8_t> source;
    std::array<std::size_t, tiers> found{};
    const std::size_t end = from + probe(keys, from, source, found, /*count_lookup=*/false);
    const std::size_t batch = cfg_.promotion_batch_chunks;
    std::vector<reservation> ready;     // chunks of this batch in memory, in key order
    std::vector<bool> reserved;         // ready[i] was reserved here (read from a tier), not found in memory
    std::vector<chunk_key> rkeys;
    std::vector<std::span<std::byte>> routs;
    std::size_t i = from;
    while (i < end) {
      if (clock::now() >= deadline) {
        out.timed_out = true;
        timeouts_.fetch_add(1, std::memory_order_relaxed);
        if (log_enabled(log_level::warning))
          log(log_level::warning, "engine", "tier_timeout",
              "bringing a prefix up from the tiers took longer than tiering.promotion_timeout (" +
                  std::to_string(cfg_.promotion_timeout.count()) + " ms); served " + std::to_string(out.chunks) +
                  " chunks of " + std::to_string(end - from));
        break;
      }
      const std::uint8_t src = source[i];
      ready.clear();
      reserved.clear();
      bool stop = false;
      {
        std::unique_lock lk(index_.mutex());
        if (index_.stopped().load(std::memory_order_relaxed)) break;
        for (std::size_t n = 0; n < batch && i + n < end && source[i + n] == src; ++n) {
          const std::size_t k = i + n;
          auto* e = index_.find_locked(keys[k]);
          if (e != nullptr && !e->ready && n == 0) {
            // Another call is bringing it in: wait for it (bounded by the deadline).
            const chunk_key key = keys[k];
            index_.changed().wait_until(lk, deadline, [&] {
              auto* w = index_.find_locked(key);
              return w == nullptr || w->ready || index_.stopped().load(std::memory_order_relaxed);
            });
            e = index_.find_locked(keys[k]);
            if (index_.stopped().load(std::memory_order_relaxed) || (e != nullptr && !e->ready)) {
              stop = true;
              break;
            }
          }
          if (e != nullptr) {
            if (!e->ready) break;  // later in the batch: take it in the next one
            if (e->bytes != sizes[k] || index_.pin_locked(keys[k], sizes[k]) == nullptr) {
              stop = true;
              break;
            }
            ready.push_back({k, keys[k], e->handle, e->bytes});
            reserved.push_back(false);
            continue;
          }
          auto r = index_.reserve_one_locked(keys[k], sizes[k], k);
          if (!r) {
            stop = true;
            break;
          }
          ready.push_back(*r);
          reserved.push_back(true);
        }
      }
      // Read what was reserved, in one batch from the source tier.
      rkeys.clear();
      routs.clear();
      for (std::size_t n = 0; n < ready.size(); ++n)
        if (reserved[n]) {
          rkeys.push_back(ready[n].key);
          routs.push_back(backend_.data(ready[n].handle));
        }
      std::vector<result<std::size_t>> got;
      if (!rkeys.empty()) got = backend_.tier_get_many(src, rkeys, routs);
      std::size_t good = ready.size();  // chunks of the batch that made it, a prefix
      for (std::size_t n = 0, g = 0; n < ready.size(); ++n) {
        if (!reserved[n]) continue;
        const auto& r = got[g++];
        bool ok = n < good && r && *r == ready[n].bytes;
        if (ok) ok = static_cast<bool>(backend_.commit(ready[n].key, ready[n].handle));
        if (!ok && n < good) {
          good = n;
          failures_[src].fetch_add(1, std::memory_order_relaxed);
        }
      }
      std::size_t promoted_here = 0;
      {
        std::unique_lock lk(index_.mutex());
        for (std::size_t n = 0; n < ready.size(); ++n) {
          if (n < good) {
            if (reserved[n]) {
              index_.publish_locked(ready[n].key, /*below=*/true, keep_pinned ? 1 : 0);
              ++promoted_here;
            } else if (!keep_pinned) {
              index_.unpin_locked(ready[n].key);
            }
          } else if (reserved[n]) {
            index_.drop_locked(ready[n].key, ready[n].handle, ready[n].bytes);
          } else {
            index_.unpin_locked(ready[n].key);
          }
        }
      }
      index_.changed().notify_all();
      promoted_[src].fetch_add(promoted_here, std::memory_order_relaxed);
      if (good > 0) on_batch(std::span<const reservation>(ready.data(), good));
      out.chunks += good;
      i += good;
      if (stop || good < ready.size() || ready.empty()) break;
    }
    return out;
  }

  // ---- prefetch jobs --------------------------------------------------------------------------

  /// Queues `job` for a tier thread; `job(false)` is called instead if the pipeline stops first.
  /// Fails when as many jobs as tier threads times 64 are already waiting.
  [[nodiscard]] result<void> post(std::function<void(bool)> job) {
    {
      std::lock_guard lk(m_);
      if (stopping_) return fail(errc::shut_down, "prefetch: the engine was shut down");
      if (jobs_.size() >= std::size_t{cfg_.tier_threads} * 64)
        return fail(errc::capacity_exhausted, "prefetch: " + std::to_string(jobs_.size()) + " prefetches are already waiting");
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
    return {};
  }

  /// Adds the pipeline's and every tier's counters to `out`.
  void fill(engine_stats& out) const {
    {
      std::lock_guard lk(m_);
      out.demotions_queued = queued_;
      out.demotions_dropped = dropped_;
      out.demotion_queue_depth = depth_;
      out.demotion_queue_bytes = queued_bytes_;
    }
    out.promotion_timeouts = timeouts_.load(std::memory_order_relaxed);
    out.prefetches = prefetches_.load(std::memory_order_relaxed);
    out.tiers.clear();
    for (std::size_t j = 0; j < tiers; ++j) {
      tier_report t;
      t.name = std::string(backend_.tier_name(j));
      t.tier = backend_.tier_stats_of(j);
      t.lookup_hit_chunks = lookup_hits_[j].load(std::memory_order_relaxed);
      t.promoted_chunks = promoted_[j].load(std::memory_order_relaxed);
      t.promotion_failures = failures_[j].load(std::memory_order_relaxed);
      t.demoted_chunks = demoted_[j].load(std::memory_order_relaxed);
      t.demotion_failures = demotion_failures_[j].load(std::memory_order_relaxed);
      out.tiers.push_back(std::move(t));
    }
  }

  void count_prefetch() noexcept { prefetches_.fetch_add(1, std::memory_order_relaxed); }

 private:
  struct item {
    chunk_key key{};
    handle_type handle{};
    std::size_t bytes{0};
    bool owned{false};  // write-back: the index let go of it; free it once written
  };

  // Called under the index lock: counts a drop, logs nothing (report_drops does, lock-free).
  bool push(item it) noexcept {
    std::lock_guard lk(m_);
    if (!stopping_ && queue_.size() < cfg_.demotion_queue_chunks && queued_bytes_ + it.bytes <= cfg_.demotion_queue_bytes) {
      try {
        queue_.push_back(it);
        ++queued_;
        ++depth_;
        queued_bytes_ += it.bytes;
        cv_.notify_one();
        return true;
      } catch (...) {  // no memory for the queue node: dropped like a full queue
      }
    }
    ++dropped_;
    return false;
  }

 public:
  /// Logs the demotions dropped since the last report (one rate-limited record). Called with no
  /// lock held, after stores and by the tier threads.
  void report_drops() noexcept {
    std::uint64_t fresh = 0, total = 0;
    {
      std::lock_guard lk(m_);
      fresh = dropped_ - reported_drops_;
      reported_drops_ = dropped_;
      total = dropped_;
    }
    if (fresh > 0 && log_enabled(log_level::warning))
      log(log_level::warning, "engine", "demotion_dropped",
          std::to_string(fresh) + " demotions dropped (" + std::to_string(total) +
              " in all): the demotion queue was full (tiering.demotion_queue_chunks, demotion_queue_bytes), "
              "a store needed the memory, or the engine shut down");
  }

 private:
  // Gives an item's chunk back to the index: frees an adopted one, unpins a write-through one
  // (marking it held below when a tier took it). Caller holds the index lock exclusively.
  void finish_locked(const item& it, bool stored_below) noexcept {
    if (it.owned) {
      index_.free_adopted_locked(it.key, it.handle);
      return;
    }
    if (auto* e = index_.find_locked(it.key)) {
      --e->pins;
      if (stored_below) e->below = true;
    }
  }

  void write(const item& it) noexcept {
    const auto bytes = backend_.data(it.handle);
    bool any = false;
    for (std::size_t j = 0; j < tiers; ++j) {
      auto r = backend_.tier_put(j, it.key, std::span<const std::byte>(bytes.data(), it.bytes));
      if (r) {
        any = true;
        demoted_[j].fetch_add(1, std::memory_order_relaxed);
      } else {
        demotion_failures_[j].fetch_add(1, std::memory_order_relaxed);
        if (log_enabled(log_level::warning))
          log(log_level::warning, "engine", "demotion_failed",
              "tier " + std::string(backend_.tier_name(j)) + " refused chunk " + it.key.hex() + ": " + r.error().message);
      }
    }
    {
      std::unique_lock ilk(index_.mutex());
      finish_locked(it, any);
    }
  }

  void run() noexcept {
    std::unique_lock lk(m_);
    for (;;) {
      cv_.wait(lk, [&] { return stopping_ || !jobs_.empty() || !queue_.empty(); });
      if (!jobs_.empty() && !stopping_) {  // prefetches first: a request waits on them
        auto job = std::move(jobs_.front());
        jobs_.pop_front();
        ++busy_;
        lk.unlock();
        job(true);
        lk.lock();
        --busy_;
        continue;
      }
      if (!queue_.empty() && (!stopping_ || drain_)) {
        const item it = queue_.front();
        queue_.pop_front();
        ++busy_;
        lk.unlock();
        write(it);
        lk.lock();
        --busy_;
        --depth_;
        queued_bytes_ -= it.bytes;
        if (queue_.empty() && busy_ == 0) idle_.notify_all();
        if (dropped_ != reported_drops_) {
          lk.unlock();
          report_drops();
          lk.lock();
        }
        continue;
      }
      if (stopping_) break;
    }
    idle_.notify_all();
  }

  const tiering_config cfg_;
  Index& index_;
  Backend& backend_;

  mutable std::mutex m_;  // guards what follows; taken after the index lock, never before it
  std::condition_variable cv_, idle_;
  std::deque<item> queue_;
  std::deque<std::function<void(bool)>> jobs_;
  std::vector<std::thread> threads_;
  std::size_t busy_{0}, depth_{0}, queued_bytes_{0};
  std::uint64_t queued_{0}, dropped_{0}, reported_drops_{0};
  bool stopping_{false}, drain_{false};

  std::array<std::atomic<std::uint64_t>, tiers> lookup_hits_{}, promoted_{}, failures_{}, demoted_{}, demotion_failures_{};
  std::atomic<std::uint64_t> timeouts_{0}, prefetches_{0};
};

}  // namespace kvortex::detail
