// Engine semantics: round trips over every layout, prefix walks, eviction, capacity, dedupe,
// partial chunks, namespaces, pinning, the key API, stats and shutdown.

#include <doctest/doctest.h>

#include "test_support.hpp"

#include <algorithm>
#include <numeric>
#include <set>
#include <string>

using namespace kvortex;
using kvt::make_tokens;
using kvt::paged_cache;
using kvt::small_config;

namespace {

using gated_engine = basic_engine<host_allocator, sha256_hasher, lru_eviction, cpu_backend, kvt::gated_scheduler>;

template <class Engine>
Engine make(const engine_config& c) {
  auto e = Engine::create(c);
  REQUIRE_MESSAGE(e.has_value(), (e ? "" : e.error().what()));
  return std::move(*e);
}

// Stores `tokens` from a fresh paged cache and waits; returns the tokens newly written.
template <class Engine>
std::size_t store_prompt(Engine& e, std::span<const token_id> tokens, std::uint32_t seed = 1) {
  const auto& g = e.config().geometry;
  const std::size_t bt = e.config().block_tokens;
  const std::size_t blocks = (tokens.size() + bt - 1) / bt;
  paged_cache cache(g, blocks + 4, bt);
  const auto table = kvt::random_table(blocks, blocks + 4, seed);
  cache.fill(tokens, table);
  auto t = e.store(tokens, cache.layout(), table);
  REQUIRE(t.has_value());
  auto n = t->wait();
  REQUIRE(n.has_value());
  return *n;
}

// Retrieves into a fresh paged cache and returns {tokens retrieved, mismatching bytes}.
template <class Engine>
std::pair<std::size_t, std::size_t> retrieve_prompt(Engine& e, std::span<const token_id> tokens,
                                                    kv_order order = kv_order::nhd, std::uint32_t seed = 2) {
  const auto& g = e.config().geometry;
  const std::size_t bt = e.config().block_tokens;
  const std::size_t blocks = (tokens.size() + bt - 1) / bt;
  paged_cache cache(g, blocks + 8, bt, order);
  const auto table = kvt::random_table(blocks, blocks + 8, seed);
  auto t = e.retrieve(tokens, cache.layout(), table);
  REQUIRE(t.has_value());
  auto n = t->wait();
  REQUIRE(n.has_value());
  return {*n, cache.mismatches(tokens, *n, table)};
}

}  // namespace

// Every shipped policy combination runs the same round trip.
using numa_engine = basic_engine<numa_pool_allocator, sha256_hasher, lru_eviction, cpu_backend, host_transfer_scheduler>;
using s3fifo_engine = basic_engine<host_allocator, sha256_hasher, s3fifo_eviction, cpu_backend, host_transfer_scheduler>;
#ifdef KVORTEX_HAS_XXH3_HASHER
using xxh3_engine = basic_engine<host_allocator, xxh3_hasher, lru_eviction, cpu_backend, inline_transfer_scheduler>;
#define KVORTEX_TEST_STACKS host_engine, numa_engine, s3fifo_engine, xxh3_engine
#else
#define KVORTEX_TEST_STACKS host_engine, numa_engine, s3fifo_engine
#endif

TEST_CASE_TEMPLATE("round trip through every policy stack", Engine, KVORTEX_TEST_STACKS) {
  auto e = make<Engine>(small_config());
  const auto toks = make_tokens(200, 7);  // 6 full chunks of 32, 8 tokens left over
  CHECK(e.lookup(toks).value() == 0);
  CHECK(store_prompt(e, toks) == 192);
  CHECK(e.lookup(toks).value() == 192);
  const auto [got, bad] = retrieve_prompt(e, toks);
  CHECK(got == 192);
  CHECK(bad == 0);
  CHECK(e.stats().chunks == 6);
}

TEST_CASE("round trip is bit-exact for NHD, HND and contiguous layouts, any block table") {
  auto e = make<host_engine>(small_config());
  const auto toks = make_tokens(256, 11);
  REQUIRE(store_prompt(e, toks, 3) == 256);
  for (auto order : {kv_order::nhd, kv_order::hnd}) {
    for (std::uint32_t seed : {5u, 6u, 7u}) {
      const auto [got, bad] = retrieve_prompt(e, toks, order, seed);
      CHECK(got == 256);
      CHECK(bad == 0);
    }
  }
  // Contiguous per-layer cache: [plane][token][row].
  const auto& g = e.config().geometry;
  std::vector<std::vector<std::byte>> bufs(g.num_layers, std::vector<std::byte>(2 * 256 * g.row_bytes()));
  std::vector<std::byte*> ptrs;
  for (auto& b : bufs) ptrs.push_back(b.data());
  auto lay = kv_layout::contiguous(ptrs, g, 256).value();
  auto t = e.retrieve(toks, lay);
  REQUIRE(t.has_value());
  CHECK(t->wait().value() == 256);
  std::size_t bad = 0;
  for (std::size_t l = 0; l < g.num_layers; ++l)
    for (std::size_t p = 0; p < 2; ++p)
      for (std::size_t pos = 0; pos < 256; ++pos)
        for (std::size_t i = 0; i < g.row_bytes(); ++i)
          bad += bufs[l][(p * 256 + pos) * g.row_bytes() + i] != kvt::kv_byte(toks[pos], pos, l, p, i);
  CHECK(bad == 0);
}

TEST_CASE("retrieve leaves blocks past the hit untouched") {
  auto e = make<host_engine>(small_config());
  const auto toks = make_tokens(128, 12);
  REQUIRE(store_prompt(e, std::span(toks).first(64)) == 64);
  paged_cache cache(e.config().geometry, 8, 16);
  const std::vector<std::int32_t> table{7, 6, 5, 4, 3, 2, 1, 0};
  auto t = e.retrieve(toks, cache.layout(), table);
  REQUIRE(t.has_value());
  REQUIRE(t->wait().value() == 64);
  CHECK(cache.mismatches(toks, 64, table) == 0);
  // Blocks 3..0 hold tokens 64..127: never written, still zero.
  for (std::int32_t b = 0; b <= 3; ++b)
    for (std::size_t l = 0; l < 2; ++l) CHECK(*cache.at(l, 1, static_cast<std::size_t>(b), 15, 1, 15) == std::byte{0});
}

TEST_CASE("lookup walks the chain and stops at the first miss") {
  auto e = make<host_engine>(small_config());
  const auto a = make_tokens(128, 21);  // 4 chunks
  REQUIRE(store_prompt(e, a) == 128);
  CHECK(e.lookup(a).value() == 128);
  CHECK(e.lookup(std::span(a).first(100)).value() == 96);  // partial tail is not matched
  CHECK(e.lookup(std::span(a).first(31)).value() == 0);

  auto b = a;
  b[70] ^= 1;  // chunk 2 differs, so chunks 2 and 3 miss although chunk 3's tokens match
  CHECK(e.lookup(b).value() == 64);
  auto longer = a;
  longer.insert(longer.end(), {1, 2, 3, 4});
  CHECK(e.lookup(longer).value() == 128);
  auto c = a;
  c[0] ^= 1;  // the first chunk differs: every later key differs too
  CHECK(e.lookup(c).value() == 0);
}

TEST_CASE("a hole in the chain hides the chunks behind it") {
  // Capacity of 4 chunks. Touch chunks 0, 2, 3 so LRU evicts chunk 1 for the next store.
  auto e = make<host_engine>(small_config(4));
  const auto p = make_tokens(128, 31);
  REQUIRE(store_prompt(e, p) == 128);
  const auto keys = e.chunk_keys(p).value();
  std::vector<std::byte> buf(e.config().chunk_bytes());
  for (std::size_t i : {0, 2, 3}) {
    std::byte* ptr = buf.data();
    const std::size_t sz = buf.size();
    REQUIRE(e.load_blocks(std::span(&keys[i], 1), std::span(&ptr, 1), std::span(&sz, 1)).has_value());
  }
  REQUIRE(store_prompt(e, make_tokens(32, 32)) == 32);
  CHECK(e.stats().evictions == 1);
  const auto mask = e.check_blocks(keys).value();
  CHECK(mask.test(0));
  CHECK_FALSE(mask.test(1));
  CHECK(mask.test(2));
  CHECK(mask.test(3));
  CHECK(e.lookup(p).value() == 32);
  CHECK(retrieve_prompt(e, p).first == 32);
}

TEST_CASE("LRU evicts the least recently used chunk") {
  auto e = make<host_engine>(small_config(3));
  const auto a = make_tokens(32, 41), b = make_tokens(32, 42), c = make_tokens(32, 43), d = make_tokens(32, 44);
  for (const auto* t : {&a, &b, &c}) REQUIRE(store_prompt(e, *t) == 32);
  CHECK(retrieve_prompt(e, a).first == 32);  // a becomes most recent; b is now the oldest
  REQUIRE(store_prompt(e, d) == 32);
  CHECK(e.lookup(a).value() == 32);
  CHECK(e.lookup(b).value() == 0);
  CHECK(e.lookup(c).value() == 32);
  CHECK(e.lookup(d).value() == 32);
  CHECK(e.stats().evictions == 1);
}

TEST_CASE("capacity is never exceeded") {
  auto cfg = small_config(10);
  cfg.store_partial_chunks = true;  // uneven chunk sizes stress the accounting
  auto e = make<host_engine>(cfg);
  std::mt19937 rng(5);
  for (int i = 0; i < 200; ++i) {
    const auto toks = make_tokens(1 + rng() % 300, static_cast<std::uint32_t>(rng()));
    (void)store_prompt(e, toks, static_cast<std::uint32_t>(i));
    const auto s = e.stats();
    REQUIRE(s.current_bytes <= cfg.capacity_bytes);
    REQUIRE(s.peak_bytes <= cfg.capacity_bytes);
    REQUIRE(e.get_allocator().bytes_reserved() >= s.current_bytes);
  }
  CHECK(e.stats().evictions > 0);
  CHECK(e.stats().peak_bytes > cfg.capacity_bytes / 2);
}

TEST_CASE("a store larger than capacity keeps a reachable prefix") {
  auto e = make<host_engine>(small_config(3));
  const auto toks = make_tokens(32 * 5, 51);
  CHECK(store_prompt(e, toks) == 96);  // chunks 3 and 4 do not fit beside 0..2, which are in flight
  CHECK(e.lookup(toks).value() == 96);
  CHECK(e.stats().rejected_chunks == 2);
  CHECK(e.stats().current_bytes == 3 * e.config().chunk_bytes());
}

TEST_CASE("storing a key twice stores it once") {
  auto e = make<host_engine>(small_config());
  const auto toks = make_tokens(96, 61);
  CHECK(store_prompt(e, toks) == 96);
  CHECK(store_prompt(e, toks) == 0);
  auto longer = toks;
  const auto extra = make_tokens(32, 62);
  longer.insert(longer.end(), extra.begin(), extra.end());
  CHECK(store_prompt(e, longer) == 32);  // only the new chunk is written
  const auto s = e.stats();
  CHECK(s.stored_chunks == 4);
  CHECK(s.deduplicated_chunks == 6);
  CHECK(s.chunks == 4);
}

TEST_CASE("a chunk in flight is deduplicated and invisible until written") {
  kvt::gated_scheduler gate;
  auto e = gated_engine::create(small_config(), host_allocator{}, sha256_hasher::create().value(), lru_eviction{},
                                cpu_backend{}, gate)
               .value();
  const auto toks = make_tokens(64, 71);
  paged_cache cache(e.config().geometry, 4, 16);
  cache.fill(toks, {});
  auto t1 = e.store(toks, cache.layout()).value();
  auto t2 = e.store(toks, cache.layout()).value();
  CHECK_FALSE(t1.ready());
  CHECK(t2.ready());  // nothing left for it to write
  CHECK(t2.wait().value() == 0);
  CHECK(e.lookup(toks).value() == 0);  // reserved, not yet readable
  CHECK(gate.held() == 1);
  gate.release_all();
  CHECK(t1.wait().value() == 64);
  CHECK(e.lookup(toks).value() == 64);
}

TEST_CASE("chunks used by an in-flight transfer are never evicted") {
  kvt::gated_scheduler gate;
  auto e = gated_engine::create(small_config(2), host_allocator{}, sha256_hasher::create().value(), lru_eviction{},
                                cpu_backend{}, gate)
               .value();
  const auto a = make_tokens(64, 81);
  paged_cache src(e.config().geometry, 4, 16);
  src.fill(a, {});
  auto st = e.store(a, src.layout()).value();
  gate.release_all();
  REQUIRE(st.wait().value() == 64);

  paged_cache dst(e.config().geometry, 4, 16);
  auto rt = e.retrieve(a, dst.layout()).value();  // pins both chunks
  REQUIRE_FALSE(rt.ready());
  const auto b = make_tokens(32, 82);
  paged_cache src2(e.config().geometry, 4, 16);
  src2.fill(b, {});
  auto bt = e.store(b, src2.layout()).value();
  CHECK(bt.wait().value() == 0);  // the store finds nothing evictable
  CHECK(e.stats().rejected_chunks == 1);
  CHECK(e.stats().evictions == 0);
  gate.release_all();
  CHECK(rt.wait().value() == 64);
  CHECK(dst.mismatches(a, 64, {}) == 0);

  auto bt2 = e.store(b, src2.layout()).value();  // now a's LRU chunk can go
  gate.release_all();
  CHECK(bt2.wait().value() == 32);
  CHECK(e.stats().evictions == 1);
}

TEST_CASE("a failed transfer rolls the store back") {
  kvt::gated_scheduler gate;
  auto e = gated_engine::create(small_config(), host_allocator{}, sha256_hasher::create().value(), lru_eviction{},
                                cpu_backend{}, gate)
               .value();
  const auto toks = make_tokens(64, 91);
  paged_cache src(e.config().geometry, 4, 16);
  auto t = e.store(toks, src.layout()).value();
  CHECK(e.stats().current_bytes == 2 * e.config().chunk_bytes());
  gate.fail_all();
  const auto r = t.wait();
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::transfer_failure);
  const auto s = e.stats();
  CHECK(s.current_bytes == 0);
  CHECK(s.chunks == 0);
  CHECK(s.transfer_failures == 1);
  CHECK(e.get_allocator().bytes_reserved() == 0);
  CHECK(e.lookup(toks).value() == 0);
}

TEST_CASE("partial chunks are kept only when configured") {
  const auto toks = make_tokens(100, 101);
  SUBCASE("off") {
    auto e = make<host_engine>(small_config());
    CHECK(store_prompt(e, toks) == 96);
    CHECK(e.lookup(toks).value() == 96);
    CHECK(retrieve_prompt(e, toks).first == 96);
  }
  SUBCASE("on") {
    auto cfg = small_config();
    cfg.store_partial_chunks = true;
    auto e = make<host_engine>(cfg);
    CHECK(store_prompt(e, toks) == 100);
    CHECK(e.lookup(toks).value() == 100);
    const auto [got, bad] = retrieve_prompt(e, toks);
    CHECK(got == 100);
    CHECK(bad == 0);
    CHECK(e.stats().current_bytes == 100 * cfg.geometry.token_bytes());
    // Another tail after the same 96 tokens matches only the full chunks.
    auto other = toks;
    other[99] ^= 1;
    CHECK(e.lookup(other).value() == 96);
    // A longer prompt's fourth chunk is full, so the stored partial one does not match.
    auto longer = toks;
    longer.resize(140, 5);
    CHECK(e.lookup(longer).value() == 96);
  }
}

TEST_CASE("namespaces isolate key spaces") {
  const auto toks = make_tokens(64, 111);
  const auto base = small_config();
  auto keys_of = [&](const engine_config& c) { return make<host_engine>(c).chunk_keys(toks).value(); };
  const auto k0 = keys_of(base);
  CHECK(keys_of(base) == k0);  // deterministic across engines
  std::vector<engine_config> variants(7, base);
  variants[0].ns.model_id = "other-model";
  variants[1].ns.dtype = "float16";
  variants[2].ns.layout = "flash_attn_hnd";
  variants[3].ns.tp_size = 2;
  variants[4].ns.tp_size = 2, variants[4].ns.tp_rank = 1;
  variants[5].ns.cache_salt = "tenant-a";
  variants[6].geometry.head_dim = 16;
  std::set<std::vector<chunk_key>> seen{k0};
  for (const auto& v : variants) {
    const auto k = keys_of(v);
    CHECK(k.size() == 2);
    CHECK(seen.insert(k).second);
    for (const auto& key : k) CHECK(std::find(k0.begin(), k0.end(), key) == k0.end());
  }
  // A store under one salt is invisible under another, even over the same key API bytes.
  auto a = make<host_engine>(base);
  auto b_cfg = base;
  b_cfg.ns.cache_salt = "tenant-b";
  auto b = make<host_engine>(b_cfg);
  REQUIRE(store_prompt(a, toks) == 64);
  CHECK(b.check_blocks(a.chunk_keys(toks).value()).value().none());
  CHECK(b.lookup(toks).value() == 0);
}

TEST_CASE("key API: save, check and load blocks") {
  auto e = make<host_engine>(small_config());
  std::vector<chunk_key> keys(3);
  for (std::size_t i = 0; i < 3; ++i) keys[i].bytes[0] = static_cast<std::byte>(i + 1);
  std::vector<std::vector<std::byte>> blocks{std::vector<std::byte>(100), std::vector<std::byte>(4096),
                                             std::vector<std::byte>(7)};
  for (std::size_t i = 0; i < 3; ++i)
    for (std::size_t j = 0; j < blocks[i].size(); ++j) blocks[i][j] = static_cast<std::byte>(i * 31 + j);
  std::vector<const std::byte*> src{blocks[0].data(), blocks[1].data(), blocks[2].data()};
  std::vector<std::size_t> sizes{100, 4096, 7};
  CHECK(e.save_blocks(keys, src, sizes).value() == 3);
  CHECK(e.save_blocks(keys, src, sizes).value() == 0);
  CHECK(e.check_blocks(keys).value().all());

  std::vector<std::vector<std::byte>> out{std::vector<std::byte>(100), std::vector<std::byte>(4096),
                                          std::vector<std::byte>(7)};
  std::vector<std::byte*> dst{out[0].data(), out[1].data(), out[2].data()};
  REQUIRE(e.load_blocks(keys, dst, sizes).has_value());
  CHECK(out == blocks);

  chunk_key missing;
  missing.bytes[0] = std::byte{99};
  const std::vector<chunk_key> mixed{keys[0], missing, keys[2]};
  const auto mask = e.check_blocks(mixed).value();
  CHECK(mask.test(0));
  CHECK_FALSE(mask.test(1));
  CHECK(mask.test(2));
  CHECK(mask.count() == 2);
  const auto r = e.load_blocks(mixed, dst, sizes);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::not_found);
  CHECK(r.error().message.find("key 1") != std::string::npos);
}

TEST_CASE("a failed load releases its pins") {
  auto e = make<host_engine>(small_config(2));
  const auto p = make_tokens(64, 121);
  REQUIRE(store_prompt(e, p) == 64);
  auto keys = e.chunk_keys(p).value();
  chunk_key missing;
  keys.push_back(missing);
  std::vector<std::byte> buf(3 * e.config().chunk_bytes());
  std::vector<std::byte*> dst{buf.data(), buf.data() + e.config().chunk_bytes(), buf.data() + 2 * e.config().chunk_bytes()};
  std::vector<std::size_t> sizes(3, e.config().chunk_bytes());
  REQUIRE_FALSE(e.load_blocks(keys, dst, sizes).has_value());
  // Had the first two stayed pinned, nothing could be evicted for this store.
  CHECK(store_prompt(e, make_tokens(64, 122)) == 64);
  CHECK(e.stats().evictions == 2);
}

TEST_CASE("stats count traffic and render as Prometheus text") {
  auto e = make<host_engine>(small_config());
  const auto toks = make_tokens(96, 131);
  REQUIRE(store_prompt(e, toks) == 96);
  CHECK(e.lookup(toks).value() == 96);
  CHECK(e.lookup(make_tokens(64, 132)).value() == 0);
  CHECK(retrieve_prompt(e, toks).first == 96);
  const auto s = e.stats();
  const std::size_t cb = e.config().chunk_bytes();
  CHECK(s.lookups == 2);
  CHECK(s.hit_tokens == 96);
  CHECK(s.queried_tokens == 160);
  CHECK(s.hit_chunks == 6);   // 3 by lookup, 3 by retrieve
  CHECK(s.miss_chunks == 2);
  CHECK(s.stored_chunks == 3);
  CHECK(s.retrieved_chunks == 3);
  CHECK(s.bytes_stored == 3 * cb);
  CHECK(s.bytes_loaded == 3 * cb);
  CHECK(s.current_bytes == 3 * cb);
  CHECK(s.peak_bytes == 3 * cb);
  CHECK(s.chunks == 3);
  CHECK(s.lookup_latency.count == 2);
  CHECK(s.store_latency.count == 1);
  CHECK(s.retrieve_latency.count == 1);

  const auto text = to_prometheus(s);
  CHECK(text.find("kvortex_hit_tokens_total 96\n") != std::string::npos);
  CHECK(text.find("# TYPE kvortex_lookup_seconds histogram\n") != std::string::npos);
  CHECK(text.find("kvortex_lookup_seconds_bucket{le=\"+Inf\"} 2\n") != std::string::npos);
  CHECK(text.find("kvortex_lookup_seconds_count 2\n") != std::string::npos);
  CHECK(text.find("kvortex_bytes " + std::to_string(3 * cb) + "\n") != std::string::npos);
  CHECK(to_prometheus(s, "srv").value().find("srv_chunks 3\n") != std::string::npos);
  CHECK(to_prometheus(s, "1bad").error().code == errc::invalid_argument);
  CHECK(to_prometheus(s, "").error().code == errc::invalid_argument);
  CHECK(to_prometheus(s, "a b").error().code == errc::invalid_argument);
}

TEST_CASE("shutdown frees everything and refuses later calls") {
  auto e = make<host_engine>(small_config());
  const auto toks = make_tokens(64, 141);
  REQUIRE(store_prompt(e, toks) == 64);
  e.shutdown();
  CHECK(e.get_allocator().bytes_reserved() == 0);
  CHECK(e.lookup(toks).error().code == errc::shut_down);
  paged_cache c(e.config().geometry, 4, 16);
  CHECK(e.store(toks, c.layout()).error().code == errc::shut_down);
  CHECK(e.retrieve(toks, c.layout()).error().code == errc::shut_down);
  chunk_key k;
  const std::byte* p = c.layers[0].data();
  std::byte* q = c.layers[0].data();
  const std::size_t n = 16;
  CHECK(e.save_blocks(std::span(&k, 1), std::span(&p, 1), std::span(&n, 1)).error().code == errc::shut_down);
  CHECK(e.load_blocks(std::span(&k, 1), std::span(&q, 1), std::span(&n, 1)).error().code == errc::shut_down);
  CHECK(e.check_blocks(std::span(&k, 1)).error().code == errc::shut_down);
  e.shutdown();  // idempotent

  auto f = make<host_engine>(small_config());
  auto g = std::move(f);
  CHECK(f.lookup(toks).error().code == errc::shut_down);  // NOLINT(bugprone-use-after-move): defined behaviour
  CHECK(g.lookup(toks).value() == 0);
}

TEST_CASE("shutdown waits for transfers in flight") {
  kvt::gated_scheduler gate;
  auto e = gated_engine::create(small_config(), host_allocator{}, sha256_hasher::create().value(), lru_eviction{},
                                cpu_backend{}, gate)
               .value();
  const auto toks = make_tokens(64, 151);
  paged_cache src(e.config().geometry, 4, 16);
  src.fill(toks, {});
  auto t = e.store(toks, src.layout()).value();
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    gate.release_all();
  });
  e.shutdown();
  CHECK(t.ready());
  CHECK(t.wait().value() == 64);
  releaser.join();
  CHECK(e.get_allocator().bytes_reserved() == 0);
}

TEST_CASE("making room for a prompt's tail never evicts its own head") {
  auto e = make<host_engine>(small_config(3));
  const auto a = make_tokens(96, 161);
  const auto a_head = std::span(a).first(64);
  REQUIRE(store_prompt(e, a_head) == 64);              // LRU: a0 a1
  REQUIRE(store_prompt(e, make_tokens(32, 162)) == 32);  // LRU: a0 a1 b, full
  CHECK(store_prompt(e, a) == 32);                      // a0, a1 are held and touched; b goes
  CHECK(e.lookup(a).value() == 96);
  CHECK(e.stats().evictions == 1);
}
