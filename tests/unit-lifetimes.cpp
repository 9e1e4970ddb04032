// Lifetimes: every object that can outlive another. Tickets and layered transfers outliving,
// or crossing, the engine's destruction, move and shutdown; policies handed in by the caller;
// shutdown racing a thread that holds a transfer open or waits on a ticket. Run under ASan, a
// touch of freed engine state fails here; a hang fails through a guard.

#include <doctest/doctest.h>

#include "fault_policies.hpp"
#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

using namespace kvortex;
using namespace kvt::faults;
using kvt::make_tokens;
using kvt::paged_cache;
using kvt::small_config;
using namespace std::chrono_literals;

namespace {

constexpr std::chrono::seconds hang_limit{10};

template <class Engine>
Engine make(result<Engine> e) {
  REQUIRE_MESSAGE(e.has_value(), (e ? "" : e.error().what()));
  return std::move(*e);
}

// A prompt and its KV in a contiguous paged cache (identity block table).
struct prompt {
  std::vector<token_id> tokens;
  paged_cache cache;
  prompt(const engine_config& c, std::size_t n, std::uint32_t seed)
      : tokens(make_tokens(n, seed)), cache(c.geometry, (n + c.block_tokens - 1) / c.block_tokens + 1, c.block_tokens) {
    cache.fill(tokens, {});
  }
  [[nodiscard]] kv_layout layout() const { return cache.layout(); }
};

// A prompt's KV goes in and is waited for.
template <class Engine>
std::size_t store_now(Engine& e, const prompt& p) {
  auto t = e.store(p.tokens, p.layout());
  REQUIRE(t.has_value());
  const auto n = t->wait();
  REQUIRE_MESSAGE(n.has_value(), (n ? "" : n.error().what()));
  return *n;
}

// The error a cut-off layered transfer reports: from finish(), or from the ticket it returned.
template <class Transfer>
std::optional<error> finish_error(Transfer& t) {
  auto f = t.finish();
  if (!f) return f.error();
  auto r = f->wait();
  if (!r) return r.error();
  return std::nullopt;
}

template <class Transfer>
void check_cut_off(Transfer& t) {
  const auto s = t.submit_layer(0);
  REQUIRE_FALSE(s.has_value());
  CHECK(s.error().code == errc::shut_down);
  const auto f = finish_error(t);
  REQUIRE(f.has_value());
  CHECK(f->code == errc::shut_down);
  CHECK_FALSE(f->message.empty());
}

using async_host_engine = basic_engine<host_allocator, sha256_hasher, lru_eviction, cpu_backend, async_scheduler>;

async_host_engine make_async(const engine_config& cfg, async_options o,
                             std::shared_ptr<async_scheduler::control> c = std::make_shared<async_scheduler::control>()) {
  return make(async_host_engine::create(cfg, host_allocator{}, sha256_hasher::create().value(), lru_eviction{},
                                        cpu_backend{}, async_scheduler(o, std::move(c))));
}

}  // namespace

TEST_CASE("lifetimes: tickets outlive their engine whether finished or in flight when it went") {
  const auto cfg = small_config();
  auto sched = std::make_shared<async_scheduler::control>();
  auto e = std::make_unique<async_host_engine>(make_async(cfg, {.delay = 150ms}, sched));
  const prompt stored(cfg, 64, 1), fresh(cfg, 96, 2), doomed(cfg, 64, 3);
  REQUIRE(store_now(*e, stored) == 64);
  const auto done_before = e->store(stored.tokens, stored.layout()).value();  // all present: done at once

  const auto storing = e->store(fresh.tokens, fresh.layout()).value();
  paged_cache dst(cfg.geometry, 5, 16);
  const auto retrieving = e->retrieve(stored.tokens, dst.layout()).value();
  sched->plan.fail_call(0);
  const auto failing = e->store(doomed.tokens, doomed.layout()).value();
  const transfer_ticket copy = storing;
  CHECK_FALSE(storing.ready());

  e.reset();  // waits for the copies in flight, then frees the state

  for (const transfer_ticket* t : {&done_before, &storing, &retrieving, &failing, &copy}) CHECK(t->ready());
  CHECK(done_before.wait().value() == 0);
  CHECK(storing.wait().value() == 96);
  CHECK(copy.wait().value() == 96);
  CHECK(storing.wait().value() == 96);  // waiting again gives the same answer
  CHECK(retrieving.wait().value() == 64);
  CHECK(dst.mismatches(stored.tokens, 64, {}) == 0);
  const auto f = failing.wait();
  REQUIRE_FALSE(f.has_value());
  CHECK(f.error().code == errc::transfer_failure);

  const transfer_ticket empty;
  CHECK(empty.ready());
  CHECK(empty.wait().error().code == errc::invalid_argument);
}

TEST_CASE("lifetimes: layered transfers that hold no chunks outlive their engine") {
  const auto cfg = small_config();
  auto e = std::make_unique<host_engine>(make(host_engine::create(cfg)));
  const prompt stored(cfg, 64, 11);
  REQUIRE(store_now(*e, stored) == 64);
  paged_cache dst(cfg.geometry, 5, 16);
  const prompt short_one(cfg, 8, 12);  // shorter than a chunk: nothing to store
  auto miss = e->begin_retrieve(make_tokens(64, 13), dst.layout()).value();
  auto too_short = e->begin_store(short_one.tokens, short_one.layout()).value();
  auto present = e->begin_store(stored.tokens, stored.layout()).value();  // every chunk already there
  CHECK(miss.tokens() == 0);
  CHECK(too_short.tokens() == 0);
  CHECK(present.tokens() == 0);

  SUBCASE("destroyed after the engine") {
    e.reset();
    // Leaving scope drops all three: no latency may be recorded into the freed engine.
  }
  SUBCASE("finished after the engine was destroyed") {
    e.reset();
    for (auto* t : {&miss, &too_short, &present}) check_cut_off(*t);
  }
  SUBCASE("finished after shutdown, the engine still alive") {
    e->shutdown();
    for (auto* t : {&miss, &too_short, &present}) check_cut_off(*t);
    CHECK(e->lookup(stored.tokens).error().code == errc::shut_down);
    CHECK(e->get_allocator().bytes_reserved() == 0);
  }
  SUBCASE("moved after the engine was destroyed, then finished and dropped") {
    e.reset();
    auto moved = std::move(miss);
    check_cut_off(moved);
    CHECK(miss.finish().error().code == errc::invalid_argument);  // NOLINT(bugprone-use-after-move)
    auto other = std::move(too_short);
    other = std::move(present);  // drops what `other` held
  }
  SUBCASE("finished and destroyed on other threads after the engine") {
    e.reset();
    std::optional<error> finished;
    std::thread([&finished, t = std::move(miss)]() mutable { finished = finish_error(t); }).join();
    std::thread([t = std::move(too_short)] {}).join();
    REQUIRE(finished.has_value());
    CHECK(finished->code == errc::shut_down);
  }
}

TEST_CASE("lifetimes: layered transfers holding chunks are cut off when the engine goes") {
  const auto cfg = small_config();
  auto sched = std::make_shared<async_scheduler::control>();
  std::optional<async_host_engine> e(make_async(cfg, {.delay = 30ms}, sched));
  const prompt stored(cfg, 64, 21), fresh(cfg, 64, 22);
  REQUIRE(store_now(*e, stored) == 64);
  paged_cache dst(cfg.geometry, 5, 16);
  std::optional<async_host_engine::layered_transfer> storing(e->begin_store(fresh.tokens, fresh.layout()).value());
  std::optional<async_host_engine::layered_transfer> retrieving(e->begin_retrieve(stored.tokens, dst.layout()).value());
  CHECK(storing->tokens() == 64);
  CHECK(retrieving->tokens() == 64);
  const auto completed_before = sched->completed().size();
  REQUIRE(storing->submit_layer(0).has_value());  // copies in flight at the scheduler
  REQUIRE(retrieving->submit_layer(1).has_value());

  {
    // Should destruction wait for the open transfers (it must not), drop them from here.
    rescue_guard rescue(hang_limit, [&] {
      storing.reset();
      retrieving.reset();
    });
    e.reset();
    CHECK_FALSE_MESSAGE(rescue.disarm(), "destroying the engine waited for open layered transfers");
  }
  if (!storing || !retrieving) return;
  CHECK(sched->completed().size() == completed_before + 2);  // the submitted copies were waited for
  check_cut_off(*storing);
  check_cut_off(*retrieving);
}

TEST_CASE("lifetimes: a layered transfer follows its engine through a move and is cut off by move-assignment") {
  const auto cfg = small_config();
  auto a = make(host_engine::create(cfg));
  auto b = make(host_engine::create(cfg));
  const prompt p(cfg, 64, 31), q(cfg, 64, 32);
  auto into_a = a.begin_store(p.tokens, p.layout()).value();
  auto into_b = b.begin_store(q.tokens, q.layout()).value();
  REQUIRE(into_a.submit_layer(0).has_value());
  REQUIRE(into_b.submit_layer(0).has_value());

  auto moved = std::move(a);  // same state: the transfer goes on
  CHECK(a.lookup(p.tokens).error().code == errc::shut_down);  // NOLINT(bugprone-use-after-move)
  REQUIRE(into_a.submit_layer(1).has_value());
  CHECK(into_a.finish().value().wait().value() == 64);
  CHECK(moved.lookup(p.tokens).value() == 64);

  {
    rescue_guard rescue(hang_limit, [&] { auto dropped = std::move(into_b); });
    b = std::move(moved);  // b's own state shuts down: its open transfer is cut off
    CHECK_FALSE_MESSAGE(rescue.disarm(), "move-assignment waited for an open layered transfer");
  }
  check_cut_off(into_b);
  CHECK(b.lookup(p.tokens).value() == 64);
  CHECK(b.lookup(q.tokens).value() == 0);
  paged_cache dst(cfg.geometry, 5, 16);
  CHECK(b.retrieve(p.tokens, dst.layout()).value().wait().value() == 64);
  CHECK(dst.mismatches(p.tokens, 64, {}) == 0);
}

TEST_CASE("lifetimes: an engine moved and then move-assigned while tickets are pending") {
  const auto cfg = small_config();
  auto sched_a = std::make_shared<async_scheduler::control>();
  auto sched_c = std::make_shared<async_scheduler::control>();
  auto a = make_async(cfg, {.delay = 30ms}, sched_a);
  auto c = make_async(cfg, {.delay = 30ms}, sched_c);
  std::vector<prompt> ps;
  for (std::uint32_t i = 0; i < 3; ++i) ps.emplace_back(cfg, 64, 40 + i);
  REQUIRE(store_now(a, ps[0]) == 64);
  paged_cache dst(cfg.geometry, 5, 16);
  const auto back = a.retrieve(ps[0].tokens, dst.layout()).value();
  const auto s1 = a.store(ps[1].tokens, ps[1].layout()).value();
  const prompt old(cfg, 64, 49);
  const auto into_c = c.store(old.tokens, old.layout()).value();

  auto b = std::move(a);
  const auto s2 = b.store(ps[2].tokens, ps[2].layout()).value();
  c = std::move(b);  // c's own state goes: its pending store completes first
  CHECK(into_c.ready());
  CHECK(into_c.wait().value() == 64);

  CHECK(back.wait().value() == 64);
  CHECK(dst.mismatches(ps[0].tokens, 64, {}) == 0);
  CHECK(s1.wait().value() == 64);
  CHECK(s2.wait().value() == 64);
  for (const auto& p : ps) CHECK(c.lookup(p.tokens).value() == 64);
  CHECK(c.lookup(old.tokens).value() == 0);
  CHECK(a.lookup(ps[0].tokens).error().code == errc::shut_down);  // NOLINT(bugprone-use-after-move)
  CHECK(b.lookup(ps[0].tokens).error().code == errc::shut_down);  // NOLINT(bugprone-use-after-move)
  CHECK(c.get_allocator().bytes_reserved() == c.stats().current_bytes);
  CHECK(c.stats().current_bytes == 3 * cfg.chunk_bytes() * 2);
}

TEST_CASE("lifetimes: policies handed in by the caller live exactly as long as the engine") {
  fault_controls ctl;
  auto sched = std::make_shared<async_scheduler::control>();
  const auto cfg = small_config();
  const auto alive = [&] {
    return std::vector<int>{ctl.alloc->life.alive, ctl.eviction->life.alive, ctl.backend->life.alive,
                            sched->life.alive};
  };
  const std::vector<int> none{0, 0, 0, 0}, one{1, 1, 1, 1};

  SUBCASE("create() that rejects the configuration destroys them") {
    auto bad = cfg;
    bad.capacity_bytes = 0;
    {
      auto r = make_fault_engine(bad, ctl, async_scheduler({}, sched));
      REQUIRE_FALSE(r.has_value());
      CHECK(r.error().code == errc::invalid_config);
    }
    CHECK(alive() == none);
    CHECK(ctl.alloc->life.destroyed == 1);
    CHECK(sched->life.destroyed == 1);
  }
  SUBCASE("moved engines share them; the last one destroys them, after freeing every chunk") {
    std::optional<transfer_ticket> pending;
    const prompt p(cfg, 128, 51), q(cfg, 64, 52);  // sources outlive the engine's copies
    {
      auto e = make(make_fault_engine(cfg, ctl, async_scheduler({.delay = 30ms}, sched)));
      CHECK(alive() == one);
      REQUIRE(store_now(e, p) == 128);
      CHECK(e.get_allocator().bytes_reserved() == 4 * cfg.chunk_bytes());
      {
        auto moved = std::move(e);
        CHECK(alive() == one);
        e = std::move(moved);  // back again; the moved-from one goes at the end of this scope
      }
      CHECK(alive() == one);
      pending = e.store(q.tokens, q.layout()).value();
    }
    CHECK(alive() == none);
    CHECK(ctl.alloc->reserved_at_destruction == 0);  // chunks went back before the allocator did
    CHECK(sched->life.destroyed == 1);
    REQUIRE(pending.has_value());
    CHECK(pending->ready());
    CHECK(pending->wait().value() == 64);
  }
}

TEST_CASE("lifetimes: shutdown on one thread while another holds a layered transfer open") {
  const auto cfg = small_config();
  for (const bool storing : {true, false}) {
    CAPTURE(storing);
    auto e = make(host_engine::create(cfg));
    const prompt stored(cfg, 64, 61), fresh(cfg, 64, 62);
    REQUIRE(store_now(e, stored) == 64);
    paged_cache dst(cfg.geometry, 5, 16);
    std::optional<host_engine::layered_transfer> op(storing ? e.begin_store(fresh.tokens, fresh.layout()).value()
                                                            : e.begin_retrieve(stored.tokens, dst.layout()).value());
    CHECK(op->tokens() == 64);
    REQUIRE(op->submit_layer(0).has_value());

    std::promise<void> returned;
    auto shut = returned.get_future();
    std::thread stopper([&] {
      e.shutdown();
      returned.set_value();
    });
    const bool hung = shut.wait_for(hang_limit) != std::future_status::ready;
    CHECK_FALSE_MESSAGE(hung, "shutdown waited for a layered transfer another thread holds open");
    if (hung) op.reset();  // lets a shutdown that waits return, so the test ends
    stopper.join();
    if (!hung) check_cut_off(*op);
    CHECK(e.get_allocator().bytes_reserved() == 0);
    CHECK(e.lookup(stored.tokens).error().code == errc::shut_down);
  }
}

TEST_CASE("lifetimes: shutdown from one thread while others wait on tickets or keep calling") {
  watchdog dog("shutdown racing waiters and callers", hang_limit);
  const auto cfg = small_config(16);
  auto sched = std::make_shared<async_scheduler::control>();
  auto e = make_async(cfg, {.delay = 1ms}, sched);
  const prompt slow(cfg, 64, 71);
  auto t = e.store(slow.tokens, slow.layout()).value();
  std::atomic<bool> waited{false};
  result<std::size_t> seen{0};
  std::thread waiter([&] {
    seen = t.wait();
    waited = true;
  });

  // Callers that keep storing and retrieving until told shut_down (or 20 s pass).
  std::atomic<std::uint64_t> ok{0}, refused{0}, other{0}, wrong_bytes{0};
  std::vector<std::thread> callers;
  for (std::uint32_t w = 0; w < 3; ++w)
    callers.emplace_back([&, w] {
      std::vector<prompt> mine;
      for (std::uint32_t i = 0; i < 4; ++i) mine.emplace_back(cfg, 64, 100 * (w + 1) + i);
      const auto give_up = std::chrono::steady_clock::now() + 20s;
      for (std::uint32_t i = 0; std::chrono::steady_clock::now() < give_up; ++i) {
        auto& p = mine[i % mine.size()];
        dog.beat();
        paged_cache d(cfg.geometry, 5, 16);
        auto started = i % 2 == 0 ? e.store(p.tokens, p.layout()) : e.retrieve(p.tokens, d.layout());
        const auto r = started ? started->wait() : result<std::size_t>(std::unexpected(started.error()));
        if (r) {
          ++ok;
          if (i % 2 == 1) wrong_bytes += d.mismatches(p.tokens, *r, {});
        } else if (r.error().code == errc::shut_down) {
          ++refused;
          return;
        } else {
          ++other;
        }
      }
    });
  // Shut down once every caller got going (bounded, so a stuck caller still ends the test).
  for (const auto until = std::chrono::steady_clock::now() + 5s; ok < 3 && std::chrono::steady_clock::now() < until;)
    std::this_thread::sleep_for(1ms);
  e.shutdown();
  CHECK(t.ready());
  waiter.join();
  CHECK(waited);
  CHECK(seen.value() == 64);
  for (auto& c : callers) c.join();
  CHECK(ok > 0);
  CHECK(refused == 3);
  CHECK(other == 0);
  CHECK(wrong_bytes == 0);
  CHECK(e.get_allocator().bytes_reserved() == 0);
}
