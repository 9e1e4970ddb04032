// Fuzz target: kv_layout descriptors from every factory, with arbitrary geometry, block counts,
// strides and extents. Whatever a factory accepts must be internally consistent:
// - check_table accepts exactly the tables that address the tokens;
// - append_copies produces at most max_copies ops, every byte of every op lies inside the layer
//   tensors' stated extents (an op may run on from one layer into the next where their memory is
//   contiguous), and together the ops copy each chunk byte exactly once, from or to the address
//   the factory's documented shape gives (computed independently in fuzz_support.hpp);
// - check_table with `distinct` also refuses a block named twice among the entries used;
// - layers_disjoint() (and check_destination) never call layers disjoint that share a byte,
//   counted element by element, and call separate tensors and one cross-layer tensor disjoint;
// - a retrieve-direction batch over distinct blocks of disjoint layers writes no byte twice;
// - performing the ops with copy_host on real buffers of exactly the stated extents (ASan
//   catches any byte outside them) moves the right bytes, and touches nothing else.
// Factories without caller-chosen strides must accept every shape their docs allow.
// split_kv (K and V in 2L separate tensors, modelled here: fuzz_support.hpp knows one pointer per
// layer) also gets key and value pointers anywhere: apart, adjacent, overlapping by a byte or more,
// equal, in any order, fake (never dereferenced) where too big to allocate, wrong counts and a null
// one; it must refuse exactly what its docs refuse, and layers_disjoint() must be false exactly when
// two of the tensors share a byte, with check_destination naming two that do.

#include "fuzz_support.hpp"

#include <algorithm>
#include <memory>

namespace {

using kvfuzz::layout_kind;
using kvfuzz::layout_shape;
using kvortex::kv_order;

constexpr std::uint64_t max_region = 64 << 10;  // bytes of one real layer tensor
constexpr std::uint64_t max_arena = 256 << 10;  // bytes of all real layer tensors
constexpr std::uint64_t max_chunk = 16 << 10;   // bytes of one chunk buffer
constexpr std::size_t max_table = 4096;

std::uint32_t u32_of(std::uint64_t v) { return static_cast<std::uint32_t>(v); }

// The kind byte: below split_kv_byte, the factories fuzz_support.hpp models (byte % layout_kinds,
// as before split_kv, so the inputs kept since decode as they did: none starts at 248 or more);
// 248 and up, split_kv, NHD on even bytes and HND on odd ones. split_kv's kind is stored as
// layout_kinds, a value past every enumerator, which no `kind ==` test matches.
constexpr std::uint8_t split_kv_byte = 248;

// layout_shape, with split_kv's documented shape: 2L tensors [k0, v0, k1, v1, ...] (region 2l + p),
// each `[num_blocks * block_tokens][kv_heads][head_dim]` (NHD) or
// `[num_blocks][kv_heads][block_tokens][head_dim]` (HND). Every member that depends on the kind
// is redefined here, so that nothing below reaches layout_shape's own for a split_kv shape.
struct shape : layout_shape {
  bool split{false};
  kv_order order{kv_order::nhd};

  [[nodiscard]] std::optional<std::uint64_t> extent() const {
    if (!split) return layout_shape::extent();
    return kvfuzz::mul({num_blocks, block_tokens, g.kv_heads, g.head_dim, g.element_bytes});
  }

  // Offset of element (l, p, b, s, h) from the pointer of its region (see region()).
  [[nodiscard]] std::uint64_t offset(std::uint64_t l, std::uint64_t p, std::uint64_t b, std::uint64_t s,
                                     std::uint64_t h) const noexcept {
    if (!split) return layout_shape::offset(l, p, b, s, h);
    const std::uint64_t heads = g.kv_heads, bt = block_tokens, hb = head_bytes();
    if (order == kv_order::nhd) return ((b * bt + s) * heads + h) * hb;  // token b * bt + s, then head h
    return ((b * heads + h) * bt + s) * hb;                                // block b, head h, slot s
  }

  // Which of the caller's tensors holds layer l's plane p.
  [[nodiscard]] std::size_t region(std::size_t l, std::size_t p) const noexcept {
    return split ? 2 * l + p : one_tensor() ? 0 : l;
  }

  [[nodiscard]] bool documented_valid() const noexcept {
    if (!split) return layout_shape::documented_valid();
    return g.num_layers > 0 && g.kv_planes == 2 && g.kv_heads > 0 && g.head_dim > 0 && g.element_bytes > 0 &&
           num_blocks > 0 && block_tokens > 0;
  }

  [[nodiscard]] kvortex::result<kvortex::kv_layout> build(std::span<std::byte* const> ptrs,
                                                          std::span<std::byte* const> values) const {
    if (!split) return layout_shape::build(ptrs);
    return kvortex::kv_layout::split_kv(ptrs, values, g, num_blocks, block_tokens, order);
  }
};

shape read_shape(kvfuzz::reader& in) {
  shape s;
  const std::uint8_t kind = in.u8();
  s.split = kind >= split_kv_byte;
  s.kind = static_cast<layout_kind>(s.split ? kvfuzz::layout_kinds : kind % kvfuzz::layout_kinds);
  s.order = s.split && kind % 2 == 1 ? kv_order::hnd : kv_order::nhd;
  s.g.num_layers = u32_of(in.size_value(4));
  // Mostly 1 or 2 planes (split_kv: 2), sometimes 0 or 3.
  const std::uint8_t planes = in.u8();
  s.g.kv_planes = planes < 224 ? (s.split ? 2 : 1 + planes % 2) : planes % 4;
  s.g.kv_heads = u32_of(in.size_value(4));
  s.g.head_dim = u32_of(in.size_value(16));
  s.g.element_bytes = u32_of(in.size_value(4));
  if (s.kind == layout_kind::mla && in.u8() < 200) {  // reach the accepting side of mla often
    s.g.kv_planes = 1;
    s.g.kv_heads = 1;
  }
  s.num_blocks = in.size_value(12);
  s.block_tokens = in.size_value(s.kind == layout_kind::contiguous ? 64 : 16);
  const std::uint64_t hb = std::uint64_t{s.g.head_dim} * s.g.element_bytes;
  const std::uint64_t row = s.g.row_bytes();
  if (s.kind == layout_kind::pages) s.page_stride = std::uint64_t{s.g.kv_planes} * s.block_tokens * row + in.size_value(64) - 16;
  if (s.kind == layout_kind::strided) {
    // Strides near the packed ones (multiples of the inner spans, plus some slack), or wild.
    const auto stride = [&](std::uint64_t unit) -> std::int64_t {
      const std::uint8_t m = in.u8();
      if (m >= 240) return static_cast<std::int64_t>(in.u64());
      return static_cast<std::int64_t>(unit * (m % 9) + in.below(8));
    };
    s.head_stride = stride(hb);
    s.token_stride = stride(row == 0 ? 1 : row);
    s.block_stride = stride(row * std::max<std::uint64_t>(s.block_tokens, 1));
    s.plane_stride = stride(row * std::max<std::uint64_t>(s.block_tokens, 1) * std::max<std::uint64_t>(s.num_blocks, 1));
    const std::uint64_t packed = row * s.g.kv_planes * s.block_tokens * s.num_blocks;
    s.layer_bytes = in.u8() < 240 ? packed + in.below(4 * packed + 64) : in.u64();
  }
  return s;
}

// The tensors handed to a factory: real heap blocks of exactly the stated extent when small
// enough, else non-null stand-ins that are never dereferenced.
struct tensors {
  std::vector<std::unique_ptr<std::byte[]>> owned;
  std::vector<std::uint64_t> owned_bytes;
  std::vector<std::byte*> ptrs;     // what the factory gets (split_kv: the keys)
  std::vector<std::byte*> values;   // split_kv: the values
  std::vector<std::uint64_t> base;  // address of each region (see shape::region)
  std::uint64_t extent{0};          // bytes of each region
  bool real{false};                 // ptrs point at real memory of `extent` bytes per region
  bool disjoint{true};              // regions do not overlap
  std::vector<std::pair<std::size_t, std::size_t>> overlapping;  // split_kv: regions sharing a byte
};

alignas(64) std::byte stand_in[64];

// "keys[l]" or "values[l]" for split_kv's region i, as check_destination names the tensors.
std::string split_name(std::size_t i) { return (i % 2 == 0 ? "keys[" : "values[") + std::to_string(i / 2) + "]"; }

// split_kv's tensors, placed by the input at byte offsets `at` (slots [k0, v0, k1, v1, ...]):
// apart, packed in any order with gaps of -e..e bytes (adjacent, one byte shared, partly or wholly
// overlapping), anywhere in an arena, values equal to keys, or all at one address. Real memory
// when small enough (apart: one heap block each, so ASan sees exactly the extents); else fake
// addresses past stand_in, never dereferenced, while the offsets stay far below wrapping; else
// every pointer is stand_in.
tensors make_split_tensors(kvfuzz::reader& in, const shape& s) {
  tensors t;
  const std::size_t layers = s.g.num_layers;
  std::size_t nk = layers, nv = layers;
  // Mostly one key and one value tensor per layer; sometimes a count one off, or a null one.
  const std::uint8_t counts = in.u8();
  if (counts >= 224 && counts < 232 && nk > 0) --nk;
  if (counts >= 232 && counts < 240 && nv > 0) --nv;
  if (counts >= 240 && counts < 244) ++nk;
  if (counts >= 244 && counts < 248) ++nv;
  if (counts >= 248 && counts < 252 && (counts % 2 == 1 || layers > 0)) {
    nk = counts % 2 == 1 ? nk + 1 : nk - 1;
    nv = nk;
  }
  const bool null_one = counts >= 252;
  const std::uint8_t placement = in.u8();
  if (layers > 64) {  // a huge layer count: never as many pointers, so the factory must refuse
    t.ptrs.assign(std::min<std::size_t>(nk, 64), stand_in);
    t.values.assign(std::min<std::size_t>(nv, 64), stand_in);
    return t;
  }
  const std::size_t n = 2 * std::max(nk, nv);
  const auto ext = s.extent();
  t.extent = ext.value_or(0);
  const std::uint64_t e = t.extent;
  std::vector<std::uint64_t> at(n, 0);
  const bool placed = e > 0 && n > 0 && e <= (std::uint64_t{1} << 44) / (2 * n + 2);
  if (placed) {
    if (placement < 128) {
      for (std::size_t i = 0; i < n; ++i) at[i] = i * e;
    } else if (placement < 192) {
      std::vector<std::size_t> order(n);
      for (std::size_t i = 0; i < n; ++i) order[i] = i;
      for (std::size_t i = n; i-- > 1;) std::swap(order[i], order[in.below(i + 1)]);
      std::uint64_t cursor = 0;  // each step is 0..2e bytes: never below zero
      for (const auto slot : order) {
        at[slot] = cursor;
        const std::uint8_t gap = in.u8();
        if (gap < 96) cursor += e;                                               // adjacent
        else if (gap < 128) cursor += e - 1;                                     // the last byte shared
        else if (gap < 160) cursor += e + 1 + in.below(std::min<std::uint64_t>(e, 64));  // a few bytes apart
        else if (gap < 192) cursor += e - in.below(e);                           // partly overlapping
        else if (gap < 224) cursor += 0;                                         // equal
        else cursor += e + in.below(e + 1);                                      // up to a tensor apart
      }
    } else if (placement < 224) {
      for (auto& a : at) a = in.below(n * e + 1);
    } else if (placement < 240) {
      for (std::size_t i = 0; i < n; ++i) at[i] = (i / 2) * e;  // values[l] == keys[l]
    }  // else all at offset 0
  }
  const std::uint64_t arena = placed ? *std::max_element(at.begin(), at.end()) + e : 0;
  const bool apart_blocks = placement < 128;
  t.real = placed && e <= max_region && (apart_blocks ? n * e : arena) <= max_arena;
  std::vector<std::byte*> slot(n, stand_in);
  if (t.real && apart_blocks) {
    for (std::size_t i = 0; i < n; ++i) {
      t.owned.emplace_back(new std::byte[e]);
      t.owned_bytes.push_back(e);
      slot[i] = t.owned.back().get();
    }
  } else if (t.real) {
    t.owned.emplace_back(new std::byte[arena]);
    t.owned_bytes.push_back(arena);
    for (std::size_t i = 0; i < n; ++i) slot[i] = t.owned[0].get() + at[i];
  } else if (placed) {
    for (std::size_t i = 0; i < n; ++i)
      slot[i] = reinterpret_cast<std::byte*>(reinterpret_cast<std::uintptr_t>(stand_in) + at[i]);
  }
  for (std::size_t l = 0; l < nk; ++l) t.ptrs.push_back(slot[2 * l]);
  for (std::size_t l = 0; l < nv; ++l) t.values.push_back(slot[2 * l + 1]);
  if (null_one) {
    auto& v = (in.flag() && !t.values.empty()) || t.ptrs.empty() ? t.values : t.ptrs;
    if (!v.empty()) v[in.below(v.size())] = nullptr;
  }
  for (std::size_t l = 0; l < std::min(nk, nv); ++l) {
    t.base.push_back(reinterpret_cast<std::uintptr_t>(t.ptrs[l]));
    t.base.push_back(reinterpret_cast<std::uintptr_t>(t.values[l]));
  }
  // Two tensors of e bytes share a byte exactly when they start less than e bytes apart.
  for (std::size_t i = 0; i < t.base.size(); ++i)
    for (std::size_t j = i + 1; j < t.base.size(); ++j)
      if (std::max(t.base[i], t.base[j]) - std::min(t.base[i], t.base[j]) < e) t.overlapping.emplace_back(i, j);
  t.disjoint = t.overlapping.empty();
  return t;
}

tensors make_tensors(kvfuzz::reader& in, const shape& s) {
  if (s.split) return make_split_tensors(in, s);
  tensors t;
  const auto ext = s.extent();
  const std::size_t layers = s.g.num_layers;
  const std::size_t regions = s.one_tensor() ? 1 : layers;
  std::size_t count = regions;
  // Mostly the right number of pointers; sometimes one short, one extra, or a null one.
  const std::uint8_t mode = in.u8();
  if (mode >= 240 && mode < 246 && count > 0) --count;
  if (mode >= 246 && mode < 250) ++count;
  const bool null_one = mode >= 250 && mode < 253;
  const bool aliased = mode >= 253 && !s.one_tensor() && layers > 1;
  // A huge layer count: the factory must reject the mismatch or cope with it. Only past 64 layers:
  // 64 layers and a pointer extra get 65 pointers, not 64 stand-ins, a right count with no regions.
  if (!s.one_tensor() && layers > 64) {
    t.ptrs.assign(std::min<std::size_t>(count, 64), stand_in);
    return t;
  }
  t.extent = ext.value_or(0);
  const bool small = ext && *ext > 0 && *ext <= max_region && *ext * count <= max_arena;
  if (small && aliased) {
    // One block; layer l starts l * delta bytes in, so the layers overlap (delta 0: they coincide).
    const std::uint64_t delta = in.below(*ext);
    const std::uint64_t total = *ext + delta * (count - 1);
    t.owned.emplace_back(new std::byte[total]);
    t.owned_bytes.push_back(total);
    for (std::size_t l = 0; l < count; ++l) t.ptrs.push_back(t.owned[0].get() + l * delta);
    t.disjoint = false;
    t.real = true;
  } else if (small) {
    for (std::size_t l = 0; l < count; ++l) {
      t.owned.emplace_back(new std::byte[*ext]);
      t.owned_bytes.push_back(*ext);
      t.ptrs.push_back(t.owned.back().get());
    }
    t.real = true;
  } else {
    t.ptrs.assign(count, stand_in);
    t.disjoint = count <= 1;
  }
  if (null_one && !t.ptrs.empty()) t.ptrs[in.below(t.ptrs.size())] = nullptr;
  for (std::size_t l = 0; l < std::min(count, regions); ++l)
    t.base.push_back(reinterpret_cast<std::uintptr_t>(t.ptrs[l]));
  return t;
}

// check_table's documented contract, independently.
bool table_ok(const shape& s, std::span<const std::int32_t> table, std::uint64_t tokens) {
  const std::uint64_t need = (tokens + s.block_tokens - 1) / s.block_tokens;
  if (table.empty()) return need <= s.blocks();
  if (table.size() < need) return false;
  for (std::uint64_t i = 0; i < need; ++i)
    if (table[i] < 0 || static_cast<std::uint64_t>(table[i]) >= s.blocks()) return false;
  return true;
}

// Whether a block appears twice among the entries for `tokens` tokens.
bool named_twice(const shape& s, std::span<const std::int32_t> table, std::uint64_t tokens) {
  if (table.empty()) return false;
  const std::uint64_t need = std::min<std::uint64_t>(table.size(), (tokens + s.block_tokens - 1) / s.block_tokens);
  std::vector<std::int32_t> used(table.begin(), table.begin() + static_cast<std::ptrdiff_t>(need));
  std::sort(used.begin(), used.end());
  return std::adjacent_find(used.begin(), used.end()) != used.end();
}

std::vector<std::int32_t> read_table(kvfuzz::reader& in, const shape& s, std::uint64_t tokens) {
  const std::uint64_t need = (tokens + s.block_tokens - 1) / s.block_tokens;
  std::vector<std::int32_t> t;
  const std::uint8_t mode = in.u8() % 8;
  if (mode == 0 || need > max_table) return t;  // identity
  std::size_t len = need;
  if (mode == 6 && len > 0) len -= 1 + in.below(len);  // too short
  if (mode == 7) len += in.below(4);
  const std::uint64_t blocks = s.blocks();
  for (std::size_t i = 0; i < len; ++i) {
    switch (mode) {
      case 1: t.push_back(static_cast<std::int32_t>(i % blocks)); break;  // identity, written out
      case 2: t.push_back(static_cast<std::int32_t>((blocks - 1 - i % blocks) % blocks)); break;  // reversed
      case 5: t.push_back(static_cast<std::int32_t>(in.u32())); break;  // anything, negatives too
      default: t.push_back(static_cast<std::int32_t>(in.below(std::min<std::uint64_t>(blocks, 1u << 30)))); break;
    }
  }
  // Sometimes one entry just out of range.
  if (!t.empty() && in.u8() >= 240) t[in.below(t.size())] = in.flag() ? -1 : static_cast<std::int32_t>(std::min<std::uint64_t>(blocks, INT32_MAX));
  return t;
}

struct segment {
  std::uint64_t first{0}, count{0};
  std::unique_ptr<std::byte[]> chunk;
  std::uint64_t bytes{0};
  std::vector<std::uint8_t> covered;  // per chunk byte: how many op bytes hit it
};

// Where chunk byte `o` of `seg` must come from (store) or go to (retrieve), per the documented shape.
KVFUZZ_ORACLE std::uint64_t expected_address(const shape& s, const tensors& t, std::span<const std::int32_t> table,
                               const segment& seg, std::uint64_t o) {
  const std::uint64_t row = s.row(), hb = s.head_bytes();
  const std::uint64_t per_layer = std::uint64_t{s.g.kv_planes} * seg.count * row;
  const std::uint64_t l = o / per_layer, in_layer = o % per_layer;
  const std::uint64_t p = in_layer / (seg.count * row), in_plane = in_layer % (seg.count * row);
  const std::uint64_t tok = seg.first + in_plane / row, i = in_plane % row;
  const std::uint64_t logical = tok / s.block_tokens;
  const std::uint64_t block = table.empty() ? logical : static_cast<std::uint64_t>(table[logical]);
  return t.base[s.region(l, p)] + s.offset(l, p, block, tok % s.block_tokens, i / hb) + i % hb;
}

KVFUZZ_ORACLE void check_layout(kvfuzz::reader& in, const shape& s, const kvortex::kv_layout& lay, tensors& t) {
  const std::uint64_t row = s.row();
  const std::uint64_t layers = s.g.num_layers;
  const std::uint64_t planes = s.g.kv_planes;
  const std::uint64_t capacity_tokens = kvfuzz::mul(s.blocks(), s.block_tokens).value_or(~std::uint64_t{0});
  const std::uint64_t token_chunk_bytes = kvfuzz::mul({layers, planes, row}).value_or(~std::uint64_t{0});
  for (int round = 0, rounds = 1 + static_cast<int>(in.below(4)); round < rounds && !in.empty(); ++round) {
    // Up to three ascending, disjoint token ranges, like the chunks of one prompt in one batch.
    std::vector<segment> segs(1 + in.below(3));
    // Clamped far below 2^64 so that no token index computed from it wraps.
    // A table may address more tokens than the blocks hold (it repeats blocks), so reach past them.
    const std::uint64_t reach = std::min({kvfuzz::mul(2, capacity_tokens).value_or(~std::uint64_t{0}),
                                          kvfuzz::mul(max_table, s.block_tokens).value_or(~std::uint64_t{0}),
                                          std::uint64_t{1} << 60});
    std::uint64_t at = in.below(reach + 1);
    const std::uint64_t max_count = token_chunk_bytes == 0 ? 0 : std::min<std::uint64_t>(64, max_chunk / token_chunk_bytes);
    for (auto& seg : segs) {
      seg.first = at;
      seg.count = in.below(max_count + 1);
      at += seg.count + (in.u8() < 128 ? 0 : in.below(2 * s.block_tokens + 1));
    }
    const std::uint64_t end = segs.back().first + segs.back().count;
    const auto table = read_table(in, s, end);
    const auto checked = lay.check_table(table, end);
    const bool expect = table_ok(s, table, end);
    KVFUZZ_CHECK(checked.has_value() == expect,
                 "check_table(" + std::to_string(table.size()) + " entries, " + std::to_string(end) +
                     " tokens) on " + lay.kind() + " answered " + (checked ? "ok" : checked.error().what()));
    const auto checked_distinct = lay.check_table(table, end, /*distinct=*/true);
    KVFUZZ_CHECK(checked_distinct.has_value() == (expect && !named_twice(s, table, end)),
                 "check_table(distinct) on " + lay.kind() + " answered " +
                     (checked_distinct ? "ok" : checked_distinct.error().what()));
    if (checked && !checked_distinct)
      KVFUZZ_CHECK(checked_distinct.error().code == kvortex::errc::invalid_argument, checked_distinct.error().what());
    if (!checked) {
      kvfuzz::check_error(checked.error(), "check_table");
      KVFUZZ_CHECK(checked.error().code == kvortex::errc::size_mismatch ||
                       checked.error().code == kvortex::errc::invalid_argument,
                   checked.error().what());
      continue;
    }
    const std::uint64_t layer_first = in.below(layers + 1);
    std::uint64_t layer_count = ~std::uint64_t{0};
    if (in.flag()) layer_count = in.below(layers + 2);
    const std::uint64_t layer_end = layer_first + std::min(layer_count, layers - layer_first);
    const bool to_chunk = in.flag();
    if (kvfuzz::tracing())
      for (const auto& seg : segs) kvfuzz::trace("    tokens [" + std::to_string(seg.first) + ", " + std::to_string(seg.first + seg.count) + ")");
    kvfuzz::trace("  " + std::to_string(segs.size()) + " ranges to token " + std::to_string(end) + ", table of " +
                  std::to_string(table.size()) + ", layers [" + std::to_string(layer_first) + ", " +
                  std::to_string(layer_end) + "), " + (to_chunk ? "store" : "retrieve"));

    std::vector<kvortex::copy_op> ops;
    std::vector<std::size_t> seg_of_op;
    for (std::size_t k = 0; k < segs.size(); ++k) {
      auto& seg = segs[k];
      seg.bytes = layers * planes * seg.count * row;
      seg.chunk.reset(new std::byte[std::max<std::uint64_t>(seg.bytes, 1)]);
      seg.covered.assign(seg.bytes, 0);
      const std::size_t before = ops.size();
      lay.append_copies(ops, table, seg.first, seg.count, seg.chunk.get(), to_chunk, layer_first, layer_count);
      const std::size_t most = lay.max_copies(seg.count, layer_first, layer_count);
      KVFUZZ_CHECK(ops.size() - before <= most, std::to_string(ops.size() - before) + " ops for " + std::to_string(seg.count) +
                                                   " tokens, max_copies says at most " + std::to_string(most));
      seg_of_op.resize(ops.size(), k);
    }

    kvfuzz::trace("    " + std::to_string(ops.size()) + " ops");
    // Every op row: its chunk side inside its chunk buffer, its cache side inside a layer tensor,
    // each chunk byte exactly once, each at the documented address.
    std::vector<std::uint64_t> written;  // cache bytes a retrieve writes
    for (std::size_t n = 0; n < ops.size(); ++n) {
      const auto& op = ops[n];
      auto& seg = segs[seg_of_op[n]];
      KVFUZZ_CHECK(op.rows >= 1 && op.bytes > 0, "an empty op");
      if (op.rows > 1) KVFUZZ_CHECK(op.src_pitch >= op.bytes && op.dst_pitch >= op.bytes, "2D op rows overlap");
      const auto chunk0 = reinterpret_cast<std::uintptr_t>(seg.chunk.get());
      for (std::uint64_t r = 0; r < op.rows; ++r) {
        const auto src = reinterpret_cast<std::uintptr_t>(op.src) + r * op.src_pitch;
        const auto dst = reinterpret_cast<std::uintptr_t>(op.dst) + r * op.dst_pitch;
        const std::uint64_t k = to_chunk ? dst : src, c = to_chunk ? src : dst;
        KVFUZZ_CHECK(k >= chunk0 && k - chunk0 + op.bytes <= seg.bytes,
                     "op " + std::to_string(n) + " row " + std::to_string(r) + " leaves its chunk buffer");
        // Every byte inside some layer's tensor: one op may run on from one layer into the next
        // where their memory is contiguous (push merges such ops).
        bool inside = true;
        for (std::uint64_t at = c, stop = c + op.bytes; at < stop && inside;) {
          std::uint64_t next = at;
          for (const auto b : t.base)
            if (at >= b && at - b < t.extent) {
              const std::uint64_t region_end = t.extent > ~b ? ~std::uint64_t{0} : b + t.extent;  // saturated
              next = std::max(next, std::min(stop, region_end));
            }
          inside = next > at;
          at = next;
        }
        if (!inside && kvfuzz::tracing())
          for (std::size_t l = 0; l < t.base.size(); ++l)
            kvfuzz::trace("    op " + std::to_string(n) + " (" + std::to_string(op.bytes) + " bytes x " + std::to_string(op.rows) +
                          ", chunk offset " + std::to_string(k - chunk0) + ") is " +
                          std::to_string(static_cast<std::int64_t>(c - t.base[l])) + " bytes from layer " + std::to_string(l));
        KVFUZZ_CHECK(inside, "op " + std::to_string(n) + " row " + std::to_string(r) + " of " + lay.kind() +
                                 " leaves the layer tensors (" + std::to_string(t.extent) + " bytes each)");
        for (std::uint64_t j = 0; j < op.bytes; ++j) {
          const std::uint64_t o = k - chunk0 + j;
          KVFUZZ_CHECK(seg.covered[o] == 0, "chunk byte " + std::to_string(o) + " copied twice");
          seg.covered[o] = 1;
          const std::uint64_t want = expected_address(s, t, table, seg, o);
          KVFUZZ_CHECK(c + j == want, lay.kind() + ": chunk byte " + std::to_string(o) + " maps to cache offset " +
                                          std::to_string(c + j - t.base[0]) + ", the documented shape says " +
                                          std::to_string(want - t.base[0]));
          if (!to_chunk) written.push_back(c + j);
        }
      }
    }
    for (const auto& seg : segs) {
      const std::uint64_t per_layer = planes * seg.count * row;
      for (std::uint64_t o = 0; o < seg.bytes; ++o) {
        const bool in_range = o / per_layer >= layer_first && o / per_layer < layer_end;
        KVFUZZ_CHECK(seg.covered[o] == (in_range ? 1 : 0),
                     "chunk byte " + std::to_string(o) + (in_range ? " never copied" : " of a layer outside the range copied"));
      }
    }
    // Distinct physical blocks for distinct logical ones (adjacent ranges may share a block).
    std::vector<std::uint64_t> logical, physical;
    for (const auto& seg : segs)
      for (std::uint64_t b = seg.first / s.block_tokens; seg.count > 0 && b <= (seg.first + seg.count - 1) / s.block_tokens; ++b)
        logical.push_back(b);
    std::sort(logical.begin(), logical.end());
    logical.erase(std::unique(logical.begin(), logical.end()), logical.end());
    for (const auto b : logical) physical.push_back(table.empty() ? b : static_cast<std::uint64_t>(table[b]));
    std::sort(physical.begin(), physical.end());
    const bool distinct = std::adjacent_find(physical.begin(), physical.end()) == physical.end();
    if (!to_chunk && (t.disjoint || lay.layers_disjoint()) && distinct) {
      std::sort(written.begin(), written.end());
      const auto dup = std::adjacent_find(written.begin(), written.end());
      KVFUZZ_CHECK(dup == written.end(), lay.kind() + ": a retrieve over distinct blocks writes cache byte " +
                                             std::to_string(*dup - t.base[0]) + " twice");
    }

    if (!t.real) continue;
    // Perform the ops on the real buffers: ASan sees every byte outside the stated extents.
    // Each op is split in two ranges at a fuzz-chosen byte, as the copy threads split batches.
    const std::uint64_t seed = in.u8();
    for (std::size_t r = 0; r < t.owned.size(); ++r)
      for (std::uint64_t i = 0; i < t.owned_bytes[r]; ++i)
        t.owned[r][i] = to_chunk ? kvfuzz::pattern(seed, i + (r << 32)) : std::byte{0};
    for (auto& seg : segs)
      for (std::uint64_t i = 0; i < seg.bytes; ++i) seg.chunk[i] = to_chunk ? std::byte{0} : kvfuzz::pattern(seed + 1, i);
    for (const auto& op : ops) {
      const std::size_t total = kvortex::total_bytes(op);
      const std::size_t cut = in.below(total + 1);
      kvortex::copy_host(op, 0, cut);
      kvortex::copy_host(op, cut, total);
    }
    for (const auto& seg : segs) {
      const std::uint64_t per_layer = planes * seg.count * row;
      for (std::uint64_t o = 0; o < seg.bytes; ++o) {
        if (o / per_layer < layer_first || o / per_layer >= layer_end) continue;
        const auto* cache = reinterpret_cast<const std::byte*>(expected_address(s, t, table, seg, o));
        if (to_chunk)
          KVFUZZ_CHECK(seg.chunk[o] == *cache, "a store copied the wrong byte into chunk byte " + std::to_string(o));
        else if (t.disjoint && distinct)
          KVFUZZ_CHECK(*cache == seg.chunk[o], "a retrieve left the wrong byte for chunk byte " + std::to_string(o));
      }
    }
    if (!to_chunk && t.disjoint) {
      // Nothing but the addressed bytes changed.
      for (std::size_t r = 0; r < t.owned.size(); ++r) {
        const auto b0 = reinterpret_cast<std::uintptr_t>(t.owned[r].get());
        std::vector<std::uint8_t> hit(t.owned_bytes[r], 0);
        for (const auto w : written)
          if (w >= b0 && w - b0 < t.owned_bytes[r]) hit[w - b0] = 1;
        for (std::uint64_t i = 0; i < t.owned_bytes[r]; ++i)
          KVFUZZ_CHECK(hit[i] != 0 || t.owned[r][i] == std::byte{0},
                       lay.kind() + ": a retrieve changed cache byte " + std::to_string(i) + " of layer " +
                           std::to_string(r) + ", which no chunk byte maps to");
      }
    }
  }
}

// layers_disjoint() against the elements themselves: never disjoint when two layers share a byte.
KVFUZZ_ORACLE void check_disjoint(const shape& s, const kvortex::kv_layout& lay, const tensors& t) {
  const auto dest = lay.check_destination();
  KVFUZZ_CHECK(dest.has_value() == lay.layers_disjoint(), "check_destination() and layers_disjoint() disagree");
  if (!dest) {
    kvfuzz::check_error(dest.error(), "check_destination");
    KVFUZZ_CHECK(dest.error().code == kvortex::errc::invalid_layout, dest.error().what());
  }
  if (s.split) {
    // Each tensor is packed, so tensors share a byte exactly when their elements do: the answer
    // is exact both ways, whatever the addresses (fake ones included), and names two that do.
    KVFUZZ_CHECK(lay.layers_disjoint() == t.overlapping.empty(),
                 "split_kv: layers_disjoint() is " + std::string(lay.layers_disjoint() ? "true" : "false") + " but " +
                     (t.overlapping.empty() ? "no two tensors share a byte"
                                            : split_name(t.overlapping[0].first) + " and " +
                                                  split_name(t.overlapping[0].second) + " do"));
    if (!dest) {
      const std::string& m = dest.error().message;
      const bool named = std::any_of(t.overlapping.begin(), t.overlapping.end(), [&](const auto& pr) {
        const std::string a = split_name(pr.first), b = split_name(pr.second);
        return m.find(a + " and " + b + " overlap") != std::string::npos ||
               m.find(b + " and " + a + " overlap") != std::string::npos;
      });
      KVFUZZ_CHECK(named, "split_kv: check_destination names no two tensors that overlap: " + m);
    }
  }
  if (t.base.empty()) return;
  // Separate tensors, and the layers of one cross-layer tensor, never share a byte.
  if (s.one_tensor() || (t.real && t.disjoint))
    KVFUZZ_CHECK(lay.layers_disjoint(), lay.kind() + ": disjoint layers reported as overlapping");
  const std::uint64_t layers = s.g.num_layers;
  const auto elements = kvfuzz::mul({layers, s.g.kv_planes, s.blocks(), s.block_tokens, s.g.kv_heads});
  if (!elements || *elements > 65536 || s.one_tensor()) return;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> spans;  // [start, layer]
  const std::uint64_t hb = s.head_bytes();
  for (std::uint64_t l = 0; l < layers; ++l)
    for (std::uint64_t p = 0; p < s.g.kv_planes; ++p)
      for (std::uint64_t b = 0; b < s.blocks(); ++b)
        for (std::uint64_t tk = 0; tk < s.block_tokens; ++tk)
          for (std::uint64_t h = 0; h < s.g.kv_heads; ++h)
            spans.emplace_back(t.base[s.region(l, p)] + s.offset(l, p, b, tk, h), l);
  std::sort(spans.begin(), spans.end());
  bool shared = false;
  for (std::size_t i = 1; i < spans.size() && !shared; ++i) shared = spans[i - 1].first + hb > spans[i].first;
  if (shared)
    KVFUZZ_CHECK(!lay.layers_disjoint(), lay.kind() + ": layers_disjoint() is true but two layers share a byte");
  // The model's own premise, element by element: split_kv's tensors overlap where elements do.
  if (s.split)
    KVFUZZ_CHECK(shared == !t.overlapping.empty(), "the split_kv model: tensor overlap differs from element overlap");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  kvfuzz::reader in(data, size);
  const shape s = read_shape(in);
  // Open: cross_layer allocates a pointer per layer and computes each layer's address before it
  // validates the sizes (a huge layer count exhausts memory; a zero size lets the rest wrap).
  if (s.one_tensor() && (s.g.num_layers > 65536 || !s.documented_valid() || !s.extent()) &&
      kvfuzz::avoid("cross_layer_unchecked"))
    return 0;
  tensors t = make_tensors(in, s);
  const auto lay = s.build(t.ptrs, t.values);
  if (kvfuzz::tracing())
    kvfuzz::trace("kind " + std::to_string(static_cast<int>(s.kind)) + ": " + std::to_string(s.g.num_layers) + " layers x " +
                  std::to_string(s.g.kv_planes) + " planes x " + std::to_string(s.g.kv_heads) + " heads x " +
                  std::to_string(s.g.head_dim) + " x " + std::to_string(s.g.element_bytes) + " B, " +
                  std::to_string(s.num_blocks) + " blocks of " + std::to_string(s.block_tokens) + ", " +
                  std::to_string(t.ptrs.size()) + " pointers" +
                  (s.split ? " and " + std::to_string(t.values.size()) + " value pointers" : "") +
                  (t.real ? "" : " (stand-ins)") + ": " +
                  (lay ? "accepted" : lay.error().what()));
  if (kvfuzz::tracing() && s.split && !t.base.empty()) {
    std::string at;
    const std::uint64_t low = *std::min_element(t.base.begin(), t.base.end());
    for (std::size_t i = 0; i < t.base.size(); ++i) at += " " + split_name(i) + "@" + std::to_string(t.base[i] - low);
    kvfuzz::trace("  " + std::to_string(t.extent) + "-byte tensors" + at + ", " + std::to_string(t.overlapping.size()) +
                  " overlapping pairs");
  }

  const std::size_t regions = s.one_tensor() ? 1 : s.g.num_layers;
  const auto none_null = [](const std::vector<std::byte*>& v) {
    return std::none_of(v.begin(), v.end(), [](std::byte* p) { return p == nullptr; });
  };
  // cross_layer takes the first pointer as the tensor's base and nothing else; split_kv one key
  // and one value tensor per layer.
  const bool pointers_ok = s.one_tensor() ? !t.ptrs.empty() && t.ptrs[0] != nullptr
                           : s.split      ? t.ptrs.size() == regions && t.values.size() == regions &&
                                           none_null(t.ptrs) && none_null(t.values)
                                          : t.ptrs.size() == regions && none_null(t.ptrs);
  if (!lay) {
    kvfuzz::check_error(lay.error(), "a layout factory");
    KVFUZZ_CHECK(lay.error().code == kvortex::errc::invalid_layout, lay.error().what());
    // Shapes the docs allow, small enough that no size check can object, must be accepted.
    // (A page stride counts times the blocks even where one block never uses it.)
    const bool modest = s.extent() && *s.extent() <= (std::uint64_t{1} << 40) && s.g.num_layers <= 64 &&
                        kvfuzz::mul(s.page_stride, s.num_blocks).value_or(~std::uint64_t{0}) <= (std::uint64_t{1} << 40);
    KVFUZZ_CHECK(!(s.kind != layout_kind::strided && pointers_ok && modest && s.documented_valid()),
                 "a valid shape was rejected: " + lay.error().what());
    return 0;
  }
  // Accepted: it describes what was asked for.
  KVFUZZ_CHECK(pointers_ok, lay->kind() + " layout accepted with " + std::to_string(t.ptrs.size()) +
                                " pointers (or a null one) for " + std::to_string(s.g.num_layers) + " layers");
  KVFUZZ_CHECK(lay->geometry() == s.g, "the layout's geometry differs from the one given");
  KVFUZZ_CHECK(lay->num_layers() == s.g.num_layers, "num_layers() " + std::to_string(lay->num_layers()));
  KVFUZZ_CHECK(lay->num_blocks() == s.blocks() && lay->block_tokens() == s.block_tokens, "blocks differ from the ones given");
  KVFUZZ_CHECK(lay->whole_blocks_only() == (s.kind == layout_kind::pages), "whole_blocks_only() on " + lay->kind());
  if (s.split) {
    const auto keys = lay->layers();
    KVFUZZ_CHECK(std::equal(keys.begin(), keys.end(), t.ptrs.begin(), t.ptrs.end()), "split_kv: layers() are not the key tensors");
  }
  KVFUZZ_CHECK(!lay->kind().empty(), "an empty kind()");
  KVFUZZ_CHECK(s.kind == layout_kind::strided || s.documented_valid(), lay->kind() + " accepted a shape its docs exclude");
  const auto ext = s.extent();
  KVFUZZ_CHECK(ext.has_value(), lay->kind() + " accepted a tensor whose extent does not fit in 64 bits");
  if (s.kind == layout_kind::strided && t.real) {
    // The validator's promise, checked by brute force: no two elements overlap, all end inside.
    const std::uint64_t hb = s.head_bytes();
    std::vector<std::pair<std::uint64_t, std::uint64_t>> spans;
    const std::uint64_t elements = kvfuzz::mul({s.g.kv_planes, s.num_blocks, s.block_tokens, s.g.kv_heads}).value_or(0);
    if (elements <= 65536) {
      for (std::uint64_t p = 0; p < s.g.kv_planes; ++p)
        for (std::uint64_t b = 0; b < s.num_blocks; ++b)
          for (std::uint64_t tk = 0; tk < s.block_tokens; ++tk)
            for (std::uint64_t h = 0; h < s.g.kv_heads; ++h) spans.emplace_back(s.offset(0, p, b, tk, h), hb);
      std::sort(spans.begin(), spans.end());
      for (std::size_t i = 0; i < spans.size(); ++i) {
        KVFUZZ_CHECK(spans[i].first + spans[i].second <= s.layer_bytes, "strided element ends past layer_bytes");
        if (i > 0) KVFUZZ_CHECK(spans[i - 1].first + spans[i - 1].second <= spans[i].first, "strided elements overlap");
      }
    }
  }
  check_disjoint(s, *lay, t);
  check_layout(in, s, *lay, t);
  return 0;
}
