// Layout descriptors: copies generated for every layout match a naive element-by-element walk.

#include <doctest/doctest.h>

#include "test_support.hpp"

#include <numeric>

using namespace kvortex;

namespace {

// Applies the copies, then checks every chunk byte against the element it must come from.
void check_gather(const kv_layout& lay, std::span<const std::int32_t> table, std::size_t first, std::size_t count,
                  const std::function<const std::byte*(std::size_t l, std::size_t p, std::size_t block,
                                                       std::size_t slot, std::size_t h)>& element) {
  const auto& g = lay.geometry();
  std::vector<std::byte> chunk(count * g.token_bytes(), std::byte{0xEE});
  std::vector<copy_op> ops;
  lay.append_copies(ops, table, first, count, chunk.data(), true);
  for (const auto& op : ops) copy_host(op);
  const std::size_t hb = std::size_t{g.head_dim} * g.element_bytes;
  std::size_t bad = 0, at = 0;
  for (std::size_t l = 0; l < g.num_layers; ++l)
    for (std::size_t p = 0; p < g.kv_planes; ++p)
      for (std::size_t t = first; t < first + count; ++t) {
        const std::size_t logical = t / lay.block_tokens();
        const std::size_t block = table.empty() ? logical : static_cast<std::size_t>(table[logical]);
        for (std::size_t h = 0; h < g.kv_heads; ++h, at += hb)
          bad += std::memcmp(chunk.data() + at, element(l, p, block, t % lay.block_tokens(), h), hb) != 0;
      }
  CHECK(at == chunk.size());
  CHECK(bad == 0);

  // Scatter back into a zeroed copy of the same shape must reproduce the chunk's sources.
  std::vector<copy_op> back;
  lay.append_copies(back, table, first, count, chunk.data(), false);
  std::size_t bytes = 0;
  for (const auto& op : back) bytes += total_bytes(op);
  CHECK(bytes == chunk.size());
}

std::vector<std::byte> iota_bytes(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

}  // namespace

TEST_CASE("flash_attn NHD and HND gather the right elements for any block table") {
  kv_geometry g{.num_layers = 3, .kv_planes = 2, .kv_heads = 4, .head_dim = 8, .element_bytes = 2};
  const std::size_t blocks = 12, bt = 16, hb = 16;
  for (auto order : {kv_order::nhd, kv_order::hnd}) {
    std::vector<std::vector<std::byte>> t;
    std::vector<std::byte*> ptrs;
    for (unsigned l = 0; l < 3; ++l) t.push_back(iota_bytes(2 * blocks * bt * g.row_bytes(), l));
    for (auto& x : t) ptrs.push_back(x.data());
    const auto lay = kv_layout::flash_attn(ptrs, g, blocks, bt, order).value();
    const auto table = kvt::random_table(6, blocks, 9);
    auto element = [&](std::size_t l, std::size_t p, std::size_t b, std::size_t s, std::size_t h) {
      const std::size_t blk = bt * g.row_bytes();
      std::size_t off = p * blocks * blk + b * blk;
      off += order == kv_order::nhd ? s * g.row_bytes() + h * hb : h * bt * hb + s * hb;
      return t[l].data() + off;
    };
    for (auto [first, count] : {std::pair<std::size_t, std::size_t>{0, 32}, {32, 64}, {5, 50}, {0, 96}, {15, 2}, {47, 1}})
      check_gather(lay, table, first, count, element);
  }
}

TEST_CASE("contiguous layout merges into one copy per layer and plane") {
  kv_geometry g{.num_layers = 2, .kv_planes = 2, .kv_heads = 2, .head_dim = 8, .element_bytes = 2};
  std::vector<std::vector<std::byte>> t{iota_bytes(2 * 128 * 32, 1), iota_bytes(2 * 128 * 32, 2)};
  std::vector<std::byte*> ptrs{t[0].data(), t[1].data()};
  const auto lay = kv_layout::contiguous(ptrs, g, 128).value();
  std::vector<std::byte> chunk(64 * g.token_bytes());
  std::vector<copy_op> ops;
  lay.append_copies(ops, {}, 32, 64, chunk.data(), true);
  CHECK(ops.size() == 4);
  for (const auto& op : ops) CHECK(op.bytes == 64 * g.row_bytes());
  check_gather(lay, {}, 32, 64, [&](std::size_t l, std::size_t p, std::size_t, std::size_t s, std::size_t h) {
    return t[l].data() + p * 128 * 32 + s * 32 + h * 16;
  });
}

TEST_CASE("paged copies merge physically adjacent blocks") {
  kv_geometry g{.num_layers = 1, .kv_planes = 2, .kv_heads = 1, .head_dim = 4, .element_bytes = 4};
  std::vector<std::byte> t(2 * 8 * 16 * 16);
  std::byte* ptr = t.data();
  const auto lay = kv_layout::flash_attn(std::span(&ptr, 1), g, 8, 16).value();
  std::vector<std::byte> chunk(64 * g.token_bytes());
  const std::vector<std::int32_t> adjacent{2, 3, 4, 5}, scattered{5, 1, 7, 0};
  std::vector<copy_op> ops;
  lay.append_copies(ops, adjacent, 0, 64, chunk.data(), true);
  CHECK(ops.size() == 2);  // one per plane
  ops.clear();
  lay.append_copies(ops, scattered, 0, 64, chunk.data(), true);
  CHECK(ops.size() == 8);  // one per block and plane
}

TEST_CASE("an MLA cache (one plane) via strided descriptor") {
  // [num_blocks, block_tokens, 576] fp8-sized elements: one plane, one head of 576 bytes.
  kv_geometry g{.num_layers = 2, .kv_planes = 1, .kv_heads = 1, .head_dim = 576, .element_bytes = 1};
  const std::size_t blocks = 6, bt = 16, tok = 576;
  std::vector<std::vector<std::byte>> t{iota_bytes(blocks * bt * tok, 3), iota_bytes(blocks * bt * tok, 4)};
  std::vector<std::byte*> ptrs{t[0].data(), t[1].data()};
  const auto lay = kv_layout::strided(ptrs, g, blocks, bt, 0, static_cast<std::int64_t>(bt * tok),
                                      static_cast<std::int64_t>(tok), static_cast<std::int64_t>(tok), blocks * bt * tok)
                       .value();
  const std::vector<std::int32_t> table{4, 0, 5};
  check_gather(lay, table, 0, 48, [&](std::size_t l, std::size_t, std::size_t b, std::size_t s, std::size_t) {
    return t[l].data() + (b * bt + s) * tok;
  });
}

TEST_CASE("check_table accepts exactly the tables that address the tokens") {
  kv_geometry g{.num_layers = 1, .kv_planes = 2, .kv_heads = 1, .head_dim = 8, .element_bytes = 2};
  std::vector<std::byte> t(2 * 4 * 16 * 16);
  std::byte* ptr = t.data();
  const auto lay = kv_layout::flash_attn(std::span(&ptr, 1), g, 4, 16).value();
  CHECK(lay.check_table({}, 64).has_value());
  CHECK_FALSE(lay.check_table({}, 65).has_value());
  const std::vector<std::int32_t> two{3, 1};
  CHECK(lay.check_table(two, 32).has_value());
  CHECK(lay.check_table(two, 17).has_value());
  CHECK_FALSE(lay.check_table(two, 33).has_value());
  CHECK(lay.kind() == "flash_attn_nhd");
  CHECK(lay.location() == memory_location::host);
}

TEST_CASE("HND gives one 2D op per layer, plane, block and head, NHD stays 1D") {
  kv_geometry g{.num_layers = 3, .kv_planes = 2, .kv_heads = 4, .head_dim = 8, .element_bytes = 2};
  const std::size_t blocks = 12, bt = 16, hb = 16, row = 64;
  std::vector<std::vector<std::byte>> t;
  std::vector<std::byte*> ptrs;
  for (unsigned l = 0; l < 3; ++l) t.push_back(iota_bytes(2 * blocks * bt * row, 20 + l));
  for (auto& x : t) ptrs.push_back(x.data());
  const auto table = kvt::random_table(6, blocks, 9);
  std::vector<std::byte> chunk(96 * g.token_bytes());

  const auto hnd = kv_layout::flash_attn(ptrs, g, blocks, bt, kv_order::hnd).value();
  for (bool to_chunk : {true, false}) {
    std::vector<copy_op> ops;
    hnd.append_copies(ops, table, 0, 96, chunk.data(), to_chunk);
    CHECK(ops.size() == 3 * 2 * 6 * 4);  // was one per token and head: 3 * 2 * 96 * 4
    std::size_t bytes = 0;
    for (const auto& op : ops) {
      CHECK(op.rows == bt);
      CHECK(op.bytes == hb);
      CHECK((to_chunk ? op.src_pitch : op.dst_pitch) == hb);   // a head's tokens, back to back
      CHECK((to_chunk ? op.dst_pitch : op.src_pitch) == row);  // chunk rows
      bytes += total_bytes(op);
    }
    CHECK(bytes == chunk.size());
  }
  // A block split by the range: its part is still one op per head, with fewer rows.
  std::vector<copy_op> part;
  hnd.append_copies(part, table, 5, 50, chunk.data(), true);
  CHECK(part.size() == 3 * 2 * 4 * 4);
  CHECK(part.front().rows == 11);
  CHECK(part.back().rows == 7);

  for (auto [first, count] : {std::pair<std::size_t, std::size_t>{0, 96}, {5, 50}, {15, 2}, {47, 1}, {3, 90}}) {
    std::vector<copy_op> v;
    hnd.append_copies(v, table, first, count, chunk.data(), true, 1, 2);
    CHECK(v.size() <= hnd.max_copies(count, 1, 2));
    CHECK(hnd.max_copies(count, 1, 2) <= 2 * 2 * (count / bt + 2) * 4);
  }

  const auto nhd = kv_layout::flash_attn(ptrs, g, blocks, bt, kv_order::nhd).value();
  std::vector<copy_op> flat;
  nhd.append_copies(flat, table, 0, 96, chunk.data(), true);
  CHECK(flat.size() <= 3 * 2 * 6);
  for (const auto& op : flat) CHECK(op.rows == 1);
}

TEST_CASE("HND retrieve scatters exactly what the store gathered and nothing else") {
  kv_geometry g{.num_layers = 2, .kv_planes = 2, .kv_heads = 3, .head_dim = 5, .element_bytes = 2};
  const std::size_t blocks = 10, bt = 16, bytes = 2 * blocks * bt * g.row_bytes();
  for (auto order : {kv_order::nhd, kv_order::hnd}) {
    std::vector<std::vector<std::byte>> src{iota_bytes(bytes, 31), iota_bytes(bytes, 32)};
    std::vector<std::vector<std::byte>> dst(2, std::vector<std::byte>(bytes, std::byte{0xEE}));
    std::vector<std::byte*> sp{src[0].data(), src[1].data()}, dp{dst[0].data(), dst[1].data()};
    const auto a = kv_layout::flash_attn(sp, g, blocks, bt, order).value();
    const auto b = kv_layout::flash_attn(dp, g, blocks, bt, order).value();
    const auto ta = kvt::random_table(5, blocks, 1), tb = kvt::random_table(5, blocks, 2);
    for (auto [first, count] : {std::pair<std::size_t, std::size_t>{0, 80}, {3, 60}, {16, 17}}) {
      std::vector<std::byte> chunk(count * g.token_bytes()), again(chunk.size());
      std::vector<copy_op> ops;
      a.append_copies(ops, ta, first, count, chunk.data(), true);
      for (const auto& op : ops) copy_host(op);
      ops.clear();
      b.append_copies(ops, tb, first, count, chunk.data(), false);
      for (const auto& op : ops) copy_host(op);
      ops.clear();
      b.append_copies(ops, tb, first, count, again.data(), true);
      for (const auto& op : ops) copy_host(op);
      CHECK(again == chunk);
    }
    // Only the tokens in [0, 80) of the five destination blocks were written.
    std::size_t touched = 0;
    for (const auto& d : dst)
      for (auto x : d) touched += x != std::byte{0xEE};
    CHECK(touched <= 80 * g.token_bytes());
    CHECK(touched > 70 * g.token_bytes());
  }
}

TEST_CASE("rows contiguous but padded: one 2D op of whole rows per block") {
  kv_geometry g{.num_layers = 1, .kv_planes = 2, .kv_heads = 2, .head_dim = 4, .element_bytes = 2};
  const std::size_t blocks = 4, bt = 8, row = 16, tok = 24;  // 8 padding bytes after each token
  auto t = iota_bytes(2 * blocks * bt * tok, 5);
  std::byte* ptr = t.data();
  const auto lay = kv_layout::strided(std::span(&ptr, 1), g, blocks, bt, static_cast<std::int64_t>(blocks * bt * tok),
                                      static_cast<std::int64_t>(bt * tok), static_cast<std::int64_t>(tok), 8,
                                      2 * blocks * bt * tok)
                       .value();
  const std::vector<std::int32_t> table{3, 0, 2};
  std::vector<std::byte> chunk(24 * g.token_bytes());
  std::vector<copy_op> ops;
  lay.append_copies(ops, table, 0, 24, chunk.data(), true);
  CHECK(ops.size() == 2 * 3);
  for (const auto& op : ops) {
    CHECK(op.rows == bt);
    CHECK(op.bytes == row);
    CHECK(op.src_pitch == tok);
    CHECK(op.dst_pitch == row);
  }
  check_gather(lay, table, 0, 24, [&](std::size_t, std::size_t p, std::size_t b, std::size_t s, std::size_t h) {
    return t.data() + p * blocks * bt * tok + b * bt * tok + s * tok + h * 8;
  });
  check_gather(lay, table, 3, 19, [&](std::size_t, std::size_t p, std::size_t b, std::size_t s, std::size_t h) {
    return t.data() + p * blocks * bt * tok + b * bt * tok + s * tok + h * 8;
  });
}

TEST_CASE("strided validation: random descriptors are rejected or stay in bounds without overlap") {
  // A property test over the validator: whatever strides and extents come in, an accepted layout
  // only produces copies inside each layer tensor, and never touches one byte twice.
  std::mt19937_64 rng(2026);
  const auto pick = [&](std::int64_t hi) { return static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(hi)); };
  std::size_t accepted = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    kv_geometry g{.num_layers = 1 + static_cast<std::uint32_t>(rng() % 2), .kv_planes = 1 + static_cast<std::uint32_t>(rng() % 2),
                  .kv_heads = 1 + static_cast<std::uint32_t>(rng() % 3), .head_dim = 1 + static_cast<std::uint32_t>(rng() % 8),
                  .element_bytes = 1u << (rng() % 3)};
    const std::size_t blocks = 1 + rng() % 6, bt = 1 + rng() % 8;
    const std::int64_t hb = g.head_dim * g.element_bytes;
    const bool huge = rng() % 8 == 0;  // strides near the int64 limit must fail cleanly
    const auto stride = [&] { return huge ? pick(std::numeric_limits<std::int64_t>::max()) : pick(4 * hb * 24 * 8); };
    const std::int64_t ps = stride(), bs = stride(), ts = stride(), hs = stride();
    const std::size_t layer_bytes = huge ? rng() : 1 + rng() % 20000;
    std::vector<std::vector<std::byte>> t;
    std::vector<std::byte*> ptrs;
    const std::size_t alloc = std::min<std::size_t>(layer_bytes, 20000);
    for (std::uint32_t l = 0; l < g.num_layers; ++l) {
      t.emplace_back(alloc);
      ptrs.push_back(t.back().data());
    }
    const auto lay = kv_layout::strided(ptrs, g, blocks, bt, ps, bs, ts, hs, layer_bytes);
    if (!lay) {
      CHECK(lay.error().code == errc::invalid_layout);
      continue;
    }
    if (layer_bytes > alloc) continue;  // a valid declaration of a tensor bigger than we allocated
    ++accepted;
    const std::size_t tokens = blocks * bt;
    const auto table = kvt::random_table(blocks, blocks, static_cast<std::uint32_t>(rng()));
    std::vector<std::byte> chunk(tokens * g.token_bytes());
    std::vector<copy_op> ops;
    lay->append_copies(ops, table, 0, tokens, chunk.data(), true);
    std::vector<std::vector<int>> seen(g.num_layers, std::vector<int>(layer_bytes, 0));
    std::size_t total = 0;
    bool in_bounds = true;
    for (const auto& op : ops) {
      for (std::size_t r = 0; r < op.rows; ++r) {
        const std::byte* src = op.src + r * op.src_pitch;
        bool found = false;
        for (std::uint32_t l = 0; l < g.num_layers && !found; ++l) {
          if (src >= ptrs[l] && src + op.bytes <= ptrs[l] + layer_bytes) {
            found = true;
            for (std::size_t i = 0; i < op.bytes; ++i) ++seen[l][static_cast<std::size_t>(src - ptrs[l]) + i];
          }
        }
        in_bounds = in_bounds && found;
        total += op.bytes;
      }
    }
    CHECK(in_bounds);
    CHECK(total == chunk.size());
    int most = 0;
    for (const auto& v : seen)
      for (int c : v) most = std::max(most, c);
    CHECK(most <= 1);
  }
  CHECK(accepted > 100);  // the generator must exercise the accepting side too
}

TEST_CASE("split_kv gathers K and V from separate tensors anywhere in memory, NHD and HND") {
  kv_geometry g{.num_layers = 3, .kv_planes = 2, .kv_heads = 4, .head_dim = 8, .element_bytes = 2};
  const std::size_t blocks = 10, bt = 8, hb = 16;
  for (auto order : {kv_order::nhd, kv_order::hnd}) {
    // Six tensors allocated one by one, in an order unrelated to layer and plane.
    std::vector<std::vector<std::byte>> t;
    for (unsigned i = 0; i < 6; ++i) t.push_back(iota_bytes(blocks * bt * g.row_bytes(), 40 + i));
    std::vector<std::byte*> keys{t[4].data(), t[0].data(), t[2].data()};
    std::vector<std::byte*> values{t[1].data(), t[5].data(), t[3].data()};
    const auto lay = kv_layout::split_kv(keys, values, g, blocks, bt, order).value();
    CHECK(lay.kind() == "split_kv");
    CHECK(lay.layers_disjoint());
    CHECK(lay.layers()[1] == keys[1]);
    const std::vector<std::int32_t> table{7, 2, 9, 0};
    check_gather(lay, table, 3, 27, [&](std::size_t l, std::size_t p, std::size_t block, std::size_t slot, std::size_t h) {
      const std::byte* base = p == 0 ? keys[l] : values[l];
      const std::size_t at = order == kv_order::nhd ? (block * bt + slot) * g.row_bytes() + h * hb
                                                    : ((block * g.kv_heads + h) * bt + slot) * hb;
      return base + at;
    });
  }
}

TEST_CASE("split_kv refuses wrong counts, null tensors and one plane, and names overlapping tensors") {
  kv_geometry g{.num_layers = 2, .kv_planes = 2, .kv_heads = 2, .head_dim = 4, .element_bytes = 2};
  const std::size_t blocks = 4, bt = 4, extent = blocks * bt * g.row_bytes();
  std::vector<std::byte> mem(6 * extent);
  std::vector<std::byte*> k{mem.data(), mem.data() + 2 * extent}, v{mem.data() + extent, mem.data() + 3 * extent};
  CHECK(kv_layout::split_kv(k, v, g, blocks, bt).has_value());

  std::vector<std::byte*> one{mem.data()};
  auto r = kv_layout::split_kv(one, v, g, blocks, bt);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::invalid_layout);
  CHECK(r.error().message.find("1 key tensors and 2 value tensors") != std::string::npos);

  r = kv_layout::split_kv(std::span<std::byte* const>(k.data(), 1), std::span<std::byte* const>(v.data(), 1), g, blocks, bt);
  REQUIRE_FALSE(r);
  CHECK(r.error().message.find("1 layer tensors for a geometry of 2 layers") != std::string::npos);

  std::vector<std::byte*> with_null{mem.data(), nullptr};
  r = kv_layout::split_kv(k, with_null, g, blocks, bt);
  REQUIRE_FALSE(r);
  CHECK(r.error().message.find("values[1] is null") != std::string::npos);

  kv_geometry mla = g;
  mla.kv_planes = 1;
  r = kv_layout::split_kv(k, v, mla, blocks, bt);
  REQUIRE_FALSE(r);
  CHECK(r.error().message.find("kv_planes == 2") != std::string::npos);

  // values[1] starts half-way into keys[1]: readable, never a destination.
  std::vector<std::byte*> v2{mem.data() + extent, mem.data() + 2 * extent + extent / 2};
  const auto overlapping = kv_layout::split_kv(k, v2, g, blocks, bt).value();
  CHECK_FALSE(overlapping.layers_disjoint());
  const auto dest = overlapping.check_destination();
  REQUIRE_FALSE(dest);
  CHECK(dest.error().message.find("keys[1] and values[1] overlap") != std::string::npos);
}
