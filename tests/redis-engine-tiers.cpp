// Engines with a Redis tier below host memory, against real redis-server processes the tests start
// on free loopback ports: two engine processes sharing chunks through one server, a disk + Redis
// stack (disk first, Redis below it), and Redis killed and restarted under a running engine.

#include <doctest/doctest.h>

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "redis_support.hpp"
#include "tier_support.hpp"

#include "kvortex/kvortex.hpp"
#include "kvortex/tiers/disk_tier.hpp"
#include "kvortex/tiers/redis_tier.hpp"

namespace {

using namespace std::chrono_literals;
using kvt::retrieve_checked;
using kvt::store_prompt;
using kvortex::engine_config;
using kvortex::redis_tier;
using kvortex::redis_tier_config;
using redis_engine = kvortex::tiered_host_engine<redis_tier>;
using redis_backend = kvortex::tiered_backend<kvortex::cpu_backend, redis_tier>;
using stacked_engine = kvortex::tiered_host_engine<kvortex::disk_tier, redis_tier>;
using stacked_backend = kvortex::tiered_backend<kvortex::cpu_backend, kvortex::disk_tier, redis_tier>;

engine_config tiered_config(std::size_t memory_chunks) {
  auto c = kvt::small_config(memory_chunks);
  c.tiering.tier_threads = 2;
  return c;
}

redis_tier_config redis_config(const engine_config& c, const kvr::redis_server& s) {
  redis_tier_config r;
  r.servers = {s.endpoint()};
  r.ns = kvortex::tier_namespace<kvortex::sha256_hasher>(c).value();
  r.command_timeout = 500ms;
  r.reconnect_backoff_min = 10ms;
  r.reconnect_backoff_max = 50ms;
  return r;
}

redis_engine make_engine(const engine_config& c, const kvr::redis_server& s) {
  auto tier = redis_tier::open(redis_config(c, s));
  REQUIRE_MESSAGE(tier.has_value(), tier.error().message);
  auto e = redis_engine::create(c, redis_backend(kvortex::cpu_backend{}, std::move(*tier)));
  REQUIRE_MESSAGE(e.has_value(), e.error().message);
  return std::move(*e);
}

}  // namespace

TEST_CASE("engine tiers: two engine processes share chunks through one Redis") {
  kvr::redis_server server;
  const auto c = tiered_config(64);
  const auto tokens = kvt::make_tokens(8 * c.chunk_tokens, 21);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {  // the producer: another inference process
    int code = 1;
    {
      auto tier = redis_tier::open(redis_config(c, server));
      if (tier) {
        auto e = redis_engine::create(c, redis_backend(kvortex::cpu_backend{}, std::move(*tier)));
        if (e) {
          kvt::paged_cache src(c.geometry, tokens.size() / c.block_tokens + 1, c.block_tokens);
          src.fill(tokens, {});
          auto t = e->store(tokens, src.layout());
          if (t && t->wait()) {
            e->flush();
            if (e->stats().tiers[0].demoted_chunks == 8) code = 0;
          }
        }
      }
    }
    ::_exit(code);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);

  auto e = make_engine(c, server);  // the consumer
  auto where = e.lookup_tiers(tokens);
  REQUIRE(where.has_value());
  CHECK(where->memory_tokens == 0);
  REQUIRE(where->tiers.size() == 1);
  CHECK(where->tiers[0].tier == "redis");
  CHECK(where->tiers[0].tokens == tokens.size());
  CHECK(retrieve_checked(e, tokens) == tokens.size());
  const auto s = e.stats();
  CHECK(s.tiers[0].promoted_chunks == 8);
  CHECK(s.tiers[0].tier.hits == 8);
  CHECK(s.tiers[0].lookup_hit_chunks == 8);
  // A longer prompt with the same prefix: the hit is the shared prefix.
  auto longer = tokens;
  const auto tail = kvt::make_tokens(3 * c.chunk_tokens, 22);
  longer.insert(longer.end(), tail.begin(), tail.end());
  CHECK(*e.lookup(longer) == tokens.size());
}

TEST_CASE("engine tiers: disk above Redis: chunks go to both, come up from the highest that has them") {
  kvr::redis_server server;
  const auto c = tiered_config(64);
  kvr::temp_dir dir;
  kvortex::disk_tier_config dc;
  dc.directory = dir.path + "/disk";
  dc.capacity_bytes = std::uint64_t{4} << 20;
  dc.ns = kvortex::tier_namespace<kvortex::sha256_hasher>(c).value();
  const auto a = kvt::make_tokens(4 * c.chunk_tokens, 23);
  const auto make = [&] {
    auto disk = kvortex::disk_tier::open(dc);
    REQUIRE(disk.has_value());
    auto redis = redis_tier::open(redis_config(c, server));
    REQUIRE(redis.has_value());
    auto e = stacked_engine::create(c, stacked_backend(kvortex::cpu_backend{}, std::move(*disk), std::move(*redis)));
    REQUIRE(e.has_value());
    return std::move(*e);
  };
  {
    auto e = make();
    CHECK(store_prompt(e, a) == a.size());
    e.flush();
    const auto s = e.stats();
    REQUIRE(s.tiers.size() == 2);
    CHECK(s.tiers[0].name == "disk");
    CHECK(s.tiers[1].name == "redis");
    CHECK(s.tiers[0].demoted_chunks == 4);
    CHECK(s.tiers[1].demoted_chunks == 4);
  }
  {  // a restart reads from disk, the highest tier
    auto e = make();
    CHECK(retrieve_checked(e, a) == a.size());
    CHECK(e.stats().tiers[0].promoted_chunks == 4);
    CHECK(e.stats().tiers[1].promoted_chunks == 0);
  }
  // The disk lost the last two chunks: the first two come from disk, the rest from Redis.
  {
    auto e = make();
    auto keys = *e.chunk_keys(a);
    e.get_backend().tier<0>().remove(keys[2]);
    e.get_backend().tier<0>().remove(keys[3]);
    auto where = e.lookup_tiers(a);
    REQUIRE(where.has_value());
    CHECK(where->tokens == a.size());
    CHECK(where->tiers[0].tokens == 2 * c.chunk_tokens);  // disk: chunks 0 and 1
    CHECK(where->tiers[1].tokens == 2 * c.chunk_tokens);  // redis: chunks 2 and 3
    CHECK(retrieve_checked(e, a) == a.size());
    CHECK(e.stats().tiers[0].promoted_chunks == 2);
    CHECK(e.stats().tiers[1].promoted_chunks == 2);
  }
  // Each run goes to the highest tier holding it where the run starts: with chunk 0 gone from
  // disk, Redis (which holds all four) serves all four.
  {
    auto e = make();
    auto keys = *e.chunk_keys(a);
    e.get_backend().tier<0>().remove(keys[0]);
    auto where = e.lookup_tiers(a);
    REQUIRE(where.has_value());
    CHECK(where->tiers[0].tokens == 0);
    CHECK(where->tiers[1].tokens == a.size());
    CHECK(retrieve_checked(e, a) == a.size());
    CHECK(e.stats().tiers[1].promoted_chunks == 4);
  }
}

TEST_CASE("engine tiers: Redis killed under a running engine: memory hits go on, writes are dropped and counted, then it recovers") {
  kvr::redis_server server;
  const auto c = tiered_config(64);
  auto e = make_engine(c, server);
  const auto a = kvt::make_tokens(4 * c.chunk_tokens, 24);
  const auto b = kvt::make_tokens(4 * c.chunk_tokens, 25);
  const auto d = kvt::make_tokens(4 * c.chunk_tokens, 26);
  CHECK(store_prompt(e, a) == a.size());
  e.flush();
  CHECK(e.stats().tiers[0].demoted_chunks == 4);

  server.kill();
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(store_prompt(e, b) == b.size());  // the store never waits for Redis
  CHECK(retrieve_checked(e, a) == a.size());
  CHECK(*e.lookup(d) == 0);  // a miss in memory and an unreachable Redis: a miss, fast
  e.flush();
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);
  auto s = e.stats();
  CHECK(s.tiers[0].demotion_failures == 4);
  CHECK(s.tiers[0].tier.write_errors >= 1);

  server.restart();
  bool recovered = false;
  for (int i = 0; i < 100 && !recovered; ++i) {
    std::this_thread::sleep_for(20ms);
    recovered = e.get_backend().tier<0>().ping().has_value();
  }
  REQUIRE(recovered);
  CHECK(store_prompt(e, d) == d.size());
  e.flush();
  s = e.stats();
  CHECK(s.tiers[0].demoted_chunks == 8);
  auto fresh = make_engine(c, server);  // a restarted Redis starts empty: only d went there
  CHECK(*fresh.lookup(d) == d.size());
  CHECK(*fresh.lookup(a) == 0);
  CHECK(retrieve_checked(fresh, d) == d.size());
}
