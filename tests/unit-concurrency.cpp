// Eight threads store, look up and retrieve shared and private prompts under eviction pressure;
// every retrieved byte is checked.

#include <doctest/doctest.h>

#include "test_support.hpp"

#include <atomic>
#include <thread>

using namespace kvortex;

TEST_CASE_TEMPLATE("8 threads: every retrieved byte is right, capacity holds", Engine, host_engine,
                   basic_engine<numa_pool_allocator, sha256_hasher, s3fifo_eviction, cpu_backend,
                                host_transfer_scheduler>) {
  auto cfg = kvt::small_config(48);
  cfg.transfer_threads = 2;
  cfg.parallel_copy_bytes = 16 << 10;  // exercise the split path too
  auto e = Engine::create(cfg).value();
  const auto shared = kvt::make_tokens(128, 1);  // a system prompt every thread extends
  constexpr int threads = 8, rounds = 60;
  std::atomic<std::size_t> bad_bytes{0}, errors{0}, hits{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      const std::size_t bt = cfg.block_tokens;
      for (int r = 0; r < rounds; ++r) {
        auto toks = shared;
        const auto tail = kvt::make_tokens(32 * (1 + rng() % 4), static_cast<std::uint32_t>(rng() % 24));
        toks.insert(toks.end(), tail.begin(), tail.end());
        const std::size_t blocks = toks.size() / bt;
        kvt::paged_cache cache(cfg.geometry, blocks + 4, bt, rng() % 2 ? kv_order::nhd : kv_order::hnd);
        const auto table = kvt::random_table(blocks, blocks + 4, static_cast<std::uint32_t>(rng()));
        auto got = e.retrieve(toks, cache.layout(), table);
        if (!got) {
          errors.fetch_add(1);
          continue;
        }
        const auto n = got->wait();
        if (!n) {
          errors.fetch_add(1);
          continue;
        }
        hits.fetch_add(*n);
        bad_bytes.fetch_add(cache.mismatches(toks, *n, table));
        // Recompute what was missing, then store the whole prompt.
        cache.fill(toks, table);
        auto st = e.store(toks, cache.layout(), table);
        if (!st || !st->wait()) errors.fetch_add(1);
        if (!e.lookup(toks)) errors.fetch_add(1);
      }
    });
  }
  for (auto& t : pool) t.join();
  const auto s = e.stats();
  CHECK(errors.load() == 0);
  CHECK(bad_bytes.load() == 0);
  CHECK(hits.load() > 0);
  CHECK(s.peak_bytes <= cfg.capacity_bytes);
  CHECK(s.evictions > 0);
  CHECK(s.deduplicated_chunks > 0);
  CHECK(e.get_allocator().bytes_reserved() >= s.current_bytes);
}

TEST_CASE("8 threads storing one prompt store each chunk once") {
  auto e = host_engine::create(kvt::small_config()).value();
  const auto toks = kvt::make_tokens(256, 9);
  kvt::paged_cache cache(e.config().geometry, 16, 16);
  cache.fill(toks, {});
  const auto lay = cache.layout();
  std::atomic<std::size_t> written{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < 8; ++t)
    pool.emplace_back([&] { written.fetch_add(e.store(toks, lay).value().wait().value()); });
  for (auto& t : pool) t.join();
  CHECK(written.load() == 256);
  CHECK(e.stats().stored_chunks == 8);
  CHECK(e.stats().deduplicated_chunks == 7 * 8);
  CHECK(e.lookup(toks).value() == 256);
}
