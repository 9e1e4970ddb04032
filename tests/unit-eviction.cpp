#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <set>
#include <unordered_set>
#include <utility>
#include <vector>

#include "kvortex/eviction/lru_eviction.hpp"
#include "kvortex/eviction/s3fifo_eviction.hpp"
#include "kvortex/types.hpp"

using kvortex::chunk_key;
using kvortex::lru_eviction;
using kvortex::s3fifo_eviction;

namespace {

chunk_key key(std::uint64_t i) {
  chunk_key k;
  // Spread the id over the bytes chunk_key_hash reads.
  const std::uint64_t mixed = i * 0x9E3779B97F4A7C15ull;
  std::memcpy(k.bytes.data(), &mixed, sizeof mixed);
  std::memcpy(k.bytes.data() + 8, &i, sizeof i);
  return k;
}

constexpr auto any_key = [](const chunk_key&) { return true; };
constexpr auto no_key = [](const chunk_key&) { return false; };

// Drives a policy the way the engine does, for a cache of `capacity` chunks.
template <class E>
struct cache_sim {
  E policy{};
  std::size_t capacity;
  std::unordered_set<chunk_key> stored;
  std::size_t hits{0};

  explicit cache_sim(std::size_t cap) : capacity(cap) {}

  void request(const chunk_key& k) {
    if (stored.contains(k)) {
      ++hits;
      policy.on_access(k);
      return;
    }
    if (stored.size() == capacity) {
      auto v = policy.select_victim(any_key);
      REQUIRE(v.has_value());
      REQUIRE(stored.contains(*v));
      stored.erase(*v);
      policy.on_erase(*v);
    }
    stored.insert(k);
    policy.on_insert(k);
    REQUIRE(policy.size() == stored.size());
  }
};

}  // namespace

TEST_CASE_TEMPLATE("eviction policy conformance", E, lru_eviction, s3fifo_eviction) {
  E e;

  SUBCASE("empty policy has no victim") {
    CHECK(e.size() == 0);
    CHECK_FALSE(e.select_victim(any_key).has_value());
  }

  SUBCASE("the victim is a tracked key, and erase untracks it") {
    std::set<chunk_key> tracked;
    for (std::uint64_t i = 0; i < 100; ++i) {
      e.on_insert(key(i));
      tracked.insert(key(i));
    }
    for (std::uint64_t i = 0; i < 100; i += 3) e.on_access(key(i));
    CHECK(e.size() == 100);
    while (!tracked.empty()) {
      auto v = e.select_victim(any_key);
      REQUIRE(v.has_value());
      REQUIRE(tracked.contains(*v));
      CHECK(e.size() == tracked.size());  // selecting does not untrack
      e.on_erase(*v);
      tracked.erase(*v);
      CHECK(e.size() == tracked.size());
      CHECK_FALSE(e.contains(*v));
    }
    CHECK_FALSE(e.select_victim(any_key).has_value());
  }

  SUBCASE("pinned keys are never returned") {
    for (std::uint64_t i = 0; i < 50; ++i) e.on_insert(key(i));
    for (std::uint64_t i = 0; i < 50; ++i) e.on_access(key(i % 7));
    auto unpinned_only = [](const chunk_key& k) { return k == key(13) || k == key(41); };
    auto v1 = e.select_victim(unpinned_only);
    REQUIRE(v1.has_value());
    CHECK((*v1 == key(13) || *v1 == key(41)));
    e.on_erase(*v1);
    auto v2 = e.select_victim(unpinned_only);
    REQUIRE(v2.has_value());
    CHECK((*v2 == key(13) || *v2 == key(41)));
    CHECK(*v2 != *v1);
    e.on_erase(*v2);
    CHECK_FALSE(e.select_victim(unpinned_only).has_value());
    CHECK(e.size() == 48);
    // Pinned keys are still tracked and evictable once unpinned.
    for (std::uint64_t i = 0; i < 50; ++i)
      if (i != 13 && i != 41) CHECK(e.contains(key(i)));
  }

  SUBCASE("nothing when every key is pinned, and the search ends (10k keys)") {
    constexpr std::uint64_t n = 10000;
    for (std::uint64_t i = 0; i < n; ++i) e.on_insert(key(i));
    for (std::uint64_t i = 0; i < n; i += 2) e.on_access(key(i));
    for (std::uint64_t i = 0; i < n; i += 4) {
      e.on_access(key(i));
      e.on_access(key(i));
    }
    std::size_t calls = 0;
    auto counting_none = [&calls](const chunk_key&) {
      ++calls;
      return false;
    };
    CHECK_FALSE(e.select_victim(counting_none).has_value());
    CHECK(calls >= n);        // every key was considered
    CHECK(calls <= 11 * n);   // and the walk is bounded
    CHECK_FALSE(e.select_victim(no_key).has_value());
    CHECK(e.size() == n);
    // Still consistent afterwards: everything can be evicted once unpinned.
    std::size_t evicted = 0;
    while (auto v = e.select_victim(any_key)) {
      e.on_erase(*v);
      ++evicted;
    }
    CHECK(evicted == n);
    CHECK(e.size() == 0);
  }

  SUBCASE("unknown keys are ignored, duplicate inserts do not double-track") {
    e.on_access(key(1));
    e.on_erase(key(1));
    CHECK(e.size() == 0);
    e.on_insert(key(1));
    e.on_insert(key(1));
    CHECK(e.size() == 1);
    e.on_erase(key(1));
    CHECK(e.size() == 0);
    CHECK_FALSE(e.select_victim(any_key).has_value());
  }

  SUBCASE("moving keeps the tracked keys") {
    for (std::uint64_t i = 0; i < 10; ++i) e.on_insert(key(i));
    E moved = std::move(e);
    CHECK(moved.size() == 10);
    std::size_t evicted = 0;
    while (auto v = moved.select_victim(any_key)) {
      CHECK(moved.contains(*v));
      moved.on_erase(*v);
      ++evicted;
    }
    CHECK(evicted == 10);
  }
}

TEST_CASE("lru_eviction: exact least-recently-used order") {
  lru_eviction e;
  for (std::uint64_t i = 0; i < 5; ++i) e.on_insert(key(i));  // LRU..MRU: 0 1 2 3 4
  e.on_access(key(0));                                        // 1 2 3 4 0
  e.on_access(key(2));                                        // 1 3 4 0 2
  e.on_insert(key(5));                                        // 1 3 4 0 2 5
  const std::uint64_t expected[] = {1, 3, 4, 0, 2, 5};
  for (std::uint64_t want : expected) {
    auto v = e.select_victim(any_key);
    REQUIRE(v.has_value());
    CHECK(*v == key(want));
    e.on_erase(*v);
  }
  CHECK(e.size() == 0);
}

TEST_CASE("lru_eviction: a pinned key keeps its place") {
  lru_eviction e;
  for (std::uint64_t i = 0; i < 4; ++i) e.on_insert(key(i));
  auto not0 = [](const chunk_key& k) { return k != key(0); };
  auto v = e.select_victim(not0);
  REQUIRE(v.has_value());
  CHECK(*v == key(1));
  e.on_erase(*v);
  // Unpinned again, key 0 is still the least recently used.
  v = e.select_victim(any_key);
  REQUIRE(v.has_value());
  CHECK(*v == key(0));
}

TEST_CASE("s3fifo_eviction: queue mechanics") {
  s3fifo_eviction e;
  for (std::uint64_t i = 0; i < 10; ++i) e.on_insert(key(i));
  CHECK(e.small_size() == 10);
  CHECK(e.main_size() == 0);
  // Key 0 is the oldest, but two hits promote it to M instead of evicting it.
  e.on_access(key(0));
  e.on_access(key(0));
  auto v = e.select_victim(any_key);
  REQUIRE(v.has_value());
  CHECK(*v == key(1));
  CHECK(e.in_main(key(0)));
  // One hit is not enough (the paper's freq > 1 rule).
  e.on_erase(*v);
  CHECK(e.ghost_size() == 1);
  e.on_access(key(2));
  v = e.select_victim(any_key);
  REQUIRE(v.has_value());
  CHECK(*v == key(2));
  e.on_erase(*v);
  // A key the ghost remembers goes straight to M.
  e.on_insert(key(1));
  CHECK(e.in_main(key(1)));
  CHECK(e.ghost_size() == 1);
  CHECK(e.size() == 9);
}

TEST_CASE("s3fifo_eviction: a one-time scan does not flush the hot set, unlike LRU") {
  constexpr std::size_t capacity = 200;
  constexpr std::uint64_t hot = 20;
  cache_sim<s3fifo_eviction> s3(capacity);
  cache_sim<lru_eviction> lru(capacity);
  auto both = [&](const chunk_key& k) {
    s3.request(k);
    lru.request(k);
  };

  // Warm-up: the hot set is requested repeatedly among a stream of one-off keys that fills the cache.
  std::uint64_t cold = 1'000'000;
  for (int round = 0; round < 30; ++round) {
    for (std::uint64_t h = 0; h < hot; ++h) both(key(h));
    for (int i = 0; i < 10; ++i) both(key(cold++));
  }
  for (std::uint64_t h = 0; h < hot; ++h) {
    CHECK(s3.stored.contains(key(h)));
    CHECK(lru.stored.contains(key(h)));
  }

  // The scan: 5000 keys, each requested once (e.g. a long document read by one request).
  for (std::uint64_t i = 0; i < 5000; ++i) both(key(2'000'000 + i));

  std::size_t s3_kept = 0;
  std::size_t lru_kept = 0;
  for (std::uint64_t h = 0; h < hot; ++h) {
    s3_kept += s3.stored.contains(key(h)) ? 1 : 0;
    lru_kept += lru.stored.contains(key(h)) ? 1 : 0;
  }
  CHECK(s3_kept == hot);
  CHECK(lru_kept == 0);

  // So the hot set hits again after the scan under S3-FIFO only.
  const std::size_t s3_before = s3.hits;
  const std::size_t lru_before = lru.hits;
  for (std::uint64_t h = 0; h < hot; ++h) both(key(h));
  CHECK(s3.hits - s3_before == hot);
  CHECK(lru.hits - lru_before == 0);
}

TEST_CASE("s3fifo_eviction: the ghost queue stays bounded") {
  cache_sim<s3fifo_eviction> sim(100);
  for (std::uint64_t i = 0; i < 20000; ++i) sim.request(key(i));
  CHECK(sim.policy.size() == 100);
  CHECK(sim.policy.ghost_size() <= 90);
  CHECK(sim.policy.ghost_size() > 0);
}
