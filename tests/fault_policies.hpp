#pragma once
// Test-only policies that fail on purpose, for fault-injection and lifetime tests, and two guards
// that turn a hang into a test failure. Every policy keeps its knobs and counters in a shared
// control block, so a test steers it after moving it into an engine and reads it after the engine
// is gone.

#include <kvortex/kvortex.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace kvt::faults {

// Which calls of a policy fail: every Nth call counted from when it was set, and chosen calls
// counted from now. Thread-safe.
class fault_plan {
 public:
  // Every `n`th call from now on fails (0: none).
  void fail_every(std::uint64_t n) {
    std::lock_guard lk(m_);
    every_ = n;
    every_base_ = calls_;
  }
  // The call `ahead` calls from now fails (0: the next one).
  void fail_call(std::uint64_t ahead = 0) {
    std::lock_guard lk(m_);
    chosen_.insert(calls_ + ahead);
  }
  void clear() {
    std::lock_guard lk(m_);
    every_ = 0;
    chosen_.clear();
  }
  // Counts a call; true when it must fail. `call` receives its number (0-based).
  [[nodiscard]] bool next(std::uint64_t* call = nullptr) {
    std::lock_guard lk(m_);
    const std::uint64_t n = calls_++;
    if (call != nullptr) *call = n;
    bool f = chosen_.erase(n) != 0;
    if (every_ != 0 && (n - every_base_ + 1) % every_ == 0) f = true;
    failures_ += f ? 1 : 0;
    return f;
  }
  [[nodiscard]] std::uint64_t calls() const {
    std::lock_guard lk(m_);
    return calls_;
  }
  [[nodiscard]] std::uint64_t failures() const {
    std::lock_guard lk(m_);
    return failures_;
  }

 private:
  mutable std::mutex m_;
  std::uint64_t calls_{0}, failures_{0}, every_{0}, every_base_{0};
  std::set<std::uint64_t> chosen_;
};

// How many instances own a control block, and what the last one saw when it went.
struct lifetime_record {
  std::atomic<int> alive{0};
  std::atomic<int> destroyed{0};
};

// ---------------------------------------------------------------------------------------------
// Allocator
// ---------------------------------------------------------------------------------------------

// host_allocator whose allocate fails as its plan says, with `code` (out_of_memory: the engine
// evicts and retries; anything else: the engine gives up the call).
class flaky_allocator {
 public:
  struct control {
    fault_plan plan;
    std::atomic<kvortex::errc> code{kvortex::errc::out_of_memory};
    lifetime_record life;
    std::atomic<std::size_t> reserved_at_destruction{0};
  };

  explicit flaky_allocator(std::shared_ptr<control> c = std::make_shared<control>()) : c_(std::move(c)) {
    ++c_->life.alive;
  }
  flaky_allocator(flaky_allocator&&) noexcept = default;
  flaky_allocator& operator=(flaky_allocator&&) = delete;
  ~flaky_allocator() {
    if (!c_) return;
    c_->reserved_at_destruction = inner_.bytes_reserved();
    --c_->life.alive;
    ++c_->life.destroyed;
  }

  [[nodiscard]] kvortex::result<void*> allocate(std::size_t n) {
    if (c_->plan.next())
      return kvortex::fail(c_->code.load(), "flaky_allocator: injected failure of a " + std::to_string(n) + "-byte allocation");
    return inner_.allocate(n);
  }
  void deallocate(void* p, std::size_t n) noexcept { inner_.deallocate(p, n); }
  [[nodiscard]] std::size_t bytes_reserved() const noexcept { return inner_.bytes_reserved(); }

 private:
  std::shared_ptr<control> c_;
  kvortex::host_allocator inner_;
};
static_assert(kvortex::allocator<flaky_allocator>, "flaky_allocator does not satisfy kvortex::allocator");

// ---------------------------------------------------------------------------------------------
// Transfer schedulers
// ---------------------------------------------------------------------------------------------

// What a failing batch leaves behind: with `partial_write`, the first half of its bytes are
// copied before it reports the failure, as a copy cut off midway would.
inline void perform(std::span<const kvortex::copy_op> ops, bool fails, bool partial_write) {
  if (!fails) {
    for (const auto& op : ops) kvortex::copy_host(op);
    return;
  }
  if (!partial_write) return;
  std::size_t total = 0;
  for (const auto& op : ops) total += kvortex::total_bytes(op);
  std::size_t left = total / 2;
  for (const auto& op : ops) {
    const std::size_t n = std::min(left, kvortex::total_bytes(op));
    kvortex::copy_host(op, 0, n);
    left -= n;
    if (left == 0) break;
  }
}

inline kvortex::result<void> injected_transfer_failure(std::uint64_t batch) {
  return kvortex::fail(kvortex::errc::transfer_failure,
                       "injected failure of batch " + std::to_string(batch) + " (test scheduler)");
}

// Copies on the caller's thread; the batches its plan picks fail with transfer_failure.
class faulty_scheduler {
 public:
  struct control {
    fault_plan plan;
    std::atomic<bool> partial_write{true};
    lifetime_record life;
  };

  explicit faulty_scheduler(std::shared_ptr<control> c = std::make_shared<control>()) : c_(std::move(c)) {
    ++c_->life.alive;
  }
  faulty_scheduler(faulty_scheduler&&) noexcept = default;
  faulty_scheduler& operator=(faulty_scheduler&&) = delete;
  ~faulty_scheduler() {
    if (!c_) return;
    --c_->life.alive;
    ++c_->life.destroyed;
  }

  void submit(std::span<const kvortex::copy_op> ops, kvortex::transfer_callback done) {
    std::uint64_t id = 0;
    const bool fails = c_->plan.next(&id);
    perform(ops, fails, c_->partial_write.load());
    done(fails ? injected_transfer_failure(id) : kvortex::result<void>{});
  }
  void drain() noexcept {}

 private:
  std::shared_ptr<control> c_;
};
static_assert(kvortex::transfer_scheduler<faulty_scheduler>,
              "faulty_scheduler does not satisfy kvortex::transfer_scheduler");

// When async_scheduler completes its batches (outside the class: a default argument needs it
// complete).
struct async_options {
  std::chrono::microseconds delay{0};
  std::size_t group{1};
  bool newest_first{false};
};

// Completes every batch on its own thread, `delay` after it was submitted; with group > 1 it takes
// batches `group` at a time, as soon as that many wait (or all that wait once the oldest is due).
// With `newest_first` the batches taken together complete in reverse order of submission. Its plan picks batches that fail. `drain` waits for every callback to
// return; destruction completes what is still queued, then joins the thread.
class async_scheduler {
 public:
  using options = async_options;
  struct control {
    fault_plan plan;
    std::atomic<bool> partial_write{true};
    lifetime_record life;
    std::mutex m;
    std::vector<std::uint64_t> completion_order;  // batch numbers, as their callbacks ran
    [[nodiscard]] std::vector<std::uint64_t> completed() {
      std::lock_guard lk(m);
      return completion_order;
    }
    // Adjacent pairs that completed newer-first.
    [[nodiscard]] std::size_t inversions() {
      const auto v = completed();
      std::size_t n = 0;
      for (std::size_t i = 1; i < v.size(); ++i) n += v[i] < v[i - 1] ? 1 : 0;
      return n;
    }
  };

  explicit async_scheduler(options o = {}, std::shared_ptr<control> c = std::make_shared<control>())
      : w_(std::make_unique<worker>(o, std::move(c))) {}

  void submit(std::span<const kvortex::copy_op> ops, kvortex::transfer_callback done) {
    w_->push(ops, std::move(done));
  }
  void drain() { w_->drain(); }

 private:
  struct item {
    std::span<const kvortex::copy_op> ops;
    kvortex::transfer_callback done;
    std::uint64_t id;
    bool fails;
    std::chrono::steady_clock::time_point due;
  };

  struct worker {
    worker(options o, std::shared_ptr<control> c) : opt(o), ctl(std::move(c)) {
      ++ctl->life.alive;
      thread = std::thread([this] { loop(); });
    }
    ~worker() {
      {
        std::lock_guard lk(m);
        stop = true;
      }
      wake.notify_all();
      thread.join();
      --ctl->life.alive;
      ++ctl->life.destroyed;
    }
    void push(std::span<const kvortex::copy_op> ops, kvortex::transfer_callback done) {
      {
        std::lock_guard lk(m);
        std::uint64_t id = 0;
        const bool fails = ctl->plan.next(&id);
        queue.push_back({ops, std::move(done), id, fails, std::chrono::steady_clock::now() + opt.delay});
      }
      wake.notify_all();
    }
    void drain() {
      std::unique_lock lk(m);
      idle.wait(lk, [&] { return queue.empty() && busy == 0; });
    }
    void loop() {
      std::unique_lock lk(m);
      for (;;) {
        wake.wait(lk, [&] { return stop || !queue.empty(); });
        if (queue.empty()) return;
        const auto due = queue.front().due;
        wake.wait_until(lk, due, [&] { return stop || (opt.group > 1 && queue.size() >= opt.group); });
        // A full group, or everything once the oldest is due (or on stop).
        const bool full = opt.group > 1 && queue.size() >= opt.group;
        const std::size_t take = full ? opt.group : (opt.group > 1 || stop ? queue.size() : 1);
        std::vector<item> now;
        for (std::size_t i = 0; i < take; ++i) {
          now.push_back(std::move(queue.front()));
          queue.pop_front();
        }
        busy = now.size();
        lk.unlock();
        if (opt.newest_first) std::reverse(now.begin(), now.end());
        for (auto& b : now) {
          perform(b.ops, b.fails, ctl->partial_write.load());
          {
            std::lock_guard ck(ctl->m);
            ctl->completion_order.push_back(b.id);
          }
          b.done(b.fails ? injected_transfer_failure(b.id) : kvortex::result<void>{});
          b.done = nullptr;  // what it captured is released before drain() can return
        }
        lk.lock();
        busy = 0;
        if (queue.empty()) idle.notify_all();
      }
    }

    options opt;
    std::shared_ptr<control> ctl;
    std::mutex m;
    std::condition_variable wake, idle;
    std::deque<item> queue;
    std::size_t busy{0};
    bool stop{false};
    std::thread thread;  // last: started once the members above exist
  };

  std::unique_ptr<worker> w_;
};
static_assert(kvortex::transfer_scheduler<async_scheduler>, "async_scheduler does not satisfy kvortex::transfer_scheduler");

// ---------------------------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------------------------

// cpu_backend whose commit fails with backend_failure as its plan says.
class commit_failing_backend {
 public:
  using handle = kvortex::cpu_backend::handle;
  struct control {
    fault_plan plan;
    lifetime_record life;
  };

  explicit commit_failing_backend(std::shared_ptr<control> c = std::make_shared<control>()) : c_(std::move(c)) {
    ++c_->life.alive;
  }
  commit_failing_backend(commit_failing_backend&&) noexcept = default;
  commit_failing_backend& operator=(commit_failing_backend&&) = delete;
  ~commit_failing_backend() {
    if (!c_) return;
    --c_->life.alive;
    ++c_->life.destroyed;
  }

  template <class A>
  [[nodiscard]] kvortex::result<handle> reserve(A& a, const kvortex::chunk_key& k, std::size_t n) {
    return inner_.reserve(a, k, n);
  }
  [[nodiscard]] std::span<std::byte> data(handle h) const noexcept { return inner_.data(h); }
  [[nodiscard]] kvortex::result<void> commit(const kvortex::chunk_key& k, handle h) {
    if (c_->plan.next()) return kvortex::fail(kvortex::errc::backend_failure, "commit_failing_backend: injected commit failure");
    return inner_.commit(k, h);
  }
  template <class A>
  void release(A& a, const kvortex::chunk_key& k, handle h) noexcept {
    inner_.release(a, k, h);
  }

 private:
  std::shared_ptr<control> c_;
  kvortex::cpu_backend inner_;
};
static_assert(kvortex::backend<commit_failing_backend, flaky_allocator>,
              "commit_failing_backend does not satisfy kvortex::backend");

// ---------------------------------------------------------------------------------------------
// Eviction
// ---------------------------------------------------------------------------------------------

// LRU that, once broken, names victims the engine did not ask for.
class broken_eviction {
 public:
  enum class fault {
    none,               // plain LRU
    foreign_keys,       // a key that was never stored
    ignores_predicate,  // the oldest stored key, pinned or in flight or not (accesses ignored)
    forgets_erase,      // ignores on_erase, and the predicate: names evicted keys again
  };
  struct control {
    std::atomic<fault> mode{fault::none};
    std::atomic<std::uint64_t> bad_victims{0};  // victims the predicate rejects
    lifetime_record life;
  };

  explicit broken_eviction(std::shared_ptr<control> c = std::make_shared<control>()) : c_(std::move(c)) {
    ++c_->life.alive;
  }
  broken_eviction(broken_eviction&&) noexcept = default;
  broken_eviction& operator=(broken_eviction&&) = delete;
  ~broken_eviction() {
    if (!c_) return;
    --c_->life.alive;
    ++c_->life.destroyed;
  }

  void on_insert(const kvortex::chunk_key& k) { inner_.on_insert(k); }
  void on_access(const kvortex::chunk_key& k) {
    if (c_->mode.load() != fault::ignores_predicate) inner_.on_access(k);
  }
  void on_erase(const kvortex::chunk_key& k) {
    if (c_->mode.load() != fault::forgets_erase) inner_.on_erase(k);
  }
  template <class Pred>
  [[nodiscard]] std::optional<kvortex::chunk_key> select_victim(Pred&& pred) {
    const fault f = c_->mode.load();
    if (f == fault::none) return inner_.select_victim(pred);
    std::optional<kvortex::chunk_key> v;
    if (f == fault::foreign_keys) {
      v.emplace();
      v->bytes.fill(std::byte{0xEE});
    } else {
      v = inner_.select_victim([](const kvortex::chunk_key&) { return true; });
    }
    if (v && !pred(*v)) ++c_->bad_victims;
    return v;
  }
  [[nodiscard]] std::size_t size() const noexcept { return inner_.size(); }

 private:
  std::shared_ptr<control> c_;
  kvortex::lru_eviction inner_;
};
static_assert(kvortex::eviction_policy<broken_eviction>, "broken_eviction does not satisfy kvortex::eviction_policy");

// ---------------------------------------------------------------------------------------------
// Engines made of them
// ---------------------------------------------------------------------------------------------

// The controls of one engine's fault policies.
struct fault_controls {
  std::shared_ptr<flaky_allocator::control> alloc = std::make_shared<flaky_allocator::control>();
  std::shared_ptr<broken_eviction::control> eviction = std::make_shared<broken_eviction::control>();
  std::shared_ptr<commit_failing_backend::control> backend = std::make_shared<commit_failing_backend::control>();
};

template <class Scheduler>
using fault_engine_with =
    kvortex::basic_engine<flaky_allocator, kvortex::sha256_hasher, broken_eviction, commit_failing_backend, Scheduler>;
using fault_engine = fault_engine_with<faulty_scheduler>;
using async_fault_engine = fault_engine_with<async_scheduler>;

// An engine of fault policies steered by `ctl`, with `s` as its scheduler.
template <class Scheduler>
kvortex::result<fault_engine_with<Scheduler>> make_fault_engine(const kvortex::engine_config& cfg,
                                                                const fault_controls& ctl, Scheduler s) {
  auto h = kvortex::sha256_hasher::create();
  if (!h) return std::unexpected(h.error());
  return fault_engine_with<Scheduler>::create(cfg, flaky_allocator(ctl.alloc), std::move(*h),
                                              broken_eviction(ctl.eviction), commit_failing_backend(ctl.backend),
                                              std::move(s));
}

// ---------------------------------------------------------------------------------------------
// Hang guards
// ---------------------------------------------------------------------------------------------

// Aborts the process with `what` when `beat()` was not called for `limit`: a hang ends the test
// loudly instead of stalling CI.
class watchdog {
 public:
  watchdog(std::string what, std::chrono::milliseconds limit) : what_(std::move(what)), limit_(limit) {
    thread_ = std::thread([this] { watch(); });
  }
  watchdog(const watchdog&) = delete;
  watchdog& operator=(const watchdog&) = delete;
  ~watchdog() {
    {
      std::lock_guard lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void beat() noexcept { beats_.fetch_add(1, std::memory_order_relaxed); }

 private:
  void watch() {
    std::unique_lock lk(m_);
    std::uint64_t seen = beats_.load(std::memory_order_relaxed);
    auto last = std::chrono::steady_clock::now();
    while (!cv_.wait_for(lk, std::chrono::milliseconds(50), [&] { return stop_; })) {
      const std::uint64_t now_beats = beats_.load(std::memory_order_relaxed);
      const auto now = std::chrono::steady_clock::now();
      if (now_beats != seen) {
        seen = now_beats;
        last = now;
      } else if (now - last > limit_) {
        std::fprintf(stderr, "watchdog: %s: no progress for %lld ms after %llu steps; aborting\n", what_.c_str(),
                     static_cast<long long>(limit_.count()), static_cast<unsigned long long>(seen));
        std::fflush(stderr);
        std::abort();
      }
    }
  }

  std::string what_;
  std::chrono::milliseconds limit_;
  std::atomic<std::uint64_t> beats_{0};
  std::mutex m_;
  std::condition_variable cv_;
  bool stop_{false};
  std::thread thread_;
};

// Runs `rescue` on its own thread if `disarm()` has not been called within `limit`, so a test can
// unblock a call that hangs (e.g. drop what it waits for) and fail instead of aborting.
class rescue_guard {
 public:
  rescue_guard(std::chrono::milliseconds limit, std::function<void()> rescue) : rescue_(std::move(rescue)) {
    thread_ = std::thread([this, limit] {
      std::unique_lock lk(m_);
      if (cv_.wait_for(lk, limit, [&] { return disarmed_; })) return;
      lk.unlock();
      fired_ = true;
      rescue_();
    });
  }
  rescue_guard(const rescue_guard&) = delete;
  rescue_guard& operator=(const rescue_guard&) = delete;
  ~rescue_guard() { disarm(); }
  // Stops the clock; true when the rescue had to run.
  bool disarm() {
    {
      std::lock_guard lk(m_);
      disarmed_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    return fired_;
  }

 private:
  std::function<void()> rescue_;
  std::mutex m_;
  std::condition_variable cv_;
  bool disarmed_{false};
  std::atomic<bool> fired_{false};
  std::thread thread_;
};

}  // namespace kvt::faults
