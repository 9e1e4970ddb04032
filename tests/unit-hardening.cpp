// Hostile and careless use of the public API: aliased destinations, entries the token API cannot
// use, flooding keys, metrics read under load, calls after shutdown, transfers left open.

#include <doctest/doctest.h>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <sstream>
#include <thread>
#include <unordered_set>

using namespace kvortex;
using kvt::make_tokens;
using kvt::paged_cache;
using kvt::small_config;

namespace {

std::size_t store_all(host_engine& e, std::span<const token_id> toks, paged_cache& c, std::span<const std::int32_t> table) {
  c.fill(toks, table);
  return e.store(toks, c.layout(), table).value().wait().value();
}

// Keys that agree in their first 8 bytes and differ only further in.
std::vector<chunk_key> flooding_keys(std::size_t n) {
  std::vector<chunk_key> keys(n);
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t b = 0; b < 8; ++b) keys[i].bytes[b] = std::byte{0xAB};
    for (std::size_t b = 0; b < 8; ++b) keys[i].bytes[8 + b] = static_cast<std::byte>(i >> (8 * b));
  }
  return keys;
}

}  // namespace

TEST_CASE("a retrieve into a block table that names a block twice is rejected before any copy") {
  auto e = host_engine::create(small_config()).value();
  const auto toks = make_tokens(64, 1);
  paged_cache src(e.config().geometry, 8, 16);
  const std::vector<std::int32_t> table{0, 1, 2, 3};
  REQUIRE(store_all(e, toks, src, table) == 64);

  paged_cache dst(e.config().geometry, 8, 16);
  const auto before = e.stats();
  const std::vector<std::int32_t> dup{5, 6, 5, 7};
  const auto r = e.retrieve(toks, dst.layout(), dup);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::invalid_argument);
  CHECK(r.error().message.find("block_table[0] and block_table[2] both name block 5") != std::string::npos);
  CHECK_FALSE(e.begin_retrieve(toks, dst.layout(), dup));
  CHECK(dst.mismatches(toks, 0, dup) == 0);
  const auto after = e.stats();
  CHECK(after.hit_chunks == before.hit_chunks);
  CHECK(after.miss_chunks == before.miss_chunks);

  // A store may read a block twice: nothing races on the cache side.
  CHECK(e.store(make_tokens(64, 2), src.layout(), dup).value().wait().value() == 64);
  // Entries past the tokens used are not the transfer's business.
  const std::vector<std::int32_t> tail_dup{4, 5, 6, 7, 4, 4};
  CHECK(e.retrieve(toks, dst.layout(), tail_dup).value().wait().value() == 64);
  CHECK(dst.mismatches(toks, 64, tail_dup) == 0);
}

TEST_CASE("a layout whose layers share or overlap memory is refused as a destination only") {
  auto cfg = small_config();
  auto e = host_engine::create(cfg).value();
  const auto& g = cfg.geometry;
  const std::size_t blocks = 4, bt = 16;
  const std::size_t layer_bytes = 2 * blocks * bt * g.row_bytes();
  std::vector<std::byte> mem(3 * layer_bytes, std::byte{0x5A});

  const auto toks = make_tokens(32, 3);
  std::vector<std::byte*> same{mem.data(), mem.data()};
  auto shared = kv_layout::flash_attn(same, g, blocks, bt).value();
  CHECK_FALSE(shared.layers_disjoint());
  std::vector<std::byte*> half{mem.data(), mem.data() + layer_bytes / 2};
  auto overlapping = kv_layout::flash_attn(half, g, blocks, bt).value();
  CHECK_FALSE(overlapping.layers_disjoint());
  std::vector<std::byte*> apart{mem.data(), mem.data() + layer_bytes};
  CHECK(kv_layout::flash_attn(apart, g, blocks, bt).value().layers_disjoint());

  // Stores read them happily; retrieves would write the same bytes from two threads.
  REQUIRE(e.store(toks, shared).value().wait().value() == 32);
  for (const auto* lay : {&shared, &overlapping}) {
    const auto r = e.retrieve(toks, *lay);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::invalid_layout);
    CHECK(r.error().message.find("layers 0 and 1 overlap") != std::string::npos);
    CHECK_FALSE(e.begin_retrieve(toks, *lay));
  }
}

TEST_CASE("interleaved cross-layer caches are disjoint, misdeclared strided ones are not") {
  const auto g = small_config().geometry;
  std::vector<std::byte> mem(g.num_layers * 2 * 4 * 16 * g.row_bytes());
  CHECK(kv_layout::cross_layer(mem.data(), g, 4, 16, /*blocks_outermost=*/true).value().layers_disjoint());
  CHECK(kv_layout::cross_layer(mem.data(), g, 4, 16, /*blocks_outermost=*/false).value().layers_disjoint());

  // Two layers one row apart with blocks of whole rows: their elements collide.
  const std::size_t row = g.row_bytes();
  std::vector<std::byte> big(1 << 16);
  std::vector<std::byte*> ptrs{big.data(), big.data() + row};
  auto lay = kv_layout::strided(ptrs, g, 2, 16, static_cast<std::int64_t>(16 * row), static_cast<std::int64_t>(32 * row),
                                static_cast<std::int64_t>(row), static_cast<std::int64_t>(row / g.kv_heads), 1 << 15);
  REQUIRE(lay);
  CHECK_FALSE(lay->layers_disjoint());
  CHECK(lay->check_destination().error().code == errc::invalid_layout);
}

TEST_CASE("save_blocks cannot poison a prompt's prefix: a store replaces an entry of another size") {
  auto e = host_engine::create(small_config()).value();
  const auto toks = make_tokens(96, 4);
  const auto keys = e.chunk_keys(toks).value();
  REQUIRE(keys.size() == 3);

  // The second chunk's key, saved by the key API with a size no prompt chunk has.
  std::vector<std::byte> junk(100, std::byte{0xEE});
  const std::byte* p = junk.data();
  const std::size_t n = junk.size();
  REQUIRE(e.save_blocks(std::span(&keys[1], 1), std::span(&p, 1), std::span(&n, 1)).value() == 1);

  paged_cache src(e.config().geometry, 8, 16);
  CHECK(store_all(e, toks, src, {}) == 96);  // the third chunk is written too, and reachable
  CHECK(e.lookup(toks).value() == 96);
  CHECK(e.stats().replaced_chunks == 1);
  paged_cache dst(e.config().geometry, 8, 16);
  CHECK(e.retrieve(toks, dst.layout()).value().wait().value() == 96);
  CHECK(dst.mismatches(toks, 96, {}) == 0);

  // The key API now sees the chunk-sized entry, and says so.
  std::vector<std::byte> out(100);
  std::byte* q = out.data();
  const auto r = e.load_blocks(std::span(&keys[1], 1), std::span(&q, 1), std::span(&n, 1));
  CHECK(r.error().code == errc::size_mismatch);
}

TEST_CASE("an entry of another size that is in use is skipped, and nothing unreachable is written") {
  using gated_engine = basic_engine<host_allocator, sha256_hasher, lru_eviction, cpu_backend, kvt::gated_scheduler>;
  kvt::gated_scheduler gate;
  auto e = gated_engine::create(small_config(), host_allocator{}, sha256_hasher::create().value(), lru_eviction{},
                                cpu_backend{}, gate)
               .value();
  const auto toks = make_tokens(96, 5);
  const auto keys = e.chunk_keys(toks).value();

  // A save of the first key with another size, still in flight (held by the gate).
  std::vector<std::byte> junk(100, std::byte{0x11});
  const std::byte* p = junk.data();
  const std::size_t n = junk.size();
  std::thread saver([&] { CHECK(e.save_blocks(std::span(&keys[0], 1), std::span(&p, 1), std::span(&n, 1)).value() == 1); });
  while (gate.held() == 0) std::this_thread::yield();

  paged_cache src(e.config().geometry, 8, 16);
  src.fill(toks, {});
  auto t = e.store(toks, src.layout()).value();
  CHECK(t.wait().value() == 0);  // nothing after the blocked first chunk
  gate.release_all();
  saver.join();
  CHECK(e.stats().rejected_chunks == 3);
  CHECK(e.stats().chunks == 1);

  // Once the save is readable, a store replaces it.
  auto t2 = e.store(toks, src.layout()).value();
  gate.release_all();
  CHECK(t2.wait().value() == 96);
  CHECK(e.lookup(toks).value() == 96);
}

TEST_CASE("the index hash takes every key byte, seeded") {
  const auto keys = flooding_keys(20000);
  std::unordered_set<std::size_t> hashes;
  for (const auto& k : keys) hashes.insert(chunk_key_hash{}(k));
  CHECK(hashes.size() >= 19990);  // 64-bit values: a collision among 20k is a ~1e-11 event

  // Keys differing in their last byte only spread as well.
  std::unordered_set<std::size_t> low;
  for (unsigned i = 0; i < 256; ++i) {
    chunk_key k;
    k.bytes[31] = static_cast<std::byte>(i);
    low.insert(chunk_key_hash{}(k) % 1024);
  }
  CHECK(low.size() > 200);  // 256 balls in 1024 bins: ~226 distinct expected, 256 identical if ignored
}

TEST_CASE("flooding keys do not slow the index down") {
  auto cfg = small_config();
  cfg.capacity_bytes = std::size_t{64} << 20;
  auto e = host_engine::create(cfg).value();
  const auto keys = flooding_keys(20000);
  std::vector<std::byte> buf(64, std::byte{1});
  std::vector<const std::byte*> ptrs(keys.size(), buf.data());
  std::vector<std::size_t> sizes(keys.size(), buf.size());
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(e.save_blocks(keys, ptrs, sizes).value() == keys.size());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  MESSAGE("20000 flooding keys saved in " << s * 1e3 << " ms");
  // With 8-byte bucketing this took seconds (all keys in one bucket chain); generous bound.
  CHECK(s < 2.0);
  CHECK(e.check_blocks(keys).value().all());
}

TEST_CASE("histogram snapshots stay self-consistent while lookups run") {
  auto e = host_engine::create(small_config()).value();
  const auto toks = make_tokens(64, 6);
  std::atomic<bool> stop{false};
  std::vector<std::thread> ts;
  for (int i = 0; i < 4; ++i)
    ts.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) (void)e.lookup(toks);
    });
  std::size_t bad = 0, snapshots = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
  while (std::chrono::steady_clock::now() < until) {
    const auto s = e.stats();
    std::uint64_t sum = 0;
    for (auto c : s.lookup_latency.counts) sum += c;
    bad += sum != s.lookup_latency.count;
    ++snapshots;
  }
  stop = true;
  for (auto& t : ts) t.join();
  CHECK(snapshots > 100);
  CHECK(bad == 0);
}

TEST_CASE("Prometheus bucket bounds are exact and the last finite one is 8.388608 s") {
  engine_stats s;
  s.lookup_latency.counts[22] = 2;
  s.lookup_latency.counts[latency_histogram::buckets] = 1;
  s.lookup_latency.count = 3;
  const auto text = to_prometheus(s);
  CHECK(text.find("kvortex_lookup_seconds_bucket{le=\"0.000001\"} 0\n") != std::string::npos);
  CHECK(text.find("kvortex_lookup_seconds_bucket{le=\"0.000512\"} 0\n") != std::string::npos);
  CHECK(text.find("kvortex_lookup_seconds_bucket{le=\"4.194304\"} 2\n") != std::string::npos);
  CHECK(text.find("kvortex_lookup_seconds_bucket{le=\"8.388608\"} 2\n") != std::string::npos);
  CHECK(text.find("kvortex_lookup_seconds_bucket{le=\"+Inf\"} 3\n") != std::string::npos);
  CHECK(text.find("kvortex_lookup_seconds_count 3\n") != std::string::npos);
  CHECK(latency_histogram::upper_seconds(latency_histogram::buckets - 1) == doctest::Approx(8.388608));
  for (const char* bad : {"", "9lives", "kv-ortex", "kv ortex", "kvörtex"}) {
    const auto r = to_prometheus(s, bad);
    REQUIRE_FALSE(r);
    CHECK(r.error().code == errc::invalid_argument);
  }
  for (const char* good : {"kv", "_kv", "kv:ns_1", "KV2"})
    CHECK(to_prometheus(s, good).value().find(std::string("# TYPE ") + good + "_lookups_total counter") !=
          std::string::npos);
}

TEST_CASE("diagnostics and rejected calls change no counter") {
  auto e = host_engine::create(small_config()).value();
  std::vector<chunk_key> keys(2);
  keys[1].bytes[0] = std::byte{9};
  std::vector<std::byte> a(64, std::byte{3});
  std::vector<const std::byte*> src{a.data()};
  std::vector<std::size_t> one{64};
  REQUIRE(e.save_blocks(std::span(keys).first(1), src, one).value() == 1);
  const auto before = e.stats();
  CHECK(e.check_blocks(keys).value().count() == 1);
  std::vector<std::byte> out(128);
  std::vector<std::byte*> dst{out.data(), out.data() + 64};
  std::vector<std::size_t> sizes{64, 64};
  CHECK(e.load_blocks(keys, dst, sizes).error().code == errc::not_found);
  const auto after = e.stats();
  CHECK(after.hit_chunks == before.hit_chunks);
  CHECK(after.miss_chunks == before.miss_chunks);
  CHECK(after.lookups == before.lookups);
  // A load that succeeds counts its hits.
  CHECK(e.load_blocks(std::span(keys).first(1), std::span(dst).first(1), one).has_value());
  CHECK(e.stats().hit_chunks == before.hit_chunks + 1);
}

TEST_CASE("chunk_keys answers shut_down after shutdown") {
  auto e = host_engine::create(small_config()).value();
  const auto toks = make_tokens(64, 7);
  REQUIRE(e.chunk_keys(toks).value().size() == 2);
  e.shutdown();
  CHECK(e.chunk_keys(toks).error().code == errc::shut_down);
}

TEST_CASE("a layered retrieve finished with a layer never submitted fails and unpins") {
  auto e = host_engine::create(small_config(2)).value();
  const auto toks = make_tokens(64, 8);
  paged_cache src(e.config().geometry, 8, 16);
  REQUIRE(store_all(e, toks, src, {}) == 64);
  paged_cache dst(e.config().geometry, 8, 16);
  auto r = e.begin_retrieve(toks, dst.layout()).value();
  REQUIRE(r.tokens() == 64);
  REQUIRE(r.submit_layer(0).has_value());
  const auto f = r.finish();
  REQUIRE_FALSE(f);
  CHECK(f.error().code == errc::invalid_argument);
  CHECK(f.error().message.find("1 of 2 layers") != std::string::npos);
  // Unpinned: both chunks can be evicted by a store of two others.
  CHECK(store_all(e, make_tokens(64, 9), src, {}) == 64);
  CHECK(e.lookup(toks).value() == 0);
  // A miss needs no layers.
  auto miss = e.begin_retrieve(make_tokens(64, 10), dst.layout()).value();
  CHECK(miss.tokens() == 0);
  CHECK(miss.finish().value().wait().value() == 0);
}

TEST_CASE("destroying an engine while this thread holds open layered transfers does not hang") {
  const auto toks = make_tokens(64, 11);
  auto e = std::make_unique<host_engine>(host_engine::create(small_config()).value());
  paged_cache src(e->config().geometry, 8, 16);
  REQUIRE(store_all(*e, toks, src, {}) == 64);
  paged_cache dst(e->config().geometry, 8, 16);
  auto retrieving = e->begin_retrieve(toks, dst.layout()).value();
  auto storing = e->begin_store(make_tokens(64, 12), src.layout()).value();
  auto missing = e->begin_retrieve(make_tokens(64, 13), dst.layout()).value();
  auto short_store = e->begin_store(make_tokens(8, 14), src.layout()).value();
  REQUIRE(retrieving.submit_layer(0).has_value());
  const auto held_before = e->stats().current_bytes;
  CHECK(held_before == 4 * e->config().chunk_bytes());  // two stored, two reserved
  e.reset();  // returns: open transfers are cut off, not waited for

  for (auto* t : {&retrieving, &storing, &missing, &short_store}) {
    CHECK(t->submit_layer(1).error().code == errc::shut_down);
    const auto f = t->finish();
    REQUIRE_FALSE(f);
    CHECK(f.error().code == errc::shut_down);
  }
  auto dropped = std::move(storing);  // moved-from and dropped ones are inert
}

TEST_CASE("SipHash, the index hash without xxHash, matches the published vectors") {
  std::array<std::byte, 16> msg{};
  for (std::size_t i = 0; i < msg.size(); ++i) msg[i] = static_cast<std::byte>(i);
  const std::uint64_t k0 = 0x0706050403020100ULL, k1 = 0x0F0E0D0C0B0A0908ULL;  // key bytes 00..0f
  CHECK(detail::siphash<2, 4>(msg.data(), 0, k0, k1) == 0x726fdb47dd0e0e31ULL);
  CHECK(detail::siphash<2, 4>(msg.data(), 15, k0, k1) == 0xa129ca6149be45e5ULL);
  // The 1-3 variant differs from 2-4 and depends on the key.
  CHECK(detail::siphash<1, 3>(msg.data(), 16, k0, k1) != detail::siphash<2, 4>(msg.data(), 16, k0, k1));
  CHECK(detail::siphash<1, 3>(msg.data(), 16, k0, k1) != detail::siphash<1, 3>(msg.data(), 16, k0 ^ 1, k1));
}

TEST_CASE("a layered transfer dropped, or finished in error, returns only after its copies") {
  using gated_engine = basic_engine<host_allocator, sha256_hasher, lru_eviction, cpu_backend, kvt::gated_scheduler>;
  kvt::gated_scheduler gate;
  auto e = gated_engine::create(small_config(), host_allocator{}, sha256_hasher::create().value(), lru_eviction{},
                                cpu_backend{}, gate)
               .value();
  const auto toks = make_tokens(64, 15);
  paged_cache src(e.config().geometry, 8, 16);
  src.fill(toks, {});
  auto stored = e.store(toks, src.layout()).value();
  gate.release_all();
  REQUIRE(stored.wait().value() == 64);

  for (const bool drop : {true, false}) {
    paged_cache dst(e.config().geometry, 8, 16);
    auto r = e.begin_retrieve(toks, dst.layout()).value();
    REQUIRE(r.submit_layer(0).has_value());
    REQUIRE(gate.held() == 1);
    std::atomic<bool> returned{false};
    std::thread ender([&] {
      if (drop) {
        auto gone = std::move(r);
      } else {
        CHECK(r.finish().error().code == errc::invalid_argument);
      }
      returned = true;
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK_FALSE(returned.load());  // still waiting for the held copy of layer 0
    gate.release_all();
    ender.join();
    CHECK(returned.load());
    // Layer 0 landed before the call returned; nothing lands later.
    std::size_t layer0_bad = 0;
    for (std::size_t pos = 0; pos < 64; ++pos)
      dst.for_each_byte(pos, {}, [&](std::size_t l, std::size_t p, std::size_t i, std::byte* b) {
        if (l == 0) layer0_bad += *b != kvt::kv_byte(toks[pos], pos, l, p, i);
      });
    CHECK(layer0_bad == 0);
    CHECK(gate.held() == 0);
  }
}

TEST_CASE("cross_layer validates its sizes before computing a pointer or allocating") {
  alignas(64) static std::byte t[64];
  const kv_geometry wraps{.num_layers = 3, .kv_planes = 2, .kv_heads = 1, .head_dim = 1, .element_bytes = 0xFFFFFFFFu};
  const auto a = kv_layout::cross_layer(t, wraps, 0, ~std::size_t{0}, true);
  REQUIRE_FALSE(a);
  CHECK(a.error().code == errc::invalid_layout);
  const kv_geometry zero_dims{.num_layers = 0xFFFFFFFFu};
  const auto b = kv_layout::cross_layer(t, zero_dims, 0, 0);
  REQUIRE_FALSE(b);
  CHECK(b.error().code == errc::invalid_layout);
  const kv_geometry many{.num_layers = kv_layout::max_layers + 1, .kv_planes = 1, .kv_heads = 1, .head_dim = 1, .element_bytes = 1};
  const auto c = kv_layout::cross_layer(t, many, 1, 1);
  REQUIRE_FALSE(c);
  CHECK(c.error().message.find("more than 65536") != std::string::npos);
}
