// Bad input gets a clear error and leaves the engine as it was.

#include <doctest/doctest.h>

#include "test_support.hpp"

#include <string>

using namespace kvortex;
using kvt::make_tokens;
using kvt::paged_cache;
using kvt::small_config;

namespace {

void check_error(const error& e, errc code, const std::string& needle) {
  CHECK(e.code == code);
  CHECK_MESSAGE(e.message.find(needle) != std::string::npos, "message was: " << e.message);
}

// What must not change when a call is rejected.
struct snapshot {
  std::uint64_t chunks, bytes, stored, evictions;
  explicit snapshot(const host_engine& e) {
    const auto s = e.stats();
    chunks = s.chunks, bytes = s.current_bytes, stored = s.stored_chunks, evictions = s.evictions;
  }
  bool operator==(const snapshot&) const = default;
};

}  // namespace

TEST_CASE("invalid configurations are rejected by create") {
  auto expect = [](engine_config c, const std::string& needle) {
    auto e = host_engine::create(c);
    REQUIRE_FALSE(e.has_value());
    check_error(e.error(), errc::invalid_config, needle);
  };
  auto c = small_config();
  c.chunk_tokens = 40;  // not a multiple of 16
  expect(c, "multiple of block_tokens");
  c = small_config();
  c.chunk_tokens = 0;
  expect(c, "chunk_tokens");
  c = small_config();
  c.block_tokens = 0;
  expect(c, "block_tokens");
  c = small_config();
  c.capacity_bytes = c.chunk_bytes() - 1;
  expect(c, "smaller than one chunk");
  c = small_config();
  c.capacity_bytes = 0;
  expect(c, "smaller than one chunk");
  c = small_config();
  c.geometry.num_layers = 0;
  expect(c, "num_layers");
  c = small_config();
  c.geometry.kv_planes = 3;
  expect(c, "kv_planes");
  c = small_config();
  c.geometry.kv_heads = 0;
  expect(c, "kv_heads");
  c = small_config();
  c.geometry.head_dim = 0;
  expect(c, "head_dim");
  c = small_config();
  c.geometry.element_bytes = 3;
  expect(c, "element_bytes");
  c = small_config();
  c.ns.tp_rank = 2;
  c.ns.tp_size = 2;
  expect(c, "tp_rank");
  c = small_config();
  c.ns.tp_size = 0;
  expect(c, "tp_rank");
  c = small_config();
  c.geometry = {.num_layers = 1u << 30, .kv_planes = 2, .kv_heads = 1u << 30, .head_dim = 1u << 30, .element_bytes = 8};
  expect(c, "too large to address");
}

TEST_CASE("empty token lists are rejected everywhere") {
  auto e = host_engine::create(small_config()).value();
  paged_cache c(e.config().geometry, 4, 16);
  const std::span<const token_id> none;
  check_error(e.lookup(none).error(), errc::invalid_argument, "empty token list");
  check_error(e.store(none, c.layout()).error(), errc::invalid_argument, "empty token list");
  check_error(e.retrieve(none, c.layout()).error(), errc::invalid_argument, "empty token list");
  check_error(e.chunk_keys(none).error(), errc::invalid_argument, "empty token list");
  check_error(e.check_blocks(std::span<const chunk_key>{}).error(), errc::invalid_argument, "empty key list");
}

TEST_CASE("inconsistent layouts are rejected by the factories") {
  const auto g = small_config().geometry;
  std::vector<std::byte> buf(1 << 16);
  std::vector<std::byte*> ptrs{buf.data(), buf.data()};
  const auto bad = [](const result<kv_layout>& r, const std::string& needle) {
    REQUIRE_FALSE(r.has_value());
    check_error(r.error(), errc::invalid_layout, needle);
  };
  bad(kv_layout::flash_attn(std::span(ptrs).first(1), g, 4, 16), "1 layer pointers for a geometry of 2");
  bad(kv_layout::flash_attn({}, g, 4, 16), "no layer pointers");
  std::vector<std::byte*> with_null{buf.data(), nullptr};
  bad(kv_layout::flash_attn(with_null, g, 4, 16), "layer pointer 1 is null");
  bad(kv_layout::flash_attn(ptrs, g, 0, 16), "num_blocks");
  bad(kv_layout::flash_attn(ptrs, g, 4, 0), "block_tokens");
  auto mla = g;
  mla.kv_planes = 1;
  bad(kv_layout::flash_attn(ptrs, mla, 4, 16), "kv_planes == 2");
  // Token stride smaller than a row: tokens overlap.
  bad(kv_layout::strided(ptrs, g, 4, 16, 8192, 1024, 16, 16, 1 << 16), "overlap");
  // Every stride fine, but the tensor is too small for the last element.
  bad(kv_layout::strided(ptrs, g, 4, 16, 2048, 512, 32, 16, 4000), "ends at byte");
  bad(kv_layout::strided(ptrs, g, 4, 16, -1, 512, 32, 16, 1 << 16), "negative stride");
  // The same strides with room for them pass.
  CHECK(kv_layout::strided(ptrs, g, 4, 16, 2048, 512, 32, 16, 4096).has_value());
}

TEST_CASE("store and retrieve reject a layout or block table that does not fit, and change nothing") {
  auto e = host_engine::create(small_config()).value();
  const auto toks = make_tokens(64, 1);
  {
    paged_cache warm(e.config().geometry, 4, 16);
    warm.fill(toks, {});
    REQUIRE(e.store(toks, warm.layout()).value().wait().value() == 64);
  }
  const snapshot before(e);
  const auto other = make_tokens(64, 2);

  auto g = e.config().geometry;
  g.head_dim = 16;  // the engine's is 8
  paged_cache wrong_geo(g, 4, 16);
  check_error(e.store(other, wrong_geo.layout()).error(), errc::size_mismatch, "differs from the engine's");
  check_error(e.retrieve(toks, wrong_geo.layout()).error(), errc::size_mismatch, "differs from the engine's");

  paged_cache small(e.config().geometry, 3, 16);  // 64 tokens need 4 blocks
  check_error(e.store(other, small.layout()).error(), errc::size_mismatch, "need 4 blocks");
  check_error(e.retrieve(toks, small.layout()).error(), errc::size_mismatch, "need 4 blocks");

  paged_cache c(e.config().geometry, 8, 16);
  const std::vector<std::int32_t> short_table{0, 1, 2};
  check_error(e.store(other, c.layout(), short_table).error(), errc::size_mismatch, "block table entries");
  const std::vector<std::int32_t> out_of_range{0, 1, 8, 2};
  check_error(e.store(other, c.layout(), out_of_range).error(), errc::invalid_argument, "block_table[2] = 8");
  // -1 is kv_layout::skip_block, which only a retrieve accepts; other negatives never.
  const std::vector<std::int32_t> skip{0, kv_layout::skip_block, 2, 3};
  check_error(e.store(other, c.layout(), skip).error(), errc::invalid_argument, "block_table[1] = -1");
  const std::vector<std::int32_t> negative{0, -2, 2, 3};
  check_error(e.retrieve(toks, c.layout(), negative).error(), errc::invalid_argument, "block_table[1] = -2");

  auto dev = c.layout();
  dev.on_device();
  check_error(e.store(other, dev).error(), errc::unsupported, "device memory");

  CHECK(snapshot(e) == before);
  CHECK(e.lookup(other).value() == 0);
  CHECK(e.lookup(toks).value() == 64);
}

TEST_CASE("the key API rejects null pointers and size mismatches, and changes nothing") {
  auto e = host_engine::create(small_config()).value();
  std::vector<chunk_key> keys(2);
  keys[1].bytes[0] = std::byte{1};
  std::vector<std::byte> a(64), b(64);
  std::vector<const std::byte*> src{a.data(), b.data()};
  std::vector<std::size_t> sizes{64, 64};
  REQUIRE(e.save_blocks(keys, src, sizes).value() == 2);
  const snapshot before(e);

  std::vector<chunk_key> fresh(2);
  fresh[0].bytes[0] = std::byte{7};
  fresh[1].bytes[0] = std::byte{8};
  std::vector<const std::byte*> with_null{a.data(), nullptr};
  check_error(e.save_blocks(fresh, with_null, sizes).error(), errc::invalid_argument, "pointer 1 is null");
  check_error(e.save_blocks(fresh, std::span(src).first(1), sizes).error(), errc::size_mismatch,
              "2 keys, 1 pointers and 2 sizes");
  check_error(e.save_blocks(fresh, src, std::span(sizes).first(1)).error(), errc::size_mismatch, "1 sizes");
  std::vector<std::size_t> zero{64, 0};
  check_error(e.save_blocks(fresh, src, zero).error(), errc::invalid_argument, "size 1 is zero");
  std::vector<std::size_t> huge{64, e.config().capacity_bytes + 1};
  check_error(e.save_blocks(fresh, src, huge).error(), errc::size_mismatch, "exceeds the capacity");
  check_error(e.save_blocks({}, {}, {}).error(), errc::invalid_argument, "empty key list");

  std::vector<std::byte> out(128);
  std::vector<std::byte*> dst{out.data(), out.data() + 64};
  std::vector<std::size_t> wrong{64, 63};
  check_error(e.load_blocks(keys, dst, wrong).error(), errc::size_mismatch, "holds 64 bytes, destination has 63");
  std::vector<std::byte*> same{out.data(), out.data()};
  check_error(e.load_blocks(keys, same, sizes).error(), errc::invalid_argument, "destination 1 overlaps destination 0");
  std::vector<std::byte*> straddle{out.data() + 63, out.data()};
  check_error(e.load_blocks(keys, straddle, sizes).error(), errc::invalid_argument, "destination 0 overlaps destination 1");
  std::vector<std::byte*> dst_null{out.data(), nullptr};
  check_error(e.load_blocks(keys, dst_null, sizes).error(), errc::invalid_argument, "pointer 1 is null");

  CHECK(snapshot(e) == before);
  CHECK(e.check_blocks(fresh).value().none());
  CHECK(e.check_blocks(keys).value().all());
}

TEST_CASE("error values render code and message") {
  const error e{errc::size_mismatch, "3 keys, 2 sizes"};
  CHECK(e.what() == "size_mismatch: 3 keys, 2 sizes");
  CHECK(to_string(errc::shut_down) == "shut_down");
  CHECK(to_string(errc::capacity_exhausted) == "capacity_exhausted");
}
