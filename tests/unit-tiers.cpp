// The engine's data flow to and from storage tiers, with a test tier kept in process memory whose
// puts can be held at a gate and whose gets can fail, so the timing cases are deterministic: a
// store never waits for a slow tier, waiting demotions give their pins up to a store, a failed read
// ends the hit, prefetch and the promotion timeout, shutdown with a demotion in flight, settings
// validated, and engines without tiers answering the tier calls.

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include "tier_support.hpp"

namespace {

using namespace std::chrono_literals;

// The test tier's state, shared so a test steers it after the tier moved into an engine.
struct held_tier_control {
  std::mutex m;
  std::condition_variable cv;
  std::map<kvortex::chunk_key, std::vector<std::byte>> chunks;
  bool gate_open{true};
  std::size_t puts_waiting{0};
  std::set<kvortex::chunk_key> failing_gets;
  std::atomic<std::size_t> puts{0}, gets{0};
  std::chrono::milliseconds get_delay{0};

  void close_gate() {
    std::lock_guard lk(m);
    gate_open = false;
  }
  void open_gate() {
    {
      std::lock_guard lk(m);
      gate_open = true;
    }
    cv.notify_all();
  }
  void wait_for_waiting_puts(std::size_t n) {
    std::unique_lock lk(m);
    REQUIRE(cv.wait_for(lk, 10s, [&] { return puts_waiting >= n; }));
  }
};

class held_tier {
 public:
  static constexpr std::string_view name = "held";
  explicit held_tier(std::shared_ptr<held_tier_control> c) : c_(std::move(c)) {}

  kvortex::result<void> put(const kvortex::chunk_key& k, std::span<const std::byte> in) {
    std::unique_lock lk(c_->m);
    ++c_->puts_waiting;
    c_->cv.notify_all();
    c_->cv.wait(lk, [&] { return c_->gate_open; });
    --c_->puts_waiting;
    c_->chunks[k].assign(in.begin(), in.end());
    c_->puts.fetch_add(1);
    return {};
  }
  kvortex::result<std::size_t> get(const kvortex::chunk_key& k, std::span<std::byte> out) {
    if (c_->get_delay.count() > 0) std::this_thread::sleep_for(c_->get_delay);
    std::lock_guard lk(c_->m);
    c_->gets.fetch_add(1);
    const auto it = c_->chunks.find(k);
    if (it == c_->chunks.end() || c_->failing_gets.count(k) != 0) return kvortex::fail(kvortex::errc::not_found, "held tier: absent");
    if (out.size() < it->second.size()) return kvortex::fail(kvortex::errc::size_mismatch, "held tier: small buffer");
    std::memcpy(out.data(), it->second.data(), it->second.size());
    return it->second.size();
  }
  std::size_t contains(std::span<const kvortex::chunk_key> keys) {
    std::lock_guard lk(c_->m);
    std::size_t n = 0;
    while (n < keys.size() && c_->chunks.count(keys[n]) != 0) ++n;
    return n;
  }
  void remove(const kvortex::chunk_key& k) noexcept {
    std::lock_guard lk(c_->m);
    c_->chunks.erase(k);
  }
  [[nodiscard]] kvortex::tier_stats stats() const {
    kvortex::tier_stats s;
    std::lock_guard lk(c_->m);
    s.entries = c_->chunks.size();
    return s;
  }

 private:
  std::shared_ptr<held_tier_control> c_;
};
static_assert(kvortex::storage_tier<held_tier>);

using held_engine = kvortex::tiered_host_engine<held_tier>;
using held_backend = kvortex::tiered_backend<kvortex::cpu_backend, held_tier>;
static_assert(kvortex::backend<held_backend>);

held_engine make(const kvortex::engine_config& c, const std::shared_ptr<held_tier_control>& ctl) {
  auto e = held_engine::create(c, held_backend(kvortex::cpu_backend{}, held_tier(ctl)));
  REQUIRE_MESSAGE(e.has_value(), e.error().message);
  return std::move(*e);
}

kvortex::engine_config config(std::size_t memory_chunks) {
  auto c = kvt::small_config(memory_chunks);
  c.tiering.tier_threads = 1;
  return c;
}

std::size_t store(held_engine& e, const std::vector<kvortex::token_id>& tokens) { return kvt::store_prompt(e, tokens); }
std::size_t retrieve(held_engine& e, const std::vector<kvortex::token_id>& tokens) { return kvt::retrieve_checked(e, tokens); }

}  // namespace

TEST_CASE("tiers: a store never waits for a stuck tier: waiting demotions give their chunks up") {
  auto ctl = std::make_shared<held_tier_control>();
  ctl->close_gate();
  const auto c = config(4);
  auto e = make(c, ctl);
  const auto a = kvt::make_tokens(4 * c.chunk_tokens, 1);
  const auto b = kvt::make_tokens(4 * c.chunk_tokens, 2);
  CHECK(store(e, a) == a.size());
  ctl->wait_for_waiting_puts(1);  // the tier thread holds a's first chunk at the gate
  // Memory is full of a's chunks, all pinned by demotions; b must still go in, at once.
  const auto t0 = std::chrono::steady_clock::now();
  const std::size_t stored = store(e, b);
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);
  CHECK(stored == 3 * c.chunk_tokens);  // one slot stays with the chunk being written
  auto s = e.stats();
  CHECK(s.demotions_dropped == 3);
  CHECK(s.rejected_chunks == 1);
  ctl->open_gate();
  e.flush();
  s = e.stats();
  CHECK(s.demotion_queue_depth == 0);
  CHECK(ctl->puts.load() == 1 + 3);  // a's first chunk, then b's three
  CHECK(s.tiers[0].demoted_chunks == 4);
}

TEST_CASE("tiers: flush waits for the demotions, and a chunk being written is never evicted") {
  auto ctl = std::make_shared<held_tier_control>();
  ctl->close_gate();
  const auto c = config(64);
  auto e = make(c, ctl);
  const auto a = kvt::make_tokens(6 * c.chunk_tokens, 3);
  CHECK(store(e, a) == a.size());
  std::atomic<bool> flushed{false};
  std::thread f([&] {
    e.flush();
    flushed = true;
  });
  ctl->wait_for_waiting_puts(1);
  std::this_thread::sleep_for(50ms);
  CHECK_FALSE(flushed.load());
  CHECK(e.stats().demotion_queue_depth == 6);
  ctl->open_gate();
  f.join();
  CHECK(flushed.load());
  CHECK(e.stats().tiers[0].demoted_chunks == 6);
  CHECK(e.stats().tiers[0].tier.entries == 6);
}

TEST_CASE("tiers: a chunk the tier lists but cannot deliver ends the hit there") {
  auto ctl = std::make_shared<held_tier_control>();
  const auto c = config(64);
  const auto a = kvt::make_tokens(5 * c.chunk_tokens, 4);
  std::vector<kvortex::chunk_key> keys;
  {
    auto e = make(c, ctl);
    CHECK(store(e, a) == a.size());
    keys = *e.chunk_keys(a);
  }  // shutdown drains: the tier has all five
  REQUIRE(ctl->chunks.size() == 5);
  ctl->failing_gets.insert(keys[2]);
  auto e = make(c, ctl);
  CHECK(*e.lookup(a) == a.size());
  CHECK(retrieve(e, a) == 2 * c.chunk_tokens);
  const auto s = e.stats();
  CHECK(s.tiers[0].promoted_chunks == 2);
  CHECK(s.tiers[0].promotion_failures == 1);
  CHECK(s.chunks == 2);
  ctl->failing_gets.clear();
  CHECK(retrieve(e, a) == a.size());  // the rest comes up on the next try
}

TEST_CASE("tiers: a slow tier is cut off by the promotion timeout, and the ready prefix is served") {
  auto ctl = std::make_shared<held_tier_control>();
  auto c = config(64);
  c.tiering.promotion_batch_chunks = 1;
  c.tiering.promotion_timeout = 150ms;
  const auto a = kvt::make_tokens(8 * c.chunk_tokens, 5);
  {
    auto e = make(c, ctl);
    CHECK(store(e, a) == a.size());
  }
  ctl->get_delay = 60ms;  // per chunk: 8 chunks would take 480 ms
  auto e = make(c, ctl);
  const auto t0 = std::chrono::steady_clock::now();
  const std::size_t got = retrieve(e, a);
  const auto took = std::chrono::steady_clock::now() - t0;
  CHECK(got > 0);
  CHECK(got < a.size());
  CHECK(took < 400ms);
  CHECK(e.stats().promotion_timeouts == 1);
  // A prefetch has the same bound; the next retrieve starts from what is now in memory.
  auto p = e.prefetch(a);
  REQUIRE(p.has_value());
  const auto more = p->wait();
  REQUIRE(more.has_value());
  CHECK(*more > got);
  ctl->get_delay = 0ms;
  CHECK(retrieve(e, a) == a.size());
}

TEST_CASE("tiers: write-back demotes evicted chunks with their memory, and lookups find them below") {
  auto ctl = std::make_shared<held_tier_control>();
  auto c = config(2);
  c.tiering.write = kvortex::write_policy::write_back;
  auto e = make(c, ctl);
  const auto a = kvt::make_tokens(2 * c.chunk_tokens, 6);
  const auto b = kvt::make_tokens(2 * c.chunk_tokens, 7);
  CHECK(store(e, a) == a.size());
  e.flush();
  CHECK(ctl->puts.load() == 0);
  CHECK(store(e, b) == b.size());
  e.flush();
  CHECK(ctl->puts.load() == 2);
  auto where = e.lookup_tiers(a);
  REQUIRE(where.has_value());
  CHECK(where->memory_tokens == 0);
  CHECK(where->tiers[0].tier == "held");
  CHECK(where->tiers[0].tokens == a.size());
  CHECK(retrieve(e, a) == a.size());
}

TEST_CASE("tiers: shutdown with a demotion in flight waits for it, then drops nothing queued when draining") {
  auto ctl = std::make_shared<held_tier_control>();
  ctl->close_gate();
  const auto c = config(64);
  auto e = make(c, ctl);
  const auto a = kvt::make_tokens(3 * c.chunk_tokens, 8);
  CHECK(store(e, a) == a.size());
  ctl->wait_for_waiting_puts(1);
  std::thread opener([&] {
    std::this_thread::sleep_for(100ms);
    ctl->open_gate();
  });
  e.shutdown();  // drains: returns once the gate opened and all three were written
  opener.join();
  CHECK(ctl->puts.load() == 3);
  CHECK(e.prefetch(a).error().code == kvortex::errc::shut_down);
  CHECK(e.lookup(a).error().code == kvortex::errc::shut_down);
}

TEST_CASE("tiers: shutdown without draining drops what is still queued, counted") {
  auto ctl = std::make_shared<held_tier_control>();
  ctl->close_gate();
  auto c = config(64);
  c.tiering.drain_on_shutdown = false;
  auto e = make(c, ctl);
  const auto a = kvt::make_tokens(4 * c.chunk_tokens, 9);
  CHECK(store(e, a) == a.size());
  ctl->wait_for_waiting_puts(1);
  std::thread opener([&] {
    std::this_thread::sleep_for(100ms);
    ctl->open_gate();
  });
  e.shutdown();
  opener.join();
  CHECK(ctl->puts.load() == 1);  // only the one in flight
}

TEST_CASE("tiers: tiering settings are validated") {
  auto c = kvt::small_config();
  c.tiering.tier_threads = 0;
  CHECK(c.validate().error().code == kvortex::errc::invalid_config);
  CHECK(c.validate().error().message.find("tier_threads") != std::string::npos);
  c.tiering.tier_threads = 65;
  CHECK_FALSE(c.validate().has_value());
  c.tiering.tier_threads = 1;
  c.tiering.demotion_queue_chunks = 0;
  CHECK(c.validate().error().message.find("demotion_queue_chunks") != std::string::npos);
  c.tiering.demotion_queue_chunks = 1;
  c.tiering.promotion_timeout = std::chrono::milliseconds(-1);
  CHECK(c.validate().error().message.find("promotion_timeout") != std::string::npos);
  c.tiering.promotion_timeout = 10ms;
  c.tiering.promotion_batch_chunks = 0;
  CHECK(c.validate().error().message.find("promotion_batch_chunks") != std::string::npos);
  c.tiering.promotion_batch_chunks = 4;
  c.tiering.write = static_cast<kvortex::write_policy>(7);
  CHECK(c.validate().error().message.find("tiering.write") != std::string::npos);
  c.tiering.write = kvortex::write_policy::write_back;
  CHECK(c.validate().has_value());
  auto ctl = std::make_shared<held_tier_control>();
  c.tiering.tier_threads = 0;
  auto e = held_engine::create(c, held_backend(kvortex::cpu_backend{}, held_tier(ctl)));
  CHECK(e.error().code == kvortex::errc::invalid_config);
}

TEST_CASE("tiers: an engine without tiers answers the tier calls from memory") {
  const auto c = kvt::small_config();
  auto e = kvortex::host_engine::create(c).value();
  const auto a = kvt::make_tokens(3 * c.chunk_tokens, 10);
  kvt::paged_cache src(c.geometry, a.size() / c.block_tokens + 1, c.block_tokens);
  src.fill(a, {});
  REQUIRE(e.store(a, src.layout())->wait().has_value());
  auto where = e.lookup_tiers(a);
  REQUIRE(where.has_value());
  CHECK(where->tokens == a.size());
  CHECK(where->memory_tokens == a.size());
  CHECK(where->tiers.empty());
  auto longer = a;
  const auto tail = kvt::make_tokens(2 * c.chunk_tokens, 11);
  longer.insert(longer.end(), tail.begin(), tail.end());
  auto p = e.prefetch(longer);
  REQUIRE(p.has_value());
  CHECK(*p->wait() == a.size());
  e.flush();  // nothing to wait for
  const auto s = e.stats();
  CHECK(s.tiers.empty());
  CHECK(kvortex::to_prometheus(s).find("tier") == std::string::npos);
  CHECK(e.prefetch({}).error().code == kvortex::errc::invalid_argument);
}
