// An engine over a disk tier under load, for KVORTEX_STRESS_SECONDS (default 10) a case: threads
// store and retrieve prompts from a pool four times larger than host memory, so chunks are evicted,
// demoted (write-through or write-back) and promoted all the time, with prefetches and lookups
// beside them and a demotion queue small enough to overflow. Every byte retrieved is checked
// against the KV it was made from; the counters must agree with each other; shutdown comes under
// the same load.

#include <doctest/doctest.h>

#if __has_include(<xxhash.h>)

#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"

#include "kvortex/kvortex.hpp"
#include "kvortex/tiers/disk_tier.hpp"

namespace {

namespace fs = std::filesystem;
using disk_engine = kvortex::tiered_host_engine<kvortex::disk_tier>;
using disk_backend = kvortex::tiered_backend<kvortex::cpu_backend, kvortex::disk_tier>;

double tier_stress_seconds() {
  if (const char* s = std::getenv("KVORTEX_STRESS_SECONDS")) {
    char* end = nullptr;
    const double v = std::strtod(s, &end);
    if (end != s && v > 0) return v;
  }
  return 10.0;
}

struct stress_dir {
  stress_dir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/kvortex-stress-XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  stress_dir(const stress_dir&) = delete;
  stress_dir& operator=(const stress_dir&) = delete;
  ~stress_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string path;
};

struct totals {
  std::atomic<std::uint64_t> retrieves{0}, retrieved_tokens{0}, wrong_bytes{0}, failures{0}, prefetches{0};
};

void run_load(disk_engine& e, const std::vector<std::vector<kvortex::token_id>>& prompts, totals& t,
              std::chrono::steady_clock::time_point until, std::uint32_t seed) {
  const auto& c = e.config();
  std::mt19937 rng(seed);
  kvt::paged_cache cache(c.geometry, 8 * c.chunk_tokens / c.block_tokens + 1, c.block_tokens);
  while (std::chrono::steady_clock::now() < until) {
    const auto& p = prompts[rng() % prompts.size()];
    switch (rng() % 8) {
      case 0:
      case 1: {
        cache.fill(p, {});
        auto s = e.store(p, cache.layout());
        if (!s || !s->wait()) t.failures.fetch_add(1);
        break;
      }
      case 2: {
        auto f = e.prefetch(p);
        if (f) {
          (void)f->wait();
          t.prefetches.fetch_add(1);
        } else if (f.error().code != kvortex::errc::capacity_exhausted) {
          t.failures.fetch_add(1);
        }
        break;
      }
      case 3: {
        auto w = e.lookup_tiers(p);
        if (!w) t.failures.fetch_add(1);
        else {
          std::size_t sum = w->memory_tokens;
          for (const auto& h : w->tiers) sum += h.tokens;
          if (sum != w->tokens) t.failures.fetch_add(1);
        }
        break;
      }
      default: {
        cache.clear();
        auto r = e.retrieve(p, cache.layout());
        if (!r) {
          t.failures.fetch_add(1);
          break;
        }
        auto n = r->wait();
        if (!n) {
          t.failures.fetch_add(1);
          break;
        }
        t.retrieves.fetch_add(1);
        t.retrieved_tokens.fetch_add(*n);
        t.wrong_bytes.fetch_add(cache.mismatches(p, *n, {}));
      }
    }
  }
}

void stress(kvortex::write_policy w, bool shutdown_under_load) {
  stress_dir d;
  auto c = kvt::small_config(16);  // memory: 16 chunks; the pool: 64
  c.tiering.write = w;
  c.tiering.tier_threads = 2;
  c.tiering.demotion_queue_chunks = 8;
  c.tiering.promotion_batch_chunks = 2;
  std::vector<std::vector<kvortex::token_id>> prompts;
  for (std::uint32_t i = 0; i < 16; ++i) prompts.push_back(kvt::make_tokens(4 * c.chunk_tokens, 500 + i));
  kvortex::disk_tier_config dc;
  dc.directory = d.path;
  dc.capacity_bytes = std::uint64_t{2} << 20;
  dc.ns = kvortex::tier_namespace<kvortex::sha256_hasher>(c).value();
  auto tier = kvortex::disk_tier::open(dc);
  REQUIRE(tier.has_value());
  auto made = disk_engine::create(c, disk_backend(kvortex::cpu_backend{}, std::move(*tier)));
  REQUIRE(made.has_value());
  auto& e = *made;
  totals t;
  const double secs = tier_stress_seconds();
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<long>(secs * 1000));
  std::vector<std::thread> threads;
  for (std::uint32_t i = 0; i < 4; ++i) threads.emplace_back([&, i] { run_load(e, prompts, t, until, 77 + i); });
  if (shutdown_under_load) {
    std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<long>(secs * 500)));
    e.shutdown();  // the threads' calls fail with shut_down from here on
  }
  for (auto& th : threads) th.join();
  CHECK(t.wrong_bytes.load() == 0);
  if (shutdown_under_load) return;
  CHECK(t.failures.load() == 0);
  CHECK(t.retrieves.load() > 0);
  e.flush();
  const auto s = e.stats();
  REQUIRE(s.tiers.size() == 1);
  MESSAGE(t.retrieves.load(), " retrieves, ", t.prefetches.load(), " prefetches; ", s.tiers[0].promoted_chunks,
          " promoted, ", s.tiers[0].demoted_chunks, " demoted, ", s.demotions_dropped, " demotions dropped");
  CHECK(s.tiers[0].promoted_chunks > 0);
  CHECK(s.tiers[0].demoted_chunks > 0);
  CHECK(s.demotion_queue_depth == 0);
  CHECK(s.demotion_queue_bytes == 0);
  // Each queued demotion was written, failed, or dropped to give its memory back.
  CHECK(s.tiers[0].demoted_chunks + s.tiers[0].demotion_failures <= s.demotions_queued);
  CHECK(s.tiers[0].demoted_chunks + s.tiers[0].demotion_failures + s.demotions_dropped >= s.demotions_queued);
  CHECK(s.current_bytes <= c.capacity_bytes);
  // After the load, every prompt the tier or memory still holds comes back whole and right.
  for (const auto& p : prompts) {
    kvt::paged_cache cache(c.geometry, p.size() / c.block_tokens + 1, c.block_tokens);
    auto r = e.retrieve(p, cache.layout());
    REQUIRE(r.has_value());
    auto n = r->wait();
    REQUIRE(n.has_value());
    CHECK(cache.mismatches(p, *n, {}) == 0);
  }
}

}  // namespace

TEST_CASE("stress: tiered engine, write-through, 4 threads over a pool 4x memory") {
  stress(kvortex::write_policy::write_through, false);
}

TEST_CASE("stress: tiered engine, write-back, 4 threads over a pool 4x memory") {
  stress(kvortex::write_policy::write_back, false);
}

TEST_CASE("stress: tiered engine shut down under load") { stress(kvortex::write_policy::write_back, true); }

#endif
