// Layer-by-layer stores and retrieves, and every layout factory through the engine.

#include <doctest/doctest.h>

#include "test_support.hpp"

using namespace kvortex;
using kvt::make_tokens;

namespace {

using gated_engine = basic_engine<host_allocator, sha256_hasher, lru_eviction, cpu_backend, kvt::gated_scheduler>;

// A cache as raw per-layer tensors, filled with random bytes.
struct raw_cache {
  std::vector<std::vector<std::byte>> t;
  std::vector<std::byte*> ptrs;
  raw_cache(std::size_t layers, std::size_t bytes, unsigned seed) {
    std::mt19937 rng(seed);
    for (std::size_t l = 0; l < layers; ++l) {
      t.emplace_back(bytes);
      for (auto& b : t.back()) b = static_cast<std::byte>(rng());
      ptrs.push_back(t.back().data());
    }
  }
};

// Gathers `count` tokens of `lay` into one chunk-format buffer, for comparing two caches.
std::vector<std::byte> gather(const kv_layout& lay, std::span<const std::int32_t> table, std::size_t count) {
  std::vector<std::byte> out(count * lay.geometry().token_bytes());
  std::vector<copy_op> ops;
  lay.append_copies(ops, table, 0, count, out.data(), true);
  for (const auto& op : ops) kvortex::copy_host(op);
  return out;
}

}  // namespace

TEST_CASE("layer-by-layer store publishes only after every layer and finish") {
  kvt::gated_scheduler gate;
  auto e = gated_engine::create(kvt::small_config(), host_allocator{}, sha256_hasher::create().value(),
                                lru_eviction{}, cpu_backend{}, gate)
               .value();
  const auto toks = make_tokens(64, 1);
  kvt::paged_cache src(e.config().geometry, 4, 16);
  src.fill(toks, {});
  auto op = e.begin_store(toks, src.layout()).value();
  CHECK(op.tokens() == 64);
  REQUIRE(op.submit_layer(1).has_value());
  CHECK(op.submit_layer(1).error().message.find("already submitted") != std::string::npos);
  CHECK(op.submit_layer(2).error().code == errc::invalid_argument);
  gate.release_all();
  CHECK(e.lookup(toks).value() == 0);  // layer 0 still missing
  REQUIRE(op.submit_layer(0).has_value());
  auto t = op.finish().value();
  CHECK_FALSE(t.ready());
  gate.release_all();
  CHECK(t.wait().value() == 64);
  CHECK(e.lookup(toks).value() == 64);

  kvt::paged_cache dst(e.config().geometry, 4, 16);
  auto r = e.begin_retrieve(toks, dst.layout()).value();
  CHECK(r.tokens() == 64);
  REQUIRE(r.submit_layer(0).has_value());
  REQUIRE(r.submit_layer(1).has_value());
  auto rt = r.finish().value();
  gate.release_all();
  CHECK(rt.wait().value() == 64);
  CHECK(dst.mismatches(toks, 64, {}) == 0);
}

TEST_CASE("a layered store that misses layers, or is dropped, rolls back") {
  auto e = host_engine::create(kvt::small_config(2)).value();
  const auto toks = make_tokens(64, 2);
  kvt::paged_cache src(e.config().geometry, 4, 16);
  {
    auto op = e.begin_store(toks, src.layout()).value();
    REQUIRE(op.submit_layer(0).has_value());
    const auto r = op.finish();
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().message.find("only 1 of 2 layers") != std::string::npos);
    CHECK(op.finish().error().code == errc::invalid_argument);
  }
  CHECK(e.stats().current_bytes == 0);
  {
    auto op = e.begin_store(toks, src.layout()).value();
    CHECK(e.stats().current_bytes == 2 * e.config().chunk_bytes());
  }
  CHECK(e.stats().current_bytes == 0);
  CHECK(e.stats().chunks == 0);
  CHECK(e.lookup(toks).value() == 0);
  // A dropped retrieve unpins: the chunks can be evicted again.
  REQUIRE(e.store(toks, src.layout()).value().wait().value() == 64);
  { auto r = e.begin_retrieve(toks, src.layout()).value(); }
  CHECK(e.stats().transfer_failures == 3);  // two rolled-back stores, one dropped retrieve
  const auto other = make_tokens(64, 3);
  CHECK(e.store(other, src.layout()).value().wait().value() == 64);  // needs both chunks evicted
  CHECK(e.stats().evictions == 2);
}

TEST_CASE("every layout factory round-trips through the engine") {
  struct variant {
    const char* name;
    kv_geometry g;
  };
  const kv_geometry kv{.num_layers = 2, .kv_planes = 2, .kv_heads = 2, .head_dim = 8, .element_bytes = 2};
  const kv_geometry mla{.num_layers = 2, .kv_planes = 1, .kv_heads = 1, .head_dim = 576, .element_bytes = 1};
  const std::size_t blocks = 10, bt = 16, tokens = 96;
  for (const char* kind : {"flash_attn_nhd", "flash_attn_hnd", "flashinfer_nhd", "flashinfer_hnd", "mla", "cross_layer",
                           "cross_layer_blocks_outermost", "pages"}) {
    CAPTURE(kind);
    const std::string k(kind);
    const auto g = k == "mla" ? mla : kv;
    auto cfg = kvt::small_config();
    cfg.geometry = g;
    cfg.ns.layout = k;
    cfg.capacity_bytes = 16 * cfg.chunk_bytes();
    auto e = host_engine::create(cfg).value();
    const std::size_t per_layer = g.kv_planes * blocks * bt * g.row_bytes();
    auto build = [&](raw_cache& c) -> kv_layout {
      if (k == "flash_attn_nhd") return kv_layout::flash_attn(c.ptrs, g, blocks, bt, kv_order::nhd).value();
      if (k == "flash_attn_hnd") return kv_layout::flash_attn(c.ptrs, g, blocks, bt, kv_order::hnd).value();
      if (k == "flashinfer_nhd") return kv_layout::flashinfer(c.ptrs, g, blocks, bt, kv_order::nhd).value();
      if (k == "flashinfer_hnd") return kv_layout::flashinfer(c.ptrs, g, blocks, bt, kv_order::hnd).value();
      if (k == "mla") return kv_layout::mla(c.ptrs, g, blocks, bt).value();
      if (k == "cross_layer") return kv_layout::cross_layer(c.ptrs[0], g, blocks, bt, false).value();
      if (k == "cross_layer_blocks_outermost") return kv_layout::cross_layer(c.ptrs[0], g, blocks, bt, true).value();
      return kv_layout::pages(c.ptrs, g, blocks, bt, g.kv_planes * bt * g.row_bytes()).value();
    };
    const bool one_tensor = k.starts_with("cross_layer");
    raw_cache src(one_tensor ? 1 : 2, one_tensor ? 2 * per_layer : per_layer, 7);
    raw_cache dst(one_tensor ? 1 : 2, one_tensor ? 2 * per_layer : per_layer, 8);
    const auto src_lay = build(src), dst_lay = build(dst);
    const auto toks = make_tokens(tokens, 3);
    const std::vector<std::int32_t> st{3, 9, 0, 5, 1, 7}, rt{2, 4, 6, 8, 0, 1};
    REQUIRE(e.store(toks, src_lay, st).value().wait().value() == tokens);
    REQUIRE(e.retrieve(toks, dst_lay, rt).value().wait().value() == tokens);
    CHECK(gather(src_lay, st, tokens) == gather(dst_lay, rt, tokens));
  }
}

TEST_CASE("layout factories reject what they cannot describe") {
  const kv_geometry kv{.num_layers = 2, .kv_planes = 2, .kv_heads = 2, .head_dim = 8, .element_bytes = 2};
  std::vector<std::byte> buf(1 << 16);
  std::vector<std::byte*> ptrs{buf.data(), buf.data() + (1 << 15)};
  CHECK(kv_layout::mla(ptrs, kv, 4, 16).error().message.find("kv_planes == 1") != std::string::npos);
  auto one = kv;
  one.kv_planes = 1;
  CHECK(kv_layout::flashinfer(ptrs, one, 4, 16).error().code == errc::invalid_layout);
  CHECK(kv_layout::cross_layer(nullptr, kv, 4, 16).error().message.find("null") != std::string::npos);
  CHECK(kv_layout::pages(ptrs, kv, 4, 16, 100).error().message.find("smaller than a page") != std::string::npos);
}

TEST_CASE("opaque pages carry whole blocks only") {
  auto cfg = kvt::small_config();
  cfg.store_partial_chunks = true;
  auto e = host_engine::create(cfg).value();
  raw_cache c(2, 8 * 2 * 16 * cfg.geometry.row_bytes(), 4);
  const auto lay = kv_layout::pages(c.ptrs, cfg.geometry, 8, 16, 2 * 16 * cfg.geometry.row_bytes()).value();
  const auto toks = make_tokens(72, 5);  // two chunks and a partial of 8 tokens: half a block
  CHECK(e.store(toks, lay).value().wait().value() == 64);
  const auto toks2 = make_tokens(80, 6);  // a partial of 16 tokens: one whole block
  CHECK(e.store(toks2, lay).value().wait().value() == 80);
}

TEST_CASE("a transfer reaches the scheduler in batches of transfer_batch_bytes") {
  for (std::size_t chunks_per_batch : {0, 1, 3}) {
    CAPTURE(chunks_per_batch);
    auto cfg = kvt::small_config();
    cfg.transfer_batch_bytes = chunks_per_batch * cfg.chunk_bytes();
    kvt::gated_scheduler gate;
    auto e = gated_engine::create(cfg, host_allocator{}, sha256_hasher::create().value(), lru_eviction{},
                                  cpu_backend{}, gate)
                 .value();
    const auto toks = make_tokens(32 * 5, 9);
    kvt::paged_cache src(cfg.geometry, 12, 16);
    src.fill(toks, {});
    auto t = e.store(toks, src.layout()).value();
    const std::size_t expected = chunks_per_batch == 0 ? 1 : (5 + chunks_per_batch - 1) / chunks_per_batch;
    CHECK(gate.held() == expected);
    CHECK_FALSE(t.ready());
    gate.release_all();
    CHECK(t.wait().value() == 160);
    kvt::paged_cache dst(cfg.geometry, 12, 16);
    auto r = e.retrieve(toks, dst.layout()).value();
    CHECK(gate.held() == expected);
    gate.release_all();
    CHECK(r.wait().value() == 160);
    CHECK(dst.mismatches(toks, 160, {}) == 0);
  }
}
