// Fault injection: allocators, schedulers, backends and eviction policies that fail on purpose,
// copy threads that cannot start, and pools created and destroyed in a loop. For every fault the
// failing call returns an error or a clean miss, nothing half-written becomes readable, the
// accounting returns to where it was, and the engine keeps serving correct bytes.

#include <doctest/doctest.h>

#include "fault_policies.hpp"
#include "test_support.hpp"

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <concepts>
#include <cstdio>
#include <exception>
#include <fstream>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

using namespace kvortex;
using namespace kvt::faults;
using kvt::make_tokens;
using kvt::small_config;

namespace {

constexpr std::chrono::seconds hang_limit{10};

// Stores `tokens` from a paged cache at a random block table and waits for the ticket.
template <class Engine>
result<std::size_t> store_wait(Engine& e, std::span<const token_id> tokens, std::uint32_t seed) {
  const auto& c = e.config();
  const std::size_t blocks = (tokens.size() + c.block_tokens - 1) / c.block_tokens;
  kvt::paged_cache cache(c.geometry, blocks + 4, c.block_tokens);
  const auto table = kvt::random_table(blocks, blocks + 4, seed);
  cache.fill(tokens, table);
  auto t = e.store(tokens, cache.layout(), table);
  if (!t) return std::unexpected(t.error());
  return t->wait();
}

struct retrieved {
  result<std::size_t> tokens;
  std::size_t bad_bytes;  // among the tokens retrieved
};

// Retrieves into a fresh paged cache and checks every byte of the tokens it reports.
template <class Engine>
retrieved retrieve_check(Engine& e, std::span<const token_id> tokens, std::uint32_t seed) {
  const auto& c = e.config();
  const std::size_t blocks = (tokens.size() + c.block_tokens - 1) / c.block_tokens;
  kvt::paged_cache cache(c.geometry, blocks + 8, c.block_tokens);
  const auto table = kvt::random_table(blocks, blocks + 8, seed);
  auto t = e.retrieve(tokens, cache.layout(), table);
  if (!t) return {std::unexpected(t.error()), 0};
  auto n = t->wait();
  return {n, n ? cache.mismatches(tokens, *n, table) : 0};
}

// What a failed call must carry: a code and a message that says something.
void check_error(const error& err, errc expected) {
  CHECK(err.code == expected);
  CHECK_FALSE(err.message.empty());
}

// Bytes held agree everywhere: the allocator, the stats, the capacity.
template <class Engine>
void check_accounting(const Engine& e) {
  const auto s = e.stats();
  CHECK(e.get_allocator().bytes_reserved() == s.current_bytes);
  CHECK(s.current_bytes <= s.capacity_bytes);
}

// A fresh prompt goes in and comes back byte for byte.
template <class Engine>
void check_serves(Engine& e, std::uint32_t seed) {
  const auto p = make_tokens(64, seed);
  const auto n = store_wait(e, p, seed);
  REQUIRE_MESSAGE(n.has_value(), (n ? "" : n.error().what()));
  CHECK(*n == 64);
  CHECK(e.lookup(p).value() == 64);
  const auto r = retrieve_check(e, p, seed + 1);
  REQUIRE(r.tokens.has_value());
  CHECK(*r.tokens == 64);
  CHECK(r.bad_bytes == 0);
}

// Key-API blocks of distinct sizes with distinct contents.
struct key_blocks {
  std::vector<chunk_key> keys;
  std::vector<std::vector<std::byte>> data;
  std::vector<const std::byte*> src;
  std::vector<std::size_t> sizes;
  key_blocks(std::size_t n, std::uint32_t seed) {
    std::mt19937 rng(seed);
    for (std::size_t i = 0; i < n; ++i) {
      chunk_key k;
      for (auto& b : k.bytes) b = static_cast<std::byte>(rng());
      keys.push_back(k);
      data.emplace_back(500 + 100 * i);
      for (auto& b : data.back()) b = static_cast<std::byte>(rng());
    }
    for (const auto& d : data) {
      src.push_back(d.data());
      sizes.push_back(d.size());
    }
  }
  // Loads `keys[i]` alone and compares it with what was saved.
  template <class Engine>
  bool loads_back(Engine& e, std::size_t i) const {
    std::vector<std::byte> out(sizes[i]);
    std::byte* dst = out.data();
    const auto r = e.load_blocks(std::span(&keys[i], 1), std::span(&dst, 1), std::span(&sizes[i], 1));
    return r.has_value() && out == data[i];
  }
};

template <class Engine>
Engine make(result<Engine> e) {
  REQUIRE_MESSAGE(e.has_value(), (e ? "" : e.error().what()));
  return std::move(*e);
}

// Makes threads started without attributes ask for a stack larger than the address space, so
// pthread_create fails with EAGAIN, until restore().
class unstartable_threads {
 public:
  unstartable_threads() {
    if (pthread_getattr_default_np(&old_) != 0) return;
    have_old_ = true;
    pthread_attr_t a;
    if (pthread_getattr_default_np(&a) != 0) return;
    if (pthread_attr_setstacksize(&a, std::size_t{1} << 56) == 0) active_ = pthread_setattr_default_np(&a) == 0;
    pthread_attr_destroy(&a);
  }
  unstartable_threads(const unstartable_threads&) = delete;
  unstartable_threads& operator=(const unstartable_threads&) = delete;
  ~unstartable_threads() {
    restore();
    if (have_old_) pthread_attr_destroy(&old_);
  }
  [[nodiscard]] bool active() const noexcept { return active_; }
  void restore() noexcept {
    if (active_) (void)pthread_setattr_default_np(&old_);
    active_ = false;
  }

 private:
  pthread_attr_t old_{};
  bool have_old_{false}, active_{false};
};

bool a_thread_starts() {
  try {
    std::thread t([] {});
    t.join();
    return true;
  } catch (const std::system_error&) {
    return false;
  }
}

// "started", or the error create() returned. Schedulers without a create() are constructed.
template <class Scheduler>
std::string create_scheduler(const engine_config& cfg) {
  if constexpr (requires { { Scheduler::create(cfg) } -> std::same_as<result<Scheduler>>; }) {
    const auto s = Scheduler::create(cfg);
    return s ? std::string("started") : s.error().what();
  } else {
    Scheduler s(cfg);
    return "started";
  }
}

// What a forked child reported: the text its body returned, unless it hung or died first.
struct child_outcome {
  bool hung{false};
  bool completed{false};  // the body returned and its text came back whole
  std::string text;
};

constexpr std::string_view child_end_marker = "\n[child done]";

// Runs `body` in a forked child (for process-wide limits the parent must not feel) and kills it
// if it has not finished within `limit`.
child_outcome run_in_child(const std::function<std::string()>& body, std::chrono::milliseconds limit) {
  child_outcome out;
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  std::fflush(nullptr);  // or the child's exit could write the parent's buffered output again
  std::cout.flush();
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    std::string s;
    try {
      s = body();
    } catch (const std::exception& x) {
      s = std::string("threw: ") + x.what();
    } catch (...) {
      s = "threw";
    }
    s += child_end_marker;
    for (std::size_t at = 0; at < s.size();) {
      const auto n = ::write(fds[1], s.data() + at, s.size() - at);
      if (n <= 0) break;
      at += static_cast<std::size_t>(n);
    }
    ::_exit(0);  // no atexit handlers: the copied heap is the parent's business
  }
  ::close(fds[1]);
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      out.hung = true;
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    char buf[512];
    const auto n = ::read(fds[0], buf, sizeof buf);
    if (n <= 0) break;  // EOF: the child is done
    out.text.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  if (out.hung) ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  // The exit status is not used: valgrind, for one, makes a forked child exit 1 over its copied heap.
  out.completed = !out.hung && out.text.ends_with(child_end_marker);
  if (out.completed) out.text.resize(out.text.size() - child_end_marker.size());
  return out;
}

// Busy-waits up to `ns`: destroying a pool at varied moments of its workers' start-up is what
// exposes a stop notification that can be missed.
void jitter(std::mt19937& rng, unsigned ns) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(rng() % ns);
  while (std::chrono::steady_clock::now() < until) {
  }
}

}  // namespace

TEST_CASE("faults: allocations failing with out_of_memory evict and retry or drop the store cleanly") {
  fault_controls ctl;
  auto e = make(make_fault_engine(small_config(6), ctl, faulty_scheduler{}));
  const std::size_t cb = e.config().chunk_bytes();

  // Nothing to evict yet: the first allocation failing drops the whole prompt, and says so.
  const auto first = make_tokens(96, 1);
  ctl.alloc->plan.fail_call(0);
  const auto n0 = store_wait(e, first, 1);
  REQUIRE(n0.has_value());
  CHECK(*n0 == 0);
  CHECK(e.lookup(first).value() == 0);
  CHECK(e.stats().rejected_chunks == 3);
  CHECK(e.stats().current_bytes == 0);
  check_accounting(e);
  CHECK(store_wait(e, first, 2).value() == 96);

  // Every third allocation fails from now on: each store evicts once more and still lands whole.
  ctl.alloc->plan.fail_every(3);
  std::vector<std::vector<token_id>> prompts;
  for (std::uint32_t i = 0; i < 12; ++i) {
    CAPTURE(i);
    prompts.push_back(make_tokens(96, 100 + i));
    const auto n = store_wait(e, prompts.back(), i);
    REQUIRE(n.has_value());
    CHECK(*n == 96);
    CHECK(e.lookup(prompts.back()).value() == 96);
    const auto r = retrieve_check(e, prompts.back(), 50 + i);
    CHECK(r.tokens.value() == 96);
    CHECK(r.bad_bytes == 0);
    check_accounting(e);
  }
  CHECK(ctl.alloc->plan.failures() >= 12);
  CHECK(e.stats().evictions > 0);
  // Older prompts read back whatever prefix survived, byte for byte.
  for (std::uint32_t i = 0; i < prompts.size(); ++i) {
    CAPTURE(i);
    const std::size_t held = e.lookup(prompts[i]).value();
    const auto r = retrieve_check(e, prompts[i], 70 + i);
    CHECK(r.tokens.value() == held);
    CHECK(r.bad_bytes == 0);
  }
  CHECK(e.stats().current_bytes == e.stats().chunks * cb);
  ctl.alloc->plan.clear();
  check_serves(e, 200);
}

TEST_CASE("faults: the key API under out_of_memory saves a prefix of the keys and loads it back") {
  fault_controls ctl;
  auto e = make(make_fault_engine(small_config(8), ctl, faulty_scheduler{}));
  const key_blocks kb(3, 7);
  ctl.alloc->plan.fail_call(1);  // the second key's allocation; nothing is evictable yet
  const auto saved = e.save_blocks(kb.keys, kb.src, kb.sizes);
  REQUIRE(saved.has_value());
  CHECK(*saved == 1);
  const auto mask = e.check_blocks(kb.keys).value();
  CHECK(mask.test(0));
  CHECK_FALSE(mask.test(1));
  CHECK_FALSE(mask.test(2));
  CHECK(kb.loads_back(e, 0));
  CHECK(e.stats().current_bytes == kb.sizes[0]);
  check_accounting(e);
  CHECK(e.save_blocks(kb.keys, kb.src, kb.sizes).value() == 2);
  for (std::size_t i = 0; i < 3; ++i) CHECK(kb.loads_back(e, i));
  check_accounting(e);
}

TEST_CASE("faults: allocations failing with another code fail the call and leave nothing behind") {
  fault_controls ctl;
  ctl.alloc->code = errc::backend_failure;
  auto e = make(make_fault_engine(small_config(16), ctl, faulty_scheduler{}));
  const auto p = make_tokens(128, 11);
  const auto head = std::span(p).first(64);
  REQUIRE(store_wait(e, head, 1).value() == 64);
  const auto before = e.stats();

  SUBCASE("store") {
    ctl.alloc->plan.fail_call(1);  // the second of the two new chunks
    const auto r = store_wait(e, p, 2);
    REQUIRE_FALSE(r.has_value());
    check_error(r.error(), errc::backend_failure);
  }
  SUBCASE("layered store") {
    kvt::paged_cache cache(e.config().geometry, 8, 16);
    ctl.alloc->plan.fail_call(1);
    const auto op = e.begin_store(p, cache.layout());
    REQUIRE_FALSE(op.has_value());
    check_error(op.error(), errc::backend_failure);
  }
  SUBCASE("save_blocks") {
    const key_blocks kb(3, 12);
    ctl.alloc->plan.fail_call(2);
    const auto r = e.save_blocks(kb.keys, kb.src, kb.sizes);
    REQUIRE_FALSE(r.has_value());
    check_error(r.error(), errc::backend_failure);
    CHECK(e.check_blocks(kb.keys).value().none());
  }
  const auto after = e.stats();
  CHECK(e.lookup(p).value() == 64);
  CHECK(after.current_bytes == before.current_bytes);
  CHECK(after.chunks == before.chunks);
  CHECK(after.stored_chunks == before.stored_chunks);
  check_accounting(e);
  CHECK(ctl.alloc->plan.failures() == 1);
  // The same call goes through once the allocator recovers.
  CHECK(store_wait(e, p, 3).value() == 64);
  const auto r = retrieve_check(e, p, 4);
  CHECK(r.tokens.value() == 128);
  CHECK(r.bad_bytes == 0);
}

TEST_CASE("faults: a failed batch rolls back the whole store or fails the retrieve and changes nothing else") {
  fault_controls ctl;
  auto sched = std::make_shared<faulty_scheduler::control>();
  auto cfg = small_config(16);
  cfg.transfer_batch_bytes = cfg.chunk_bytes();  // one batch per chunk
  auto e = make(make_fault_engine(cfg, ctl, faulty_scheduler(sched)));
  const auto p = make_tokens(160, 21);  // 5 chunks
  const auto head = std::span(p).first(64);
  REQUIRE(store_wait(e, head, 1).value() == 64);

  SUBCASE("store: the middle new chunk fails half-written") {
    const auto before = e.stats();
    sched->plan.fail_call(1);
    const auto r = store_wait(e, p, 2);
    REQUIRE_FALSE(r.has_value());
    check_error(r.error(), errc::transfer_failure);
    const auto s = e.stats();
    CHECK(e.lookup(p).value() == 64);  // neither the chunk before the failed one nor the one after
    CHECK(s.current_bytes == before.current_bytes);
    CHECK(s.chunks == before.chunks);
    CHECK(s.stored_chunks == before.stored_chunks);
    CHECK(s.transfer_failures == before.transfer_failures + 1);
    check_accounting(e);
    CHECK(store_wait(e, p, 3).value() == 96);
  }
  SUBCASE("layered store: layer 0 fails, layer 1 succeeds") {
    REQUIRE(store_wait(e, p, 2).value() == 96);
    const auto q = make_tokens(64, 22);
    kvt::paged_cache cache(e.config().geometry, 4, 16);
    cache.fill(q, {});
    const auto before = e.stats();
    auto op = e.begin_store(q, cache.layout()).value();
    sched->plan.fail_call(0);
    REQUIRE(op.submit_layer(0).has_value());  // queued; the failure arrives through the ticket
    REQUIRE(op.submit_layer(1).has_value());
    const auto r = op.finish().value().wait();
    REQUIRE_FALSE(r.has_value());
    check_error(r.error(), errc::transfer_failure);
    CHECK(e.lookup(q).value() == 0);
    CHECK(e.stats().current_bytes == before.current_bytes);
    CHECK(e.stats().transfer_failures == before.transfer_failures + 1);
    check_accounting(e);
  }
  SUBCASE("retrieve and layered retrieve fail, and release their pins") {
    REQUIRE(store_wait(e, p, 2).value() == 96);
    const auto before = e.stats();
    sched->plan.fail_call(2);
    const auto r = retrieve_check(e, p, 3);
    REQUIRE_FALSE(r.tokens.has_value());
    check_error(r.tokens.error(), errc::transfer_failure);

    kvt::paged_cache cache(e.config().geometry, 10, 16);
    auto op = e.begin_retrieve(p, cache.layout()).value();
    CHECK(op.tokens() == 160);
    REQUIRE(op.submit_layer(0).has_value());
    sched->plan.fail_call(0);
    REQUIRE(op.submit_layer(1).has_value());
    const auto lr = op.finish().value().wait();
    REQUIRE_FALSE(lr.has_value());
    check_error(lr.error(), errc::transfer_failure);

    const auto s = e.stats();
    CHECK(s.transfer_failures == before.transfer_failures + 2);
    CHECK(s.retrieved_chunks == before.retrieved_chunks);
    CHECK(s.bytes_loaded == before.bytes_loaded);
    CHECK(e.lookup(p).value() == 160);
    const auto ok = retrieve_check(e, p, 4);
    CHECK(ok.tokens.value() == 160);
    CHECK(ok.bad_bytes == 0);
    // A chunk left pinned could not be evicted: a prompt the size of the capacity needs them all.
    const auto big = make_tokens(16 * 32, 23);
    CHECK(store_wait(e, big, 5).value() == big.size());
    CHECK(e.lookup(p).value() == 0);
  }
  SUBCASE("save_blocks and load_blocks") {
    const key_blocks kb(3, 24);
    const auto before = e.stats();
    sched->plan.fail_call(0);
    const auto saved = e.save_blocks(kb.keys, kb.src, kb.sizes);
    REQUIRE_FALSE(saved.has_value());
    check_error(saved.error(), errc::transfer_failure);
    CHECK(e.check_blocks(kb.keys).value().none());
    CHECK(e.stats().current_bytes == before.current_bytes);

    REQUIRE(e.save_blocks(kb.keys, kb.src, kb.sizes).value() == 3);
    std::vector<std::vector<std::byte>> out{std::vector<std::byte>(kb.sizes[0]), std::vector<std::byte>(kb.sizes[1]),
                                            std::vector<std::byte>(kb.sizes[2])};
    std::vector<std::byte*> dst{out[0].data(), out[1].data(), out[2].data()};
    sched->plan.fail_call(0);
    const auto loaded = e.load_blocks(kb.keys, dst, kb.sizes);
    REQUIRE_FALSE(loaded.has_value());
    check_error(loaded.error(), errc::transfer_failure);
    CHECK(e.stats().transfer_failures == before.transfer_failures + 2);
    REQUIRE(e.load_blocks(kb.keys, dst, kb.sizes).has_value());
    CHECK(out == kb.data);
  }
  check_accounting(e);
  sched->plan.clear();
  check_serves(e, 300);
}

TEST_CASE("faults: every 4th batch failing through a mixed workload with every byte checked") {
  fault_controls ctl;
  auto sched = std::make_shared<faulty_scheduler::control>();
  auto cfg = small_config(12);
  cfg.transfer_batch_bytes = cfg.chunk_bytes();
  auto e = make(make_fault_engine(cfg, ctl, faulty_scheduler(sched)));
  // Prompts of at most 4 chunks: at most 4 batches each, so each call meets at most one failure.
  std::vector<std::vector<token_id>> families;
  for (std::uint32_t f = 0; f < 6; ++f) families.push_back(make_tokens(128, 400 + f));
  sched->plan.fail_every(4);
  std::mt19937 rng(31);
  std::uint64_t failed = 0, stores_ok = 0, retrieves_ok = 0;
  for (std::uint32_t i = 0; i < 300; ++i) {
    CAPTURE(i);
    const auto& fam = families[rng() % families.size()];
    const auto p = std::span(fam).first(32 * (1 + rng() % 4));
    const std::size_t held = e.lookup(p).value();
    switch (rng() % 3) {
      case 0: {
        const auto r = store_wait(e, p, i);
        if (r) {
          ++stores_ok;
          CHECK(*r <= p.size() - held);
          CHECK(e.lookup(p).value() == p.size());
        } else {
          ++failed;
          check_error(r.error(), errc::transfer_failure);
          CHECK(e.lookup(p).value() == held);
        }
        break;
      }
      case 1: {
        const auto r = retrieve_check(e, p, i);
        if (r.tokens) {
          ++retrieves_ok;
          CHECK(*r.tokens == held);
          CHECK(r.bad_bytes == 0);
        } else {
          ++failed;
          check_error(r.tokens.error(), errc::transfer_failure);
        }
        break;
      }
      default: {
        kvt::paged_cache cache(cfg.geometry, 8, 16);
        cache.fill(p, {});
        auto op = e.begin_store(p, cache.layout());
        REQUIRE(op.has_value());
        const std::size_t fresh = op->tokens();
        REQUIRE(op->submit_layer(1).has_value());
        REQUIRE(op->submit_layer(0).has_value());
        const auto r = op->finish().value().wait();
        if (r) {
          CHECK(*r == fresh);
          CHECK(e.lookup(p).value() == p.size());
        } else {
          ++failed;
          check_error(r.error(), errc::transfer_failure);
          CHECK(e.lookup(p).value() == held);
        }
      }
    }
    check_accounting(e);
  }
  CHECK(stores_ok > 0);
  CHECK(retrieves_ok > 0);
  CHECK(failed > 20);
  CHECK(e.stats().transfer_failures == failed);
  CHECK(sched->plan.failures() == failed);
  sched->plan.clear();
  for (std::size_t f = 0; f < families.size(); ++f) {
    const std::size_t held = e.lookup(families[f]).value();
    const auto r = retrieve_check(e, families[f], 900);
    CHECK(r.tokens.value() == held);
    CHECK(r.bad_bytes == 0);
  }
  check_serves(e, 500);
}

TEST_CASE("faults: batches completed late on another thread and some failing with two threads calling") {
  fault_controls ctl;
  auto sched = std::make_shared<async_scheduler::control>();
  auto cfg = small_config(24);
  cfg.transfer_batch_bytes = 0;  // one batch per call: each failure belongs to exactly one call
  auto e = make(make_fault_engine(cfg, ctl, async_scheduler({.delay = std::chrono::microseconds(300)}, sched)));
  sched->plan.fail_every(5);
  std::atomic<std::uint64_t> failed{0}, ok{0}, bad_bytes{0}, wrong{0};
  const auto work = [&](std::uint32_t who) {
    std::mt19937 rng(who);
    std::vector<std::vector<token_id>> mine;
    for (std::uint32_t f = 0; f < 4; ++f) mine.push_back(make_tokens(128, 1000 * (who + 1) + f));
    for (std::uint32_t i = 0; i < 60; ++i) {
      const auto& fam = mine[rng() % mine.size()];
      const auto p = std::span(fam).first(32 * (1 + rng() % 4));
      if (rng() % 2 == 0) {
        const auto r = store_wait(e, p, i);
        if (!r) {
          failed += 1;
          wrong += r.error().code != errc::transfer_failure || r.error().message.empty();
        } else {
          ok += 1;
        }
      } else {
        const auto r = retrieve_check(e, p, i);
        if (!r.tokens) {
          failed += 1;
          wrong += r.tokens.error().code != errc::transfer_failure || r.tokens.error().message.empty();
        } else {
          ok += 1;
          bad_bytes += r.bad_bytes;
        }
      }
    }
  };
  std::thread a(work, 1), b(work, 2);
  a.join();
  b.join();
  CHECK(ok > 0);
  CHECK(failed > 0);
  CHECK(wrong == 0);
  CHECK(bad_bytes == 0);
  CHECK(e.stats().transfer_failures == failed);
  CHECK(sched->plan.failures() == failed);
  check_accounting(e);
  sched->plan.clear();
  check_serves(e, 600);

}

TEST_CASE("faults: a ticket is not ready before its late batch and shutdown waits for it") {
  auto sched = std::make_shared<async_scheduler::control>();
  const auto cfg = small_config();
  auto e = make(make_fault_engine(cfg, fault_controls{}, async_scheduler({.delay = std::chrono::milliseconds(200)}, sched)));
  const auto p = make_tokens(64, 601);
  kvt::paged_cache cache(cfg.geometry, 4, 16);
  cache.fill(p, {});
  auto t = e.store(p, cache.layout()).value();
  CHECK_FALSE(t.ready());
  e.shutdown();
  CHECK(t.ready());
  CHECK(t.wait().value() == 64);
  CHECK(sched->completed().size() == 1);
  CHECK(e.get_allocator().bytes_reserved() == 0);
}

TEST_CASE("faults: batches completing out of order with the newest failing first") {
  fault_controls ctl;
  auto sched = std::make_shared<async_scheduler::control>();
  auto cfg = small_config(16);
  cfg.transfer_batch_bytes = cfg.chunk_bytes();
  // Four batches are taken together and completed newest first; a lone batch waits at most 2 s.
  auto e = make(make_fault_engine(
      cfg, ctl, async_scheduler({.delay = std::chrono::seconds(2), .group = 4, .newest_first = true}, sched)));
  const auto p = make_tokens(128, 41);  // 4 chunks: 4 batches
  REQUIRE(store_wait(e, p, 1).value() == 128);
  CHECK(sched->inversions() == 3);
  CHECK(e.lookup(p).value() == 128);
  const auto r = retrieve_check(e, p, 2);
  CHECK(r.tokens.value() == 128);
  CHECK(r.bad_bytes == 0);
  CHECK(sched->inversions() == 6);

  // The newest batch fails and completes first: the store must wait for the other three, then roll
  // back all four.
  const auto q = make_tokens(128, 42);
  const auto before = e.stats();
  sched->plan.fail_call(3);
  const auto failed = store_wait(e, q, 3);
  REQUIRE_FALSE(failed.has_value());
  check_error(failed.error(), errc::transfer_failure);
  CHECK(e.lookup(q).value() == 0);
  CHECK(e.stats().current_bytes == before.current_bytes);
  CHECK(e.stats().transfer_failures == before.transfer_failures + 1);
  check_accounting(e);

  // Layered, 8 chunks: each layer is 4 batches of two half-chunks, completed in reverse.
  const auto big = make_tokens(256, 43);
  kvt::paged_cache cache(cfg.geometry, 16, 16);
  cache.fill(big, {});
  auto op = e.begin_store(big, cache.layout()).value();
  REQUIRE(op.submit_layer(1).has_value());
  REQUIRE(op.submit_layer(0).has_value());
  CHECK(op.finish().value().wait().value() == 256);
  const auto rb = retrieve_check(e, big, 4);
  CHECK(rb.tokens.value() == 256);
  CHECK(rb.bad_bytes == 0);
  check_accounting(e);
}

TEST_CASE("faults: a backend whose commit fails publishes no chunk from the failed one on") {
  fault_controls ctl;
  auto e = make(make_fault_engine(small_config(16), ctl, faulty_scheduler{}));
  const std::size_t cb = e.config().chunk_bytes();
  const auto p = make_tokens(160, 51);  // 5 chunks, 2 stored first
  REQUIRE(store_wait(e, std::span(p).first(64), 1).value() == 64);

  SUBCASE("the first new chunk's commit fails: the store leaves the earlier prefix") {
    const auto before = e.stats();
    ctl.backend->plan.fail_call(0);
    const auto r = store_wait(e, p, 2);
    REQUIRE_FALSE(r.has_value());
    check_error(r.error(), errc::backend_failure);
    CHECK(e.lookup(p).value() == 64);
    CHECK(e.stats().current_bytes == before.current_bytes);
    CHECK(e.stats().chunks == before.chunks);
  }
  SUBCASE("a later chunk's commit fails: what is readable is a correct prefix before it") {
    ctl.backend->plan.fail_call(1);  // the fourth chunk of the prompt
    const auto r = store_wait(e, p, 2);
    REQUIRE_FALSE(r.has_value());
    check_error(r.error(), errc::backend_failure);
    const std::size_t held = e.lookup(p).value();
    CHECK(held >= 64);
    CHECK(held <= 96);
    const auto got = retrieve_check(e, p, 3);
    CHECK(got.tokens.value() == held);
    CHECK(got.bad_bytes == 0);
    CHECK(e.stats().current_bytes == e.stats().chunks * cb);  // nothing left reserved
  }
  SUBCASE("save_blocks: the failed key is not stored") {
    const key_blocks kb(3, 52);
    ctl.backend->plan.fail_call(1);
    const auto r = e.save_blocks(kb.keys, kb.src, kb.sizes);
    REQUIRE_FALSE(r.has_value());
    check_error(r.error(), errc::backend_failure);
    const auto mask = e.check_blocks(kb.keys).value();
    CHECK_FALSE(mask.test(1));
    CHECK_FALSE(mask.test(2));
    if (mask.test(0)) CHECK(kb.loads_back(e, 0));
  }
  check_accounting(e);
  ctl.backend->plan.clear();
  CHECK(store_wait(e, p, 4).has_value());
  CHECK(e.lookup(p).value() == 160);
  const auto all = retrieve_check(e, p, 5);
  CHECK(all.tokens.value() == 160);
  CHECK(all.bad_bytes == 0);
  check_accounting(e);
}

TEST_CASE("faults: an eviction policy naming keys the engine did not ask for") {
  fault_controls ctl;
  auto e = make(make_fault_engine(small_config(4), ctl, faulty_scheduler{}));
  std::vector<std::vector<token_id>> old;
  for (std::uint32_t i = 0; i < 4; ++i) {
    old.push_back(make_tokens(32, 60 + i));
    REQUIRE(store_wait(e, old.back(), i).value() == 32);
  }
  const auto q = make_tokens(64, 70);
  std::size_t expect_lost = 0;  // old prompts the subcase evicts legitimately

  SUBCASE("keys never stored") {
    ctl.eviction->mode = broken_eviction::fault::foreign_keys;
    const auto n = store_wait(e, q, 1);
    REQUIRE(n.has_value());
    CHECK(*n == 0);
    CHECK(e.lookup(q).value() == 0);
    const key_blocks kb(1, 71);
    CHECK(e.save_blocks(kb.keys, kb.src, kb.sizes).value() == 0);
  }
  SUBCASE("keys pinned by open retrieves, or held by the store itself") {
    ctl.eviction->mode = broken_eviction::fault::ignores_predicate;  // names old[0], the oldest, first
    std::vector<kvt::paged_cache> dst;
    std::vector<fault_engine::layered_transfer> open;
    dst.reserve(old.size());
    for (const auto& o : old) {
      dst.emplace_back(e.config().geometry, 2, 16);
      auto op = e.begin_retrieve(o, dst.back().layout());
      REQUIRE(op.has_value());
      CHECK(op->tokens() == 32);
      open.push_back(std::move(*op));
    }
    const auto n = store_wait(e, q, 1);
    REQUIRE(n.has_value());
    CHECK(*n == 0);
    CHECK(ctl.eviction->bad_victims > 0);
    // The chunks named were not freed under the retrieves: they still copy the right bytes.
    for (std::size_t i = 0; i < open.size(); ++i) {
      REQUIRE(open[i].submit_all().has_value());
      CHECK(open[i].finish().value().wait().value() == 32);
      CHECK(dst[i].mismatches(old[i], 32, {}) == 0);
    }
    // old[0] is still named first, and is the head of this store: held, so not evictable.
    std::vector<token_id> ext(old[0]);
    const auto tail = make_tokens(32, 72);
    ext.insert(ext.end(), tail.begin(), tail.end());
    const auto before = ctl.eviction->bad_victims.load();
    const auto m = store_wait(e, ext, 2);
    REQUIRE(m.has_value());
    CHECK(*m == 0);
    CHECK(ctl.eviction->bad_victims > before);
  }
  SUBCASE("keys it was told are gone") {
    ctl.eviction->mode = broken_eviction::fault::forgets_erase;
    const auto n = store_wait(e, q, 1);  // evicts old[0], then is offered old[0] again
    REQUIRE(n.has_value());
    CHECK(*n == 32);
    CHECK(e.lookup(q).value() == 32);
    CHECK(ctl.eviction->bad_victims > 0);
    expect_lost = 1;
  }
  // Nothing crashed, nothing wrong is readable, and the rest survived.
  std::size_t lost = 0;
  for (std::uint32_t i = 0; i < old.size(); ++i) {
    const std::size_t held = e.lookup(old[i]).value();
    lost += held == 0 ? 1 : 0;
    const auto r = retrieve_check(e, old[i], 80 + i);
    CHECK(r.tokens.value() == held);
    CHECK(r.bad_bytes == 0);
  }
  CHECK(lost == expect_lost);
  check_accounting(e);
  // A policy that behaves again: the engine evicts and serves.
  ctl.eviction->mode = broken_eviction::fault::none;
  check_serves(e, 700);
  check_accounting(e);
}

TEST_CASE("faults: copy threads that cannot start make create() fail without hanging or throwing") {
  auto cfg = small_config();
  cfg.transfer_threads = 257;
  const auto capped = host_engine::create(cfg);
  if (capped)
    FAIL_CHECK("transfer_threads = 257 was accepted");
  else
    check_error(capped.error(), errc::invalid_config);

  // Started first: with the default stack made enormous, no thread can start any more.
  watchdog dog("create() with copy threads that cannot start", hang_limit);
  cfg.transfer_threads = 64;
  unstartable_threads no_threads;
  if (!no_threads.active() || a_thread_starts()) {
    no_threads.restore();
    MESSAGE("threads still start with an enormous default stack size here; skipped");
    return;
  }
  std::optional<result<host_engine>> engine;
  std::string engine_threw, scheduler_threw, scheduler_outcome;
  try {
    engine.emplace(host_engine::create(cfg));
  } catch (const std::exception& x) {
    engine_threw = x.what();
  }
  try {
    scheduler_outcome = create_scheduler<host_transfer_scheduler>(cfg);
  } catch (const std::exception& x) {
    scheduler_threw = x.what();
  }
  no_threads.restore();

  CHECK_MESSAGE(engine_threw.empty(), "host_engine::create threw: " << engine_threw);
  REQUIRE(engine.has_value());
  REQUIRE_FALSE(engine->has_value());
  CHECK_FALSE(engine->error().message.empty());
  MESSAGE("host_engine::create: " << engine->error().what());
  CHECK_MESSAGE(scheduler_threw.empty(), "host_transfer_scheduler threw: " << scheduler_threw);
  CHECK(scheduler_outcome != "started");
  CHECK_FALSE(scheduler_outcome.empty());

  // Threads start again: so does the engine, and it serves.
  auto ok = make(host_engine::create(cfg));
  check_serves(ok, 800);
}

TEST_CASE("faults: a pool whose later copy threads cannot start joins the started ones") {
  // In a child: the address space is capped a few thread stacks above what it uses, so a pool of
  // 64 starts some threads, then fails. Unwinding must not wait on the started ones forever.
  const auto outcome = run_in_child(
      [] {
        auto cfg = small_config();
        cfg.transfer_threads = 4;
        if (!host_engine::create(cfg)) return std::string("warm-up failed");  // leaves stacks cached for reuse
        cfg.transfer_threads = 64;
        std::ifstream statm("/proc/self/statm");
        std::size_t pages = 0;
        statm >> pages;
        rlimit old{};
        if (!statm || ::getrlimit(RLIMIT_AS, &old) != 0) return std::string("no address-space limit");
        rlimit capped = old;
        capped.rlim_cur = pages * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)) + (std::size_t{22} << 20);
        if (::setrlimit(RLIMIT_AS, &capped) != 0) return std::string("no address-space limit");
        const auto e = host_engine::create(cfg);
        const auto s = create_scheduler<host_transfer_scheduler>(cfg);
        ::setrlimit(RLIMIT_AS, &old);
        return (e ? std::string("engine started") : "engine failed: " + e.error().what()) + "\n" +
               (s == "started" ? std::string("scheduler started") : "scheduler failed: " + s);
      },
      hang_limit);
  CHECK_FALSE_MESSAGE(outcome.hung, "create() hung once a copy thread could not start");
  CHECK_MESSAGE(outcome.completed, "the child died before reporting: " << outcome.text);
  MESSAGE(outcome.text);
  if (outcome.hung || outcome.text.find("no address-space limit") != std::string::npos) return;
  CHECK(outcome.text.find("threw") == std::string::npos);
  if (outcome.text.find("engine started") != std::string::npos) {
    MESSAGE("64 copy threads started under the address-space cap here; the partial start was not exercised");
    return;
  }
  CHECK(outcome.text.starts_with("engine failed: "));
  CHECK(outcome.text.find("\nscheduler failed: ") != std::string::npos);
}

TEST_CASE("faults: creating and destroying copy pools in a loop never hangs") {
  watchdog dog("create/destroy loop: an iteration hung (a missed stop notification in the copy pool)",
               hang_limit);
  std::mt19937 rng(5);
  constexpr std::size_t max_iterations = 100000;
  const auto run = [&](const char* what, std::chrono::milliseconds budget, auto&& once) {
    const auto end = std::chrono::steady_clock::now() + budget;
    std::size_t i = 0;
    for (; i < max_iterations && std::chrono::steady_clock::now() < end; ++i) {
      once();
      dog.beat();
    }
    MESSAGE(std::string(what) << ": " << i << " iterations");
    CHECK(i > 0);
  };
  using namespace std::chrono_literals;
  run("host_transfer_scheduler(2)", 4000ms, [&] {
    host_transfer_scheduler s(2);
    jitter(rng, 5000);
  });
  run("host_transfer_scheduler(4)", 3000ms, [&] {
    host_transfer_scheduler s(4);
    jitter(rng, 5000);
  });
  auto cfg = small_config();
  cfg.transfer_threads = 2;
  run("host_engine, 2 copy threads", 3000ms, [&] {
    auto e = host_engine::create(cfg);
    REQUIRE(e.has_value());
    jitter(rng, 5000);
  });
}
