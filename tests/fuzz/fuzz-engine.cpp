// Fuzz target: a small host_engine (a few chunks of capacity, partial chunks kept or not) driven by
// a call sequence decoded from the bytes: store, lookup, retrieve, layered stores and retrieves
// (layers submitted in any order, then finished or dropped), save/load/check_blocks with keys
// from chunk_keys or made up, block tables valid or not (duplicates, out of range, short),
// stats and their Prometheus text, shutdown at the end or in the middle.
//
// The oracle: KV bytes are a function of token value and position (kvt::kv_byte), so every
// retrieved prefix is checked byte for byte; a map says which token prefix each chunk key stands
// for, and a key written through the key API holds bytes that are a function of key and size.
// So every byte a successful retrieve or load writes must equal what was stored, and every other
// destination byte must keep its value. Also: lookup equals what a retrieve right after it
// returns; after a store with nothing else in flight, the prefix that fits is found; held bytes
// never exceed the capacity; counters never decrease and a rejected call changes none; every
// error has a message; the engine keeps serving after any rejected call; after shutdown every
// call fails with shut_down.
//
// Sources whose blocks or layers alias (duplicate table entries, overlapping layers) are valid for
// a store but gather other tokens' bytes; chunks stored from them are marked as of unknown content.

#include "fuzz_support.hpp"
#include "test_support.hpp"

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <optional>
#include <set>

namespace {

using kvfuzz::layout_kind;
using kvfuzz::layout_shape;
using kvortex::chunk_key;
using kvortex::errc;
using kvortex::token_id;
using engine_type = kvortex::host_engine;

constexpr std::size_t prompt_tokens = 256;  // the longest prompt; every cache holds this many
constexpr std::size_t max_steps = 48;
constexpr std::size_t max_slots = 3;

struct geometry_choice {
  kvortex::kv_geometry g;
  std::size_t chunk_tokens, block_tokens;
};
// kvt's small geometry (4 KiB chunks), an MLA-like one (one plane, one head), and three layers of
// 4-byte elements with 4-token blocks.
constexpr geometry_choice geometries[] = {
    {{.num_layers = 2, .kv_planes = 2, .kv_heads = 2, .head_dim = 8, .element_bytes = 2}, 32, 16},
    {{.num_layers = 2, .kv_planes = 1, .kv_heads = 1, .head_dim = 16, .element_bytes = 1}, 16, 8},
    {{.num_layers = 3, .kv_planes = 2, .kv_heads = 1, .head_dim = 4, .element_bytes = 4}, 16, 4},
};

// Caches the calls copy from and into.
enum class cache_kind : std::uint8_t {
  flash_nhd, flash_hnd, flashinfer_nhd, flashinfer_hnd, mla, pages, contiguous, cross, cross_blocks_outermost,
  padded,   // strided: rows contiguous, tokens 16 bytes apart
  aliased,  // every layer at the same address (or overlapping): fine to store from, not to retrieve into
};
constexpr std::size_t cache_kinds = 11;

// A host KV cache with real memory, and where each element lives (from the documented shape).
struct cache {
  layout_shape shape;
  std::vector<std::vector<std::byte>> bufs;
  std::vector<std::byte*> ptrs;
  std::optional<kvortex::kv_layout> layout;
  bool aliased{false};

  std::byte* at(std::size_t l, std::size_t p, std::size_t block, std::size_t slot, std::size_t h) {
    std::byte* base = shape.one_tensor() ? bufs[0].data() : ptrs[l];
    return base + shape.offset(l, p, block, slot, h);
  }
  [[nodiscard]] std::size_t blocks() const { return shape.blocks(); }
  [[nodiscard]] std::size_t block_tokens() const { return shape.block_tokens; }
};

std::unique_ptr<cache> make_cache(cache_kind kind, const geometry_choice& gc, std::uint64_t delta_seed) {
  auto c = std::make_unique<cache>();
  auto& s = c->shape;
  s.g = gc.g;
  s.block_tokens = gc.block_tokens;
  s.num_blocks = prompt_tokens / gc.block_tokens;
  const std::size_t row = s.g.row_bytes();
  const bool mla_ok = s.g.kv_planes == 1 && s.g.kv_heads == 1;
  const bool two_planes = s.g.kv_planes == 2;
  switch (kind) {
    case cache_kind::flash_nhd: s.kind = two_planes ? layout_kind::flash_attn_nhd : layout_kind::mla; break;
    case cache_kind::flash_hnd: s.kind = two_planes ? layout_kind::flash_attn_hnd : layout_kind::mla; break;
    case cache_kind::flashinfer_nhd: s.kind = two_planes ? layout_kind::flashinfer_nhd : layout_kind::mla; break;
    case cache_kind::flashinfer_hnd: s.kind = two_planes ? layout_kind::flashinfer_hnd : layout_kind::mla; break;
    case cache_kind::mla: s.kind = mla_ok ? layout_kind::mla : layout_kind::flash_attn_nhd; break;
    case cache_kind::pages:
      s.kind = layout_kind::pages;
      s.page_stride = s.g.kv_planes * s.block_tokens * row + 32;
      break;
    case cache_kind::contiguous:
      s.kind = layout_kind::contiguous;
      s.block_tokens = prompt_tokens;
      break;
    case cache_kind::cross: s.kind = layout_kind::cross_layer; break;
    case cache_kind::cross_blocks_outermost: s.kind = layout_kind::cross_layer_blocks_outermost; break;
    case cache_kind::padded: {
      s.kind = layout_kind::strided;
      const std::int64_t pitch = static_cast<std::int64_t>(row) + 16;
      s.head_stride = static_cast<std::int64_t>(s.g.head_dim * s.g.element_bytes);
      s.token_stride = pitch;
      s.block_stride = pitch * static_cast<std::int64_t>(s.block_tokens);
      s.plane_stride = s.block_stride * static_cast<std::int64_t>(s.num_blocks);
      s.layer_bytes = static_cast<std::size_t>(s.plane_stride) * s.g.kv_planes;
      break;
    }
    case cache_kind::aliased:
      s.kind = two_planes ? layout_kind::flash_attn_nhd : layout_kind::mla;
      c->aliased = true;
      break;
  }
  const std::size_t extent = *s.extent();
  if (s.one_tensor()) {
    c->bufs.emplace_back(extent);
    c->ptrs.push_back(c->bufs[0].data());
  } else if (c->aliased) {
    // Layer l starts l * delta bytes in: delta 0 makes the layers coincide, others overlap.
    const std::size_t delta = delta_seed % 2 == 0 ? 0 : (delta_seed % extent) | 1;
    c->bufs.emplace_back(extent + delta * (s.g.num_layers - 1));
    for (std::size_t l = 0; l < s.g.num_layers; ++l) c->ptrs.push_back(c->bufs[0].data() + l * delta);
  } else {
    for (std::size_t l = 0; l < s.g.num_layers; ++l) {
      c->bufs.emplace_back(extent);
      c->ptrs.push_back(c->bufs.back().data());
    }
  }
  auto lay = s.build(c->ptrs);
  KVFUZZ_CHECK(lay.has_value(), "a fixture layout was rejected: " + lay.error().what());
  c->layout = std::move(*lay);
  return c;
}

// What a destination holds before a retrieve: cheap, and unrelated to any KV byte.
KVFUZZ_ORACLE std::byte sentinel(std::size_t buf, std::size_t i) {
  return static_cast<std::byte>((i * 0x9D + (i >> 8) * 0x47 + buf * 0x3B + 0x5A) & 0xFF);
}

KVFUZZ_ORACLE void fill_sentinel(cache& c) {
  for (std::size_t b = 0; b < c.bufs.size(); ++b)
    for (std::size_t i = 0; i < c.bufs[b].size(); ++i) c.bufs[b][i] = sentinel(b, i);
}

// The block of position `pos` under `table`, if the table addresses it.
std::optional<std::size_t> block_of(const cache& c, std::span<const std::int32_t> table, std::size_t pos) {
  const std::size_t logical = pos / c.block_tokens();
  if (table.empty()) return logical < c.blocks() ? std::optional<std::size_t>(logical) : std::nullopt;
  if (logical >= table.size() || table[logical] < 0 || static_cast<std::size_t>(table[logical]) >= c.blocks())
    return std::nullopt;
  return static_cast<std::size_t>(table[logical]);
}

// kv_layout::check_table's contract; a retrieve's table (`skips`) may hold kv_layout::skip_block.
bool table_ok(const cache& c, std::span<const std::int32_t> table, std::size_t tokens, bool skips = false) {
  const std::size_t need = (tokens + c.block_tokens() - 1) / c.block_tokens();
  if (table.empty()) return need <= c.blocks();
  if (table.size() < need) return false;
  for (std::size_t i = 0; i < need; ++i) {
    if (skips && table[i] == kvortex::kv_layout::skip_block) continue;
    if (table[i] < 0 || static_cast<std::size_t>(table[i]) >= c.blocks()) return false;
  }
  return true;
}

// Whether a retrieve leaves position `pos` alone (its table entry is skip_block).
bool skipped(std::span<const std::int32_t> table, std::size_t pos, std::size_t block_tokens) {
  const std::size_t logical = pos / block_tokens;
  return logical < table.size() && table[logical] == kvortex::kv_layout::skip_block;
}

// Whether two of the table entries for the first `tokens` tokens name the same block.
bool has_duplicate(const cache& c, std::span<const std::int32_t> table, std::size_t tokens) {
  if (table.empty()) return false;
  const std::size_t need = std::min(table.size(), (tokens + c.block_tokens() - 1) / c.block_tokens());
  std::vector<std::int32_t> used;
  for (std::size_t i = 0; i < need; ++i)
    if (table[i] != kvortex::kv_layout::skip_block) used.push_back(table[i]);  // names no block
  std::sort(used.begin(), used.end());
  return std::adjacent_find(used.begin(), used.end()) != used.end();
}

struct prompt {
  std::vector<token_id> tokens;
};

token_id base_token(std::size_t base, std::size_t pos) {
  std::uint64_t h = (base + 1) * 0x9E3779B97F4A7C15ULL + pos * 0xD1B54A32D192ED03ULL;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 32;
  return static_cast<token_id>(h % 120000);
}

// Key API content: a function of the key and the size.
std::byte key_byte(const chunk_key& k, std::size_t size, std::size_t i) {
  std::uint64_t seed = size;
  for (std::size_t j = 0; j < 8; ++j) seed = seed * 131 + static_cast<std::uint64_t>(k.bytes[j]);
  return kvfuzz::pattern(seed, i);
}

struct key_info {
  std::vector<token_id> prefix;  // tokens up to the chunk's end
  std::size_t index;             // chunk index in the prompt
  std::size_t ntok;              // tokens in the chunk
};

using layered = engine_type::layered_transfer;

// An open layered transfer, with what it was begun with.
struct slot {
  bool storing;
  std::optional<layered> transfer;
  cache* c;
  std::vector<token_id> tokens;
  std::vector<std::int32_t> table;
  std::vector<bool> sent;
  bool all_sent{false};
  std::size_t hit{0};  // retrieve: tokens pinned; store: tokens it will write
};

std::vector<std::uint64_t> counters(const kvortex::engine_stats& s) {
  return {s.lookups,          s.hit_chunks,   s.miss_chunks, s.hit_tokens,     s.queried_tokens,
          s.stored_chunks,    s.deduplicated_chunks, s.rejected_chunks, s.retrieved_chunks, s.evictions,
          s.bytes_stored,     s.bytes_loaded, s.transfer_failures, s.replaced_chunks};
}
constexpr const char* counter_names[] = {"lookups", "hit_chunks", "miss_chunks", "hit_tokens", "queried_tokens",
                                         "stored_chunks", "deduplicated_chunks", "rejected_chunks",
                                         "retrieved_chunks", "evictions", "bytes_stored", "bytes_loaded",
                                         "transfer_failures", "replaced_chunks"};

void check_histogram(const kvortex::latency_histogram& h, const char* name) {
  std::uint64_t sum = 0;
  for (const auto c : h.counts) sum += c;
  KVFUZZ_CHECK(sum == h.count, std::string(name) + " histogram: count " + std::to_string(h.count) +
                                   " but the buckets hold " + std::to_string(sum));
}

// Checks the Prometheus text: every sample line is `<name>[{le="..."}] <value>`, names start with
// the prefix, each histogram's buckets rise and its +Inf bucket equals its _count.
KVFUZZ_ORACLE void check_prometheus(const std::string& text, const std::string& prefix) {
  KVFUZZ_CHECK(!text.empty() && text.back() == '\n', "Prometheus text must end with a newline");
  std::map<std::string, std::uint64_t> inf, count;
  std::map<std::string, std::uint64_t> last_bucket;
  std::size_t at = 0;
  while (at < text.size()) {
    const std::size_t end = text.find('\n', at);
    const std::string line = text.substr(at, end - at);
    at = end + 1;
    if (line.rfind("# ", 0) == 0) continue;
    KVFUZZ_CHECK(line.rfind(prefix + "_", 0) == 0, "sample line without the prefix: " + line);
    const std::size_t sp = line.rfind(' ');
    KVFUZZ_CHECK(sp != std::string::npos && sp + 1 < line.size(), "sample line without a value: " + line);
    const std::string name = line.substr(0, sp), value = line.substr(sp + 1);
    const std::size_t brace = name.find('{');
    const std::string metric = name.substr(0, brace);
    for (const char ch : metric)
      KVFUZZ_CHECK((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == ':',
                   "invalid metric name: " + metric);
    if (metric.size() > 7 && metric.compare(metric.size() - 7, 7, "_bucket") == 0) {
      const std::string h = metric.substr(0, metric.size() - 7);
      const std::uint64_t v = std::stoull(value);
      KVFUZZ_CHECK(v >= last_bucket[h], "histogram buckets must not decrease: " + line);
      last_bucket[h] = v;
      if (name.find("le=\"+Inf\"") != std::string::npos) inf[h] = v;
    } else if (metric.size() > 6 && metric.compare(metric.size() - 6, 6, "_count") == 0) {
      count[metric.substr(0, metric.size() - 6)] = std::stoull(value);
    }
  }
  KVFUZZ_CHECK(inf.size() == 3 && count.size() == 3, "expected three histograms");
  for (const auto& [h, v] : inf) KVFUZZ_CHECK(count[h] == v, h + ": +Inf bucket " + std::to_string(v) + " != _count");
}

using kvfuzz::trace;

std::string describe(std::span<const token_id> tokens, std::span<const std::int32_t> table, const cache* c) {
  std::string s = std::to_string(tokens.size()) + " tokens";
  if (!tokens.empty()) s += " (first " + std::to_string(tokens[0]) + ")";
  if (c != nullptr) s += ", " + c->layout->kind() + (c->aliased ? " aliased" : "");
  s += ", table [";
  for (std::size_t i = 0; i < table.size(); ++i) s += (i ? " " : "") + std::to_string(table[i]);
  return s + "]";
}

class harness {
 public:
  explicit harness(kvfuzz::reader& in) : in_(in) {
    gc_ = geometries[in.below(std::size(geometries))];
    cfg_ = kvt::small_config();
    cfg_.geometry = gc_.g;
    cfg_.chunk_tokens = gc_.chunk_tokens;
    cfg_.block_tokens = gc_.block_tokens;
    cfg_.store_partial_chunks = in.flag();
    // One to six chunks, sometimes with a few bytes to spare.
    cfg_.capacity_bytes = (1 + in.below(6)) * cfg_.chunk_bytes() + (in.flag() ? in.below(cfg_.chunk_bytes()) : 0);
    // Copy threads split batches above parallel_copy_bytes; small batches go one by one.
    cfg_.transfer_threads = 1 + static_cast<unsigned>(in.below(3));
    constexpr std::size_t parallel[] = {std::size_t{8} << 20, 256, 2048};
    cfg_.parallel_copy_bytes = parallel[in.below(3)];
    constexpr std::size_t batch[] = {std::size_t{32} << 20, 0, 512, 4096};
    cfg_.transfer_batch_bytes = batch[in.below(4)];
    // How the run ends (read now: the calls use up the rest): bit 0 destroys the engine before
    // its open transfers, bit 1 shuts it down first, bits 2 and 3 leave a store and a retrieve
    // in flight, their tickets waited for once the engine is gone.
    ending_ = in.u8();
    token_bytes_ = cfg_.geometry.token_bytes();
    for (std::size_t b = 0; b < 4; ++b)
      for (std::size_t p = 0; p < prompt_tokens; ++p) bases_[b][p] = base_token(b, p);
    for (std::size_t k = 0; k < made_up_keys_.size(); ++k)
      for (std::size_t i = 0; i < 32; ++i) made_up_keys_[k].bytes[i] = kvfuzz::pattern(0xBEEF + k, i);
    probe_ = {bases_[0].begin(), bases_[0].begin() + 5};
  }

  void run() {
    trace("engine: " + std::to_string(cfg_.geometry.num_layers) + " layers, " + std::to_string(cfg_.chunk_tokens) +
          "-token chunks, " + std::to_string(cfg_.block_tokens) + "-token blocks, capacity " +
          std::to_string(cfg_.capacity_bytes) + " (" + std::to_string(cfg_.chunk_bytes()) + " a chunk), partial " +
          std::to_string(cfg_.store_partial_chunks) + ", threads " + std::to_string(cfg_.transfer_threads));
    auto e = engine_type::create(cfg_);
    KVFUZZ_CHECK(e.has_value(), "create: " + e.error().what());
    engine_.emplace(std::move(*e));
    last_ = counters(engine_->stats());
    for (std::size_t step = 0; step < max_steps && !in_.empty(); ++step) {
      switch (in_.below(16)) {
        case 0: case 1: op_store(); break;
        case 2: op_lookup_then_retrieve(); break;
        case 3: op_retrieve(); break;
        case 4: op_begin(true); break;
        case 5: op_begin(false); break;
        case 6: case 7: op_submit_layer(); break;
        case 8: op_submit_all(); break;
        case 9: op_finish(); break;
        case 10: op_drop(); break;
        case 11: op_save(); break;
        case 12: op_load(); break;
        case 13: op_check_blocks(); break;
        case 14: op_stats(); break;
        default: op_rare(); break;
      }
      check_invariants();
    }
    finish_run();
  }

 private:
  // ---- decoding -----------------------------------------------------------------------------

  // Zero bytes (an input that ran out) decode to the common case everywhere: here a prompt of
  // base 0, one chunk long, unchanged.
  prompt read_prompt() {
    prompt p;
    const std::uint8_t b = in_.u8();
    const std::size_t base = b % 4;
    const std::uint8_t len = in_.u8();
    // Lengths in whole chunks (0..7, then 255: empty) or, with bit 7, any length up to the maximum.
    std::size_t n = 0;
    if (len == 255) n = 0;
    else if (len & 0x80) n = 1 + (len & 0x7F) * (prompt_tokens - 1) / 127;
    else n = std::min(prompt_tokens, (1 + (len & 7)) * cfg_.chunk_tokens);
    p.tokens.assign(bases_[base].begin(), bases_[base].begin() + static_cast<std::ptrdiff_t>(n));
    if (n > 0 && (b & 0x80)) p.tokens[in_.below(n)] ^= static_cast<token_id>(1 + in_.u8());  // diverge somewhere
    return p;
  }

  cache* new_cache() {
    const auto kind = static_cast<cache_kind>(in_.below(cache_kinds));
    caches_.push_back(make_cache(kind, gc_, in_.u8()));
    return caches_.back().get();
  }

  // A block table for `n` tokens: mostly distinct blocks, sometimes a duplicate, an entry out of
  // range, too few entries, or none (identity).
  std::vector<std::int32_t> read_table(const cache& c, std::size_t n) {
    const std::size_t blocks = c.blocks();
    const std::size_t need = (n + c.block_tokens() - 1) / c.block_tokens();
    const std::uint8_t mode = in_.u8() % 16;
    // A permutation drawn from one seed byte, so a table costs the input two bytes.
    std::vector<std::int32_t> perm(blocks);
    for (std::size_t i = 0; i < blocks; ++i) perm[i] = static_cast<std::int32_t>(i);
    std::uint64_t x = in_.u8() + 1;
    for (std::size_t i = blocks; i > 1; --i) {
      x = x * 6364136223846793005ULL + 1442695040888963407ULL;
      std::swap(perm[i - 1], perm[(x >> 33) % i]);
    }
    std::vector<std::int32_t> t(perm.begin(), perm.begin() + static_cast<std::ptrdiff_t>(std::min(need, blocks)));
    switch (mode) {
      case 0: case 13: return {};  // identity
      case 11:  // leading blocks the destination already holds (a retrieve skips them; a store refuses)
        for (std::size_t i = 0, k = in_.below(t.size() + 1); i < k; ++i) t[i] = kvortex::kv_layout::skip_block;
        break;
      case 12:  // a duplicate
        if (t.size() >= 2) t[in_.below(t.size())] = t[in_.below(t.size())];
        break;
      case 14:  // out of range
        if (!t.empty()) t[in_.below(t.size())] = in_.flag() ? -1 : static_cast<std::int32_t>(blocks + in_.below(3));
        break;
      case 15:  // short, or longer than needed
        if (in_.flag() && !t.empty()) t.pop_back();
        else t.insert(t.end(), perm.begin(), perm.begin() + static_cast<std::ptrdiff_t>(in_.below(blocks)));
        break;
      default: break;
    }
    return t;
  }

  // ---- the model ------------------------------------------------------------------------------

  [[nodiscard]] std::size_t chunk_count(std::size_t n) const {
    return n / cfg_.chunk_tokens + (cfg_.store_partial_chunks && n % cfg_.chunk_tokens != 0 ? 1 : 0);
  }
  // Chunks a cache can carry: opaque pages move whole blocks only.
  [[nodiscard]] std::size_t usable_chunks(std::size_t n, const cache& c) const {
    const std::size_t k = chunk_count(n);
    if (k == 0 || c.shape.kind != layout_kind::pages) return k;
    return chunk_tokens_at(n, k - 1) % c.block_tokens() == 0 ? k : k - 1;
  }
  [[nodiscard]] std::size_t chunk_tokens_at(std::size_t n, std::size_t i) const {
    return std::min(cfg_.chunk_tokens, n - i * cfg_.chunk_tokens);
  }
  [[nodiscard]] std::size_t tokens_of_chunks(std::size_t n, std::size_t k) const {
    return std::min(n, k * cfg_.chunk_tokens);
  }

  std::vector<chunk_key> keys_of(std::span<const token_id> tokens) {
    auto k = engine_->chunk_keys(tokens);
    KVFUZZ_CHECK(k.has_value(), "chunk_keys: " + k.error().what());
    KVFUZZ_CHECK(k->size() == chunk_count(tokens.size()), "chunk_keys gives " + std::to_string(k->size()) + " keys for " +
                                                             std::to_string(tokens.size()) + " tokens");
    return *k;
  }

  // Remembers which prefix each chunk key stands for.
  void learn(std::span<const token_id> tokens, std::span<const chunk_key> keys, std::size_t n) {
    for (std::size_t i = 0; i < std::min(n, keys.size()); ++i) {
      const std::size_t ntok = chunk_tokens_at(tokens.size(), i);
      auto [it, fresh] = known_.try_emplace(keys[i]);
      if (fresh) {
        it->second.prefix.assign(tokens.begin(), tokens.begin() + static_cast<std::ptrdiff_t>(i * cfg_.chunk_tokens + ntok));
        it->second.index = i;
        it->second.ntok = ntok;
      } else {
        KVFUZZ_CHECK(it->second.index == i && it->second.ntok == ntok &&
                         std::equal(it->second.prefix.begin(), it->second.prefix.end(), tokens.begin()),
                     "two different prefixes give the same chunk key");
      }
    }
  }

  // Writes the KV of `tokens` into `c` at `table`; returns the chunks whose bytes, gathered back
  // through the table, are not their tokens' KV (duplicate blocks, overlapping layers).
  KVFUZZ_ORACLE std::vector<bool> fill_source(cache& c, std::span<const token_id> tokens, std::span<const std::int32_t> table,
                                std::size_t chunks) {
    const auto& g = cfg_.geometry;
    const std::size_t hb = std::size_t{g.head_dim} * g.element_bytes;
    const auto each = [&](auto&& f) KVFUZZ_ORACLE {
      for (std::size_t pos = 0; pos < tokens.size(); ++pos) {
        const auto block = block_of(c, table, pos);
        if (!block) continue;
        for (std::size_t l = 0; l < g.num_layers; ++l)
          for (std::size_t p = 0; p < g.kv_planes; ++p)
            for (std::size_t h = 0; h < g.kv_heads; ++h) {
              std::byte* at = c.at(l, p, *block, pos % c.block_tokens(), h);
              for (std::size_t b = 0; b < hb; ++b) f(pos, at + b, kvt::kv_byte(tokens[pos], pos, l, p, h * hb + b));
            }
      }
    };
    each([](std::size_t, std::byte* at, std::byte v) KVFUZZ_ORACLE { *at = v; });
    std::vector<bool> unknown(chunks, false);
    each([&](std::size_t pos, std::byte* at, std::byte v) KVFUZZ_ORACLE {
      const std::size_t i = pos / cfg_.chunk_tokens;
      if (i < chunks && *at != v) unknown[i] = true;
    });
    return unknown;
  }

  // Checks `c` after a retrieve of `tokens` that copied the first `n` tokens' layers in `layers`
  // (empty: all): those bytes are the stored KV, every other byte kept its sentinel.
  KVFUZZ_ORACLE void verify_destination(cache& c, std::span<const token_id> tokens, std::span<const std::int32_t> table, std::size_t n,
                          const std::vector<bool>& layers, const char* what,
                          const std::vector<chunk_key>* chain = nullptr) {
    const auto& g = cfg_.geometry;
    const std::size_t hb = std::size_t{g.head_dim} * g.element_bytes;
    // want: 0 = keep the sentinel, 1 = this byte, 2 = unknown content (chunk of unknown bytes)
    std::vector<std::vector<std::uint8_t>> state;
    std::vector<std::vector<std::byte>> want;
    for (const auto& b : c.bufs) {
      state.emplace_back(b.size(), 0);
      want.emplace_back(b.size());
    }
    const auto locate = [&](std::byte* p) KVFUZZ_ORACLE {
      for (std::size_t b = 0; b < c.bufs.size(); ++b) {
        const auto lo = reinterpret_cast<std::uintptr_t>(c.bufs[b].data()), x = reinterpret_cast<std::uintptr_t>(p);
        if (x >= lo && x - lo < c.bufs[b].size()) return std::pair{b, static_cast<std::size_t>(x - lo)};
      }
      kvfuzz::failure(__FILE__, __LINE__, "an element outside the cache");
    };
    const auto keys = chain != nullptr ? *chain : n > 0 ? keys_of(tokens) : std::vector<chunk_key>{};
    for (std::size_t pos = 0; pos < n; ++pos) {
      if (skipped(table, pos, c.block_tokens())) continue;  // not written: keeps its sentinel
      const auto block = block_of(c, table, pos);
      KVFUZZ_CHECK(block.has_value(), std::string(what) + " copied a token its table does not address");
      const auto& key = keys[pos / cfg_.chunk_tokens];
      const bool unknown = unknown_.contains(key);
      KVFUZZ_CHECK(known_.contains(key), std::string(what) + " returned a chunk that was never stored");
      for (std::size_t l = 0; l < g.num_layers; ++l) {
        if (!layers.empty() && !layers[l]) continue;
        for (std::size_t p = 0; p < g.kv_planes; ++p)
          for (std::size_t h = 0; h < g.kv_heads; ++h) {
            const auto [buf, off0] = locate(c.at(l, p, *block, pos % c.block_tokens(), h));
            KVFUZZ_CHECK(off0 + hb <= c.bufs[buf].size(), "an element runs past its cache buffer");
            for (std::size_t b = 0; b < hb; ++b) {
              const std::size_t off = off0 + b;
              const std::byte v = kvt::kv_byte(tokens[pos], pos, l, p, h * hb + b);
              if (state[buf][off] == 1 && want[buf][off] != v && !unknown)
                kvfuzz::failure(__FILE__, __LINE__, std::string(what) +
                                                        " was accepted though two of its destination elements share "
                                                        "memory (duplicate blocks or overlapping layers)");
              if (unknown || state[buf][off] == 2) {
                state[buf][off] = 2;
              } else {
                state[buf][off] = 1;
                want[buf][off] = v;
              }
            }
          }
      }
    }
    for (std::size_t b = 0; b < c.bufs.size(); ++b)
      for (std::size_t i = 0; i < c.bufs[b].size(); ++i) {
        if (state[b][i] == 2) continue;
        const std::byte expect = state[b][i] == 1 ? want[b][i] : sentinel(b, i);
        KVFUZZ_CHECK(c.bufs[b][i] == expect, std::string(what) + ": byte " + std::to_string(i) + " of buffer " +
                                                 std::to_string(b) + (state[b][i] == 1 ? " is not the stored KV" : " was overwritten"));
      }
  }

  // What a made-up or key-API entry holds, nullopt if unknown.
  KVFUZZ_ORACLE std::optional<std::vector<std::byte>> content(const chunk_key& k, std::size_t size) {
    if (unknown_.contains(k)) return std::nullopt;
    if (const auto it = known_.find(k); it != known_.end() && size == it->second.ntok * token_bytes_)
      return canonical(it->second);
    std::vector<std::byte> v(size);
    for (std::size_t i = 0; i < size; ++i) v[i] = key_byte(k, size, i);
    return v;
  }

  // A chunk's bytes as a store writes them: [layer][plane][token][row].
  KVFUZZ_ORACLE std::vector<std::byte> canonical(const key_info& info) {
    const auto& g = cfg_.geometry;
    const std::size_t row = g.row_bytes(), first = info.index * cfg_.chunk_tokens;
    std::vector<std::byte> v(info.ntok * token_bytes_);
    std::size_t at = 0;
    for (std::size_t l = 0; l < g.num_layers; ++l)
      for (std::size_t p = 0; p < g.kv_planes; ++p)
        for (std::size_t t = 0; t < info.ntok; ++t)
          for (std::size_t i = 0; i < row; ++i) v[at++] = kvt::kv_byte(info.prefix[first + t], first + t, l, p, i);
    return v;
  }

  // ---- checks shared by every call ------------------------------------------------------------

  // A call failed: it says why, it changed no counter, and the engine still answers.
  void rejected(const kvortex::error& err, const char* call) {
    trace("  -> " + err.what());
    kvfuzz::check_error(err, call);
    if (stopped_) {
      KVFUZZ_CHECK(err.code == errc::shut_down || err.code == errc::invalid_argument,
                   std::string(call) + " after shutdown: " + err.what());
      return;
    }
    KVFUZZ_CHECK(err.code != errc::shut_down && err.code != errc::internal, std::string(call) + ": " + err.what());
    const auto now = counters(engine_->stats());
    for (std::size_t i = 0; i < now.size(); ++i)
      KVFUZZ_CHECK(now[i] == last_[i], std::string("a rejected ") + call + " changed " + counter_names[i] + " (" +
                                           err.what() + ")");
    const auto probe = engine_->lookup(probe_);
    KVFUZZ_CHECK(probe.has_value(), std::string("lookup after a rejected ") + call + ": " + probe.error().what());
    last_ = counters(engine_->stats());
  }

  // Expects a call after shutdown to fail: with shut_down when its arguments are well-formed
  // (malformed ones may be refused for what they are first).
  template <class R>
  void expect_shut_down(const R& r, const char* call, bool well_formed = true) {
    trace(std::string(call) + " after shutdown -> " + (r ? std::string("success") : r.error().what()));
    KVFUZZ_CHECK(!r.has_value(), std::string(call) + " after shutdown() succeeded");
    kvfuzz::check_error(r.error(), call);
    KVFUZZ_CHECK(r.error().code == errc::shut_down || !well_formed, std::string(call) + " after shutdown(): " + r.error().what());
  }

  void check_invariants() {
    const auto s = engine_->stats();
    KVFUZZ_CHECK(s.current_bytes <= s.capacity_bytes && s.peak_bytes <= s.capacity_bytes,
                 "held " + std::to_string(s.current_bytes) + " (peak " + std::to_string(s.peak_bytes) +
                     ") bytes of a capacity of " + std::to_string(s.capacity_bytes));
    KVFUZZ_CHECK(s.capacity_bytes == cfg_.capacity_bytes, "capacity_bytes changed");
    KVFUZZ_CHECK(s.current_bytes <= s.peak_bytes || stopped_, "current_bytes above peak_bytes");
    if (stopped_) KVFUZZ_CHECK(s.current_bytes == 0 && s.chunks == 0, "bytes held after shutdown()");
    check_histogram(s.lookup_latency, "lookup");
    check_histogram(s.store_latency, "store");
    check_histogram(s.retrieve_latency, "retrieve");
    const auto now = counters(s);
    for (std::size_t i = 0; i < now.size(); ++i)
      KVFUZZ_CHECK(now[i] >= last_[i], std::string(counter_names[i]) + " decreased");
    last_ = now;
  }

  [[nodiscard]] bool open_slots() const {
    return std::any_of(slots_.begin(), slots_.end(), [](const std::optional<slot>& s) { return s.has_value(); });
  }

  // After a store with nothing else in flight, the prefix of the usable chunks that fits in the
  // capacity is found: nothing the token API cannot use may stand in its way.
  void expect_prefix_found(std::span<const token_id> tokens, const cache& c) {
    if (open_slots()) return;
    std::size_t fit = 0, bytes = 0;
    for (std::size_t i = 0; i < usable_chunks(tokens.size(), c); ++i) {
      const std::size_t ntok = chunk_tokens_at(tokens.size(), i);
      if (bytes + ntok * token_bytes_ > cfg_.capacity_bytes) break;
      bytes += ntok * token_bytes_;
      fit += ntok;
    }
    const auto found = engine_->lookup(tokens);
    KVFUZZ_CHECK(found.has_value() && *found >= fit, "after storing " + std::to_string(tokens.size()) +
                                                         " tokens with nothing in flight, lookup finds " +
                                                         std::to_string(found.value_or(0)) + ", but " +
                                                         std::to_string(fit) + " fit in the capacity");
  }

  // ---- the calls --------------------------------------------------------------------------------

  void op_store() {
    const auto p = read_prompt();
    cache* c = new_cache();
    const auto table = read_table(*c, p.tokens.size());
    if (stopped_) {
      expect_shut_down(engine_->store(p.tokens, *c->layout, table), "store",
                       !p.tokens.empty() && table_ok(*c, table, p.tokens.size()));
      return;
    }
    const std::size_t usable = usable_chunks(p.tokens.size(), *c);
    const std::size_t covered = tokens_of_chunks(p.tokens.size(), usable);
    const auto unknown = fill_source(*c, p.tokens, table, usable);
    const bool valid = !p.tokens.empty() && (covered == 0 || table_ok(*c, table, covered));
    trace("store " + describe(p.tokens, table, c));
    auto r = engine_->store(p.tokens, *c->layout, table);
    if (!r) {
      KVFUZZ_CHECK(!valid, "store rejected a valid call: " + r.error().what());
      rejected(r.error(), "store");
      return;
    }
    KVFUZZ_CHECK(valid, "store accepted an empty prompt or a table that does not address its chunks");
    note_stored(p.tokens, usable, unknown);
    const auto w = r->wait();
    if (!w) kvfuzz::check_error(w.error(), "store's ticket");
    KVFUZZ_CHECK(w.has_value(), "a store's copies failed: " + w.error().what());
    trace("  -> " + std::to_string(*w) + " tokens");
    KVFUZZ_CHECK(*w <= covered, "store wrote " + std::to_string(*w) + " tokens of " + std::to_string(covered));
    expect_prefix_found(p.tokens, *c);
  }

  void note_stored(std::span<const token_id> tokens, std::size_t usable, const std::vector<bool>& unknown) {
    if (usable == 0) return;
    const auto keys = keys_of(tokens);
    learn(tokens, keys, usable);
    for (std::size_t i = 0; i < usable; ++i)
      if (unknown[i]) unknown_.insert(keys[i]);
  }

  // What a retrieve must do: a valid call is accepted unless its destination shares memory.
  struct retrieve_case {
    bool valid;           // the table addresses the tokens
    bool shared_memory;   // duplicate blocks among the entries, or overlapping layers
  };
  retrieve_case classify_retrieve(const cache& c, std::span<const token_id> tokens, std::span<const std::int32_t> table) {
    return {!tokens.empty() && table_ok(c, table, tokens.size(), /*skips=*/true),
            c.aliased || has_duplicate(c, table, tokens.size())};
  }

  void check_retrieve_rejection(const kvortex::error& err, const retrieve_case& rc, const char* call) {
    if (!rc.valid) return;
    KVFUZZ_CHECK(rc.shared_memory, std::string(call) + " rejected a valid call: " + err.what());
    KVFUZZ_CHECK(err.code == errc::invalid_argument || err.code == errc::invalid_layout,
                 std::string(call) + " into shared memory must fail with invalid_argument or invalid_layout: " + err.what());
  }
  void check_retrieve_accepted(const retrieve_case& rc, const char* call) {
    KVFUZZ_CHECK(rc.valid, std::string(call) + " accepted an empty prompt or a table that does not address it");
    KVFUZZ_CHECK(!rc.shared_memory, std::string(call) + " accepted a destination whose blocks or layers share memory");
  }

  void op_retrieve() {
    const auto p = read_prompt();
    cache* c = new_cache();
    const auto table = read_table(*c, p.tokens.size());
    fill_sentinel(*c);
    if (stopped_) {
      expect_shut_down(engine_->retrieve(p.tokens, *c->layout, table), "retrieve",
                       classify_retrieve(*c, p.tokens, table).valid && !classify_retrieve(*c, p.tokens, table).shared_memory);
      return;
    }
    const auto rc = classify_retrieve(*c, p.tokens, table);
    trace("retrieve " + describe(p.tokens, table, c));
    auto r = engine_->retrieve(p.tokens, *c->layout, table);
    if (!r) {
      check_retrieve_rejection(r.error(), rc, "retrieve");
      rejected(r.error(), "retrieve");
      return;
    }
    check_retrieve_accepted(rc, "retrieve");
    const auto n = r->wait();
    if (!n) kvfuzz::check_error(n.error(), "retrieve's ticket");
    KVFUZZ_CHECK(n.has_value(), "a retrieve's copies failed: " + n.error().what());
    trace("  -> " + std::to_string(*n) + " tokens");
    check_retrieved_count(*n, p.tokens.size(), *c);
    verify_destination(*c, p.tokens, table, *n, {}, "retrieve");
  }

  void check_retrieved_count(std::size_t n, std::size_t tokens, const cache& c) {
    const std::size_t usable = tokens_of_chunks(tokens, usable_chunks(tokens, c));
    KVFUZZ_CHECK(n <= usable && (n % cfg_.chunk_tokens == 0 || n == usable),
                 "retrieve returned " + std::to_string(n) + " tokens of " + std::to_string(tokens) + ", not a chunk boundary");
  }

  // lookup, then at once a retrieve of the same prompt: both walk the same chain.
  void op_lookup_then_retrieve() {
    const auto p = read_prompt();
    const auto found = engine_->lookup(p.tokens);
    trace("lookup " + describe(p.tokens, {}, nullptr) + " -> " + (found ? std::to_string(*found) : found.error().what()));
    if (stopped_) {
      expect_shut_down(found, "lookup", !p.tokens.empty());
      return;
    }
    if (p.tokens.empty()) {
      KVFUZZ_CHECK(!found && found.error().code == errc::invalid_argument, "lookup of an empty prompt");
      rejected(found.error(), "lookup");
      return;
    }
    KVFUZZ_CHECK(found.has_value(), "lookup: " + found.error().what());
    KVFUZZ_CHECK(*found <= p.tokens.size(), "lookup found more tokens than asked about");
    last_ = counters(engine_->stats());
    auto kind = static_cast<cache_kind>(in_.below(cache_kinds - 1));  // not aliased
    caches_.push_back(make_cache(kind, gc_, 0));
    cache* c = caches_.back().get();
    fill_sentinel(*c);
    std::vector<std::int32_t> table;
    if (in_.flag()) {
      table.resize(c->blocks());
      for (std::size_t i = 0; i < table.size(); ++i) table[i] = static_cast<std::int32_t>(table.size() - 1 - i);
    }
    auto r = engine_->retrieve(p.tokens, *c->layout, table);
    KVFUZZ_CHECK(r.has_value(), "retrieve after lookup: " + r.error().what());
    const auto n = r->wait();
    KVFUZZ_CHECK(n.has_value(), "retrieve after lookup: " + n.error().what());
    const std::size_t usable = tokens_of_chunks(p.tokens.size(), usable_chunks(p.tokens.size(), *c));
    KVFUZZ_CHECK(std::min(*found, usable) == *n, "lookup found " + std::to_string(*found) +
                                                     " tokens, a retrieve right after it copied " + std::to_string(*n));
    verify_destination(*c, p.tokens, table, *n, {}, "retrieve after lookup");
  }

  std::optional<std::size_t> free_slot() {
    for (std::size_t i = 0; i < max_slots; ++i)
      if (!slots_[i]) return i;
    return std::nullopt;
  }

  void op_begin(bool storing) {
    const auto i = free_slot();
    const auto p = read_prompt();
    cache* c = new_cache();
    const auto table = read_table(*c, p.tokens.size());
    if (!i) return;
    if (stopped_) {
      if (storing)
        expect_shut_down(engine_->begin_store(p.tokens, *c->layout, table), "begin_store",
                         !p.tokens.empty() && table_ok(*c, table, p.tokens.size()));
      else
        expect_shut_down(engine_->begin_retrieve(p.tokens, *c->layout, table), "begin_retrieve",
                         classify_retrieve(*c, p.tokens, table).valid && !classify_retrieve(*c, p.tokens, table).shared_memory);
      return;
    }
    trace(std::string(storing ? "begin_store " : "begin_retrieve ") + describe(p.tokens, table, c) + " in slot " +
          std::to_string(*i));
    slot s{storing, std::nullopt, c, p.tokens, table, std::vector<bool>(cfg_.geometry.num_layers, false)};
    if (storing) {
      const std::size_t usable = usable_chunks(p.tokens.size(), *c);
      const std::size_t covered = tokens_of_chunks(p.tokens.size(), usable);
      const auto unknown = fill_source(*c, p.tokens, table, usable);
      const bool valid = !p.tokens.empty() && (covered == 0 || table_ok(*c, table, covered));
      auto t = engine_->begin_store(p.tokens, *c->layout, table);
      if (!t) {
        KVFUZZ_CHECK(!valid, "begin_store rejected a valid call: " + t.error().what());
        rejected(t.error(), "begin_store");
        return;
      }
      KVFUZZ_CHECK(valid, "begin_store accepted an empty prompt or a table that does not address its chunks");
      note_stored(p.tokens, usable, unknown);
      s.hit = t->tokens();
      KVFUZZ_CHECK(s.hit <= covered, "begin_store will write more tokens than its chunks hold");
      s.transfer.emplace(std::move(*t));
    } else {
      fill_sentinel(*c);
      const auto rc = classify_retrieve(*c, p.tokens, table);
      auto t = engine_->begin_retrieve(p.tokens, *c->layout, table);
      if (!t) {
        check_retrieve_rejection(t.error(), rc, "begin_retrieve");
        rejected(t.error(), "begin_retrieve");
        return;
      }
      check_retrieve_accepted(rc, "begin_retrieve");
      s.hit = t->tokens();
      check_retrieved_count(s.hit, p.tokens.size(), *c);
      s.transfer.emplace(std::move(*t));
    }
    slots_[*i].emplace(std::move(s));
  }

  // One of the open transfers (the byte counts among the open ones), or none.
  std::optional<std::size_t> pick_open() {
    std::vector<std::size_t> open;
    for (std::size_t i = 0; i < max_slots; ++i)
      if (slots_[i]) open.push_back(i);
    const std::uint8_t b = in_.u8();
    if (open.empty()) return std::nullopt;
    return open[b % open.size()];
  }
  slot* pick_slot() {
    const auto i = pick_open();
    return i ? &*slots_[*i] : nullptr;
  }

  void op_submit_layer() {
    slot* s = pick_slot();
    const std::size_t layers = cfg_.geometry.num_layers;
    const std::size_t layer = in_.below(layers + 1);  // one past the end now and then
    if (s == nullptr) return;
    trace("submit_layer " + std::to_string(layer));
    const auto r = s->transfer->submit_layer(layer);
    if (stopped_) {
      KVFUZZ_CHECK(!r.has_value(), "submit_layer after shutdown() succeeded");
      kvfuzz::check_error(r.error(), "submit_layer");
      KVFUZZ_CHECK(r.error().code == errc::shut_down || (layer >= layers && r.error().code == errc::invalid_argument),
                   "submit_layer after shutdown(): " + r.error().what());
      return;
    }
    const bool valid = layer < layers && !s->sent[layer] && !s->all_sent;
    if (!r) {
      kvfuzz::check_error(r.error(), "submit_layer");
      KVFUZZ_CHECK(!valid && r.error().code == errc::invalid_argument, "submit_layer: " + r.error().what());
      return;
    }
    KVFUZZ_CHECK(valid, "submit_layer accepted layer " + std::to_string(layer) + " twice or out of range");
    s->sent[layer] = true;
  }

  void op_submit_all() {
    slot* s = pick_slot();
    if (s == nullptr) return;
    trace("submit_all");
    const auto r = s->transfer->submit_all();
    if (stopped_) {
      KVFUZZ_CHECK(!r.has_value(), "submit_all after shutdown() succeeded");
      kvfuzz::check_error(r.error(), "submit_all");
      KVFUZZ_CHECK(r.error().code == errc::shut_down || r.error().code == errc::invalid_argument,
                   "submit_all after shutdown(): " + r.error().what());
      return;
    }
    const bool valid = !s->all_sent && std::none_of(s->sent.begin(), s->sent.end(), [](bool b) { return b; });
    if (!r) {
      kvfuzz::check_error(r.error(), "submit_all");
      KVFUZZ_CHECK(!valid && r.error().code == errc::invalid_argument, "submit_all: " + r.error().what());
      return;
    }
    KVFUZZ_CHECK(valid, "submit_all accepted after layers were submitted");
    s->all_sent = true;
    std::fill(s->sent.begin(), s->sent.end(), true);
  }

  void op_finish() {
    const auto picked = pick_open();
    if (!picked) return;
    const std::size_t i = *picked;
    slot& s = *slots_[i];
    trace("finish slot " + std::to_string(i));
    const bool complete = std::all_of(s.sent.begin(), s.sent.end(), [](bool b) { return b; });
    auto t = s.transfer->finish();
    // A finished transfer is moved from: it refuses everything from now on.
    const auto again = s.transfer->finish();
    KVFUZZ_CHECK(!again && again.error().code == errc::invalid_argument, "finish() twice");
    const auto layer_again = s.transfer->submit_layer(0);
    KVFUZZ_CHECK(!layer_again && layer_again.error().code == errc::invalid_argument, "submit_layer after finish()");
    const bool cut_off = stopped_;  // every slot was opened before shutdown
    std::optional<kvortex::result<std::size_t>> outcome;
    if (t) outcome = t->wait();
    else kvfuzz::check_error(t.error(), "finish");
    if (outcome && !*outcome) kvfuzz::check_error(outcome->error(), "a layered transfer's ticket");
    const bool ok = outcome && outcome->has_value();
    const errc code = ok ? errc::internal : (t ? outcome->error().code : t.error().code);
    if (!ok) trace("  -> " + std::string(kvortex::to_string(code)) + (t ? " (from the ticket)" : ""));
    if (cut_off) {
      KVFUZZ_CHECK(!ok, "finish() of a transfer cut off by shutdown() succeeded");
      KVFUZZ_CHECK(code == errc::shut_down, std::string("finish() after shutdown(): ") + std::string(kvortex::to_string(code)));
    } else if (complete) {
      KVFUZZ_CHECK(ok, std::string("finish() of a complete transfer failed: ") + std::string(kvortex::to_string(code)));
      KVFUZZ_CHECK(**outcome == s.hit, "finish() yields " + std::to_string(**outcome) + " tokens, tokens() said " +
                                           std::to_string(s.hit));
      trace("  -> " + std::to_string(s.hit) + " tokens");
      if (!s.storing) verify_destination(*s.c, s.tokens, s.table, s.hit, {}, "layered retrieve");
    } else if (s.hit > 0) {
      KVFUZZ_CHECK(!ok && code == errc::invalid_argument,
                   std::string("finish() with layers never submitted must fail with invalid_argument, got ") +
                       (ok ? "success" : std::string(kvortex::to_string(code))));
      if (!s.storing && outcome) verify_destination(*s.c, s.tokens, s.table, s.hit, s.sent, "partial layered retrieve");
    }
    slots_[i].reset();
  }

  void op_drop() {
    const auto i = pick_open();
    if (!i) return;
    trace("drop slot " + std::to_string(*i));
    slots_[*i].reset();  // rolls a store back, unpins a retrieve; its cache stays alive (copies may run)
  }

  // Keys for the key API: chunks of a prompt (known to the oracle or not yet), or made up.
  chunk_key read_key(std::size_t& canonical_size) {
    canonical_size = 0;
    const std::uint8_t src = in_.u8() % 4;
    if (src < 2 && !stopped_) {
      const auto p = read_prompt();
      if (!p.tokens.empty()) {
        const auto keys = keys_of(p.tokens);
        if (!keys.empty()) {
          const std::size_t i = in_.below(keys.size());
          learn(p.tokens, keys, i + 1);
          canonical_size = chunk_tokens_at(p.tokens.size(), i) * token_bytes_;
          return keys[i];
        }
      }
    }
    return made_up_keys_[in_.below(made_up_keys_.size())];
  }

  std::size_t read_size(std::size_t canonical_size) {
    switch (in_.u8() % 8) {
      case 4: return 1 + in_.below(64);
      case 5: return cfg_.chunk_bytes();
      case 6: return 1 + in_.below(cfg_.capacity_bytes);
      case 7: return in_.u8() < 16 ? 0 : cfg_.capacity_bytes + 1;  // invalid
      default: return canonical_size != 0 ? canonical_size : cfg_.chunk_bytes() / 2;
    }
  }

  void op_save() {
    const std::uint8_t nb = in_.u8();
    const std::size_t n = nb == 255 ? 0 : 1 + nb % 4;  // 255: an empty list
    std::vector<chunk_key> keys;
    std::vector<std::size_t> sizes;
    for (std::size_t i = 0; i < n; ++i) {
      std::size_t cs = 0;
      keys.push_back(read_key(cs));
      sizes.push_back(read_size(cs));
    }
    std::vector<std::vector<std::byte>> bufs;
    std::vector<const std::byte*> ptrs;
    for (std::size_t i = 0; i < n; ++i) {
      const auto v = content(keys[i], sizes[i]);
      bufs.push_back(v ? *v : std::vector<std::byte>(sizes[i]));
      ptrs.push_back(bufs.back().data());
    }
    const std::uint8_t twist = in_.u8();
    bool bad = n == 0;
    for (std::size_t i = 0; i < n; ++i) bad = bad || sizes[i] == 0 || sizes[i] > cfg_.capacity_bytes;
    std::set<chunk_key> unknown_now;
    if (twist >= 240 && n > 0) {
      ptrs[in_.below(n)] = nullptr;
      bad = true;
    } else if (twist >= 232 && n > 0) {
      sizes.pop_back();
      bad = true;
    } else if (twist >= 216 && n >= 2) {
      // Two keys from one source: valid, but the second holds the first's bytes.
      const std::size_t a = in_.below(n), b = in_.below(n);
      if (a != b && sizes[a] == sizes[b] && !(keys[a] == keys[b])) {
        ptrs[b] = ptrs[a];
        unknown_now.insert(keys[b]);
      }
    }
    if (stopped_) {
      if (!bad) expect_shut_down(engine_->save_blocks(keys, ptrs, sizes), "save_blocks");
      return;
    }
    // Any of these keys may now hold what this call wrote.
    for (const auto& k : unknown_now) unknown_.insert(k);
    trace("save_blocks of " + std::to_string(n) + " keys" + (bad ? " (malformed)" : ""));
    for (std::size_t i = 0; i < n; ++i)
      trace("  key " + keys[i].hex().substr(0, 8) + (known_.contains(keys[i]) ? " (a chunk)" : "") + ", " +
            std::to_string(i < sizes.size() ? sizes[i] : 0) + " bytes");
    const auto r = engine_->save_blocks(keys, ptrs, sizes);
    if (!r) {
      KVFUZZ_CHECK(bad, "save_blocks rejected a valid call: " + r.error().what());
      KVFUZZ_CHECK(r.error().code == errc::invalid_argument || r.error().code == errc::size_mismatch, r.error().what());
      rejected(r.error(), "save_blocks");
      return;
    }
    KVFUZZ_CHECK(!bad, "save_blocks accepted a null pointer, a zero or oversized size, or mismatched lists");
    trace("  -> " + std::to_string(*r) + " stored");
    KVFUZZ_CHECK(*r <= n, "save_blocks stored more keys than it was given");
  }

  void op_load() {
    const std::uint8_t nb = in_.u8();
    const std::size_t n = nb == 255 ? 0 : 1 + nb % 4;
    std::vector<chunk_key> keys;
    std::vector<std::size_t> sizes;
    for (std::size_t i = 0; i < n; ++i) {
      std::size_t cs = 0;
      keys.push_back(read_key(cs));
      sizes.push_back(read_size(cs));
    }
    std::vector<std::vector<std::byte>> bufs;
    std::vector<std::byte*> ptrs;
    for (std::size_t i = 0; i < n; ++i) {
      bufs.emplace_back(sizes[i]);
      for (std::size_t j = 0; j < sizes[i]; ++j) bufs[i][j] = sentinel(i, j);
      ptrs.push_back(bufs[i].data());
    }
    const std::uint8_t twist = in_.u8();
    bool bad = n == 0;
    for (std::size_t i = 0; i < n; ++i) bad = bad || sizes[i] == 0 || sizes[i] > cfg_.capacity_bytes;
    bool overlap = false;
    if (twist >= 240 && n > 0) {
      ptrs[in_.below(n)] = nullptr;
      bad = true;
    } else if (twist >= 232 && n > 0) {
      sizes.pop_back();
      bad = true;
    } else if (twist >= 216 && n >= 2) {
      // Two destinations in one buffer: must be rejected.
      const std::size_t a = in_.below(n), b = in_.below(n);
      if (a != b && sizes[b] <= sizes[a]) {
        ptrs[b] = ptrs[a] + in_.below(sizes[a] - sizes[b] + 1);
        overlap = true;
      }
    }
    if (stopped_) {
      if (!bad) expect_shut_down(engine_->load_blocks(keys, ptrs, sizes), "load_blocks", !overlap);
      return;
    }
    trace("load_blocks of " + std::to_string(n) + " keys" + (bad ? " (malformed)" : "") + (overlap ? " (overlapping)" : ""));
    const auto r = engine_->load_blocks(keys, ptrs, sizes);
    if (!r) {
      const errc code = r.error().code;
      // Malformed arguments are found before any key is looked up; missing keys and other sizes
      // are not_found and size_mismatch.
      if (bad)
        KVFUZZ_CHECK(code == errc::invalid_argument || code == errc::size_mismatch, r.error().what());
      else if (!overlap)
        KVFUZZ_CHECK(code == errc::not_found || code == errc::size_mismatch, r.error().what());
      else
        KVFUZZ_CHECK(code == errc::invalid_argument || code == errc::not_found || code == errc::size_mismatch, r.error().what());
      for (std::size_t i = 0; i < n; ++i)
        for (std::size_t j = 0; j < bufs[i].size(); ++j)
          KVFUZZ_CHECK(bufs[i][j] == sentinel(i, j), "a rejected load_blocks wrote into destination " + std::to_string(i));
      rejected(r.error(), "load_blocks");
      return;
    }
    trace("  -> loaded");
    KVFUZZ_CHECK(!bad, "load_blocks accepted a null pointer, a zero or oversized size, or mismatched lists");
    KVFUZZ_CHECK(!overlap, "load_blocks accepted overlapping destinations");
    for (std::size_t i = 0; i < n; ++i) {
      const auto want = content(keys[i], sizes[i]);
      if (!want) continue;
      KVFUZZ_CHECK(std::equal(want->begin(), want->end(), bufs[i].begin()),
                   "load_blocks: key " + std::to_string(i) + " (" + std::to_string(sizes[i]) +
                       " bytes) does not hold what was stored");
    }
  }

  void op_check_blocks() {
    const auto p = read_prompt();
    if (stopped_) {
      const std::vector<chunk_key> one{made_up_keys_[0]};
      expect_shut_down(engine_->check_blocks(one), "check_blocks");
      return;
    }
    std::vector<chunk_key> keys;
    if (!p.tokens.empty()) keys = keys_of(p.tokens);
    const std::size_t chain = keys.size();
    for (std::size_t i = 0, extra = in_.below(3); i < extra; ++i) keys.push_back(made_up_keys_[in_.below(made_up_keys_.size())]);
    const auto m = engine_->check_blocks(keys);
    if (keys.empty()) {
      KVFUZZ_CHECK(!m && m.error().code == errc::invalid_argument, "check_blocks of an empty list");
      rejected(m.error(), "check_blocks");
      return;
    }
    KVFUZZ_CHECK(m.has_value() && m->size() == keys.size(), "check_blocks: " + (m ? std::string("wrong size") : m.error().what()));
    const auto now = counters(engine_->stats());
    for (std::size_t i = 0; i < now.size(); ++i)
      KVFUZZ_CHECK(now[i] == last_[i], std::string("check_blocks changed ") + counter_names[i]);
    // What lookup finds right after must be marked present.
    if (chain > 0) {
      const auto found = engine_->lookup(p.tokens);
      KVFUZZ_CHECK(found.has_value(), "lookup: " + found.error().what());
      const std::size_t hit = (*found + cfg_.chunk_tokens - 1) / cfg_.chunk_tokens;
      for (std::size_t i = 0; i < hit; ++i) KVFUZZ_CHECK(m->test(i), "lookup finds a chunk check_blocks calls absent");
    }
  }

  void op_stats() {
    const auto s = engine_->stats();
    check_prometheus(kvortex::to_prometheus(s), "kvortex");
    std::string prefix = in_.text(12);
    if (in_.flag()) prefix = "llm_kv";
    bool valid = !prefix.empty();
    for (std::size_t i = 0; i < prefix.size(); ++i) {
      const char c = prefix[i];
      const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
      valid = valid && (alpha || (i > 0 && c >= '0' && c <= '9'));
    }
    const auto text = kvortex::to_prometheus(s, prefix);
    if (!valid) {
      KVFUZZ_CHECK(!text && text.error().code == errc::invalid_argument, "to_prometheus accepted the prefix \"" + prefix + "\"");
      kvfuzz::check_error(text.error(), "to_prometheus");
    } else {
      KVFUZZ_CHECK(text.has_value(), "to_prometheus rejected the prefix \"" + prefix + "\"");
      check_prometheus(*text, prefix);
    }
  }

  void op_rare() {
    switch (in_.below(8)) {
      case 0: op_shutdown(); break;
      case 1: op_chunk_keys(); break;
      case 2: {  // a layout of another geometry
        if (stopped_) break;
        const auto p = read_prompt();
        if (p.tokens.empty()) break;
        geometry_choice other = gc_;
        other.g.num_layers += 1;
        auto c = make_cache(cache_kind::flash_nhd, other, 0);
        caches_.push_back(std::move(c));
        auto r = in_.flag() ? engine_->store(p.tokens, *caches_.back()->layout) : engine_->retrieve(p.tokens, *caches_.back()->layout);
        KVFUZZ_CHECK(!r && r.error().code == errc::size_mismatch, "a layout of another geometry was accepted");
        rejected(r.error(), "store or retrieve with another geometry");
        break;
      }
      case 3: {  // a device layout on a host engine
        if (stopped_) break;
        const auto p = read_prompt();
        if (p.tokens.empty()) break;
        caches_.push_back(make_cache(cache_kind::flash_nhd, gc_, 0));
        auto lay = *caches_.back()->layout;
        lay.on_device();
        auto r = engine_->retrieve(p.tokens, lay);
        KVFUZZ_CHECK(!r && r.error().code == errc::unsupported, "a device layout was accepted by a host engine");
        rejected(r.error(), "retrieve into device memory");
        break;
      }
      case 4: {  // empty token lists
        if (stopped_) break;
        caches_.push_back(make_cache(cache_kind::flash_nhd, gc_, 0));
        const std::span<const token_id> none;
        auto r = engine_->store(none, *caches_.back()->layout);
        KVFUZZ_CHECK(!r && r.error().code == errc::invalid_argument, "store of no tokens");
        rejected(r.error(), "store");
        auto k = engine_->chunk_keys(none);
        KVFUZZ_CHECK(!k && k.error().code == errc::invalid_argument, "chunk_keys of no tokens");
        rejected(k.error(), "chunk_keys");
        break;
      }
      case 5: {  // move the engine away and back: the moved-from one refuses everything
        trace("move the engine away and back");
        engine_type moved(std::move(*engine_));
        const auto r = engine_->lookup(probe_);
        KVFUZZ_CHECK(!r && r.error().code == errc::shut_down, "a moved-from engine answered lookup");
        const auto k = engine_->chunk_keys(probe_);
        KVFUZZ_CHECK(!k && k.error().code == errc::shut_down, "a moved-from engine answered chunk_keys");
        KVFUZZ_CHECK(engine_->stats().capacity_bytes == 0, "a moved-from engine reports another's counters");
        *engine_ = std::move(moved);
        KVFUZZ_CHECK(engine_->config().capacity_bytes == cfg_.capacity_bytes, "config() after moving back");
        break;
      }
      default: op_stats(); break;
    }
  }

  void op_chunk_keys() {
    const auto p = read_prompt();
    if (p.tokens.empty()) return;
    if (stopped_) {
      expect_shut_down(engine_->chunk_keys(p.tokens), "chunk_keys");
      return;
    }
    const auto all = keys_of(p.tokens);
    // The chain of a prefix of whole chunks is a prefix of the chain.
    const std::size_t whole = p.tokens.size() / cfg_.chunk_tokens;
    if (whole > 0) {
      const std::size_t k = 1 + in_.below(whole);
      const auto part = keys_of(std::span(p.tokens).first(k * cfg_.chunk_tokens));
      KVFUZZ_CHECK(std::equal(part.begin(), part.end(), all.begin()), "the chain of a prefix differs");
    }
    KVFUZZ_CHECK(keys_of(p.tokens) == all, "chunk_keys is not deterministic");
  }

  void op_shutdown() {
    trace("shutdown");
    engine_->shutdown();
    stopped_ = true;
    check_invariants();
    expect_shut_down(engine_->lookup(probe_), "lookup");
  }

  void finish_run() {
    // A store and a retrieve still in flight when the engine goes: their tickets stay usable.
    std::optional<kvortex::transfer_ticket> stored, retrieved;
    const prompt p{std::vector<token_id>(bases_[0].begin(), bases_[0].begin() + static_cast<std::ptrdiff_t>(cfg_.chunk_tokens))};
    cache* src = nullptr;
    cache* dst = nullptr;
    std::vector<chunk_key> chain;
    if (!stopped_ && (ending_ & 4) != 0) {
      caches_.push_back(make_cache(cache_kind::flash_hnd, gc_, 0));
      src = caches_.back().get();
      const auto unknown = fill_source(*src, p.tokens, {}, 1);
      note_stored(p.tokens, 1, unknown);
      auto t = engine_->store(p.tokens, *src->layout);
      KVFUZZ_CHECK(t.has_value(), "store at the end: " + t.error().what());
      stored.emplace(*t);
    }
    if (!stopped_ && (ending_ & 8) != 0) {
      caches_.push_back(make_cache(cache_kind::flashinfer_nhd, gc_, 0));
      dst = caches_.back().get();
      fill_sentinel(*dst);
      chain = keys_of(p.tokens);
      auto t = engine_->retrieve(p.tokens, *dst->layout);
      KVFUZZ_CHECK(t.has_value(), "retrieve at the end: " + t.error().what());
      retrieved.emplace(*t);
    }
    trace(std::string("end: ") + ((ending_ & 1) != 0 ? "engine first" : "transfers first") +
          ((ending_ & 2) != 0 ? ", after shutdown" : ""));
    // Destroy the engine before its open transfers now and then: they must outlive it safely.
    const bool engine_first = (ending_ & 1) != 0;
    if (!engine_first)
      for (auto& s : slots_) s.reset();
    if (!stopped_ && (ending_ & 2) != 0) op_shutdown();
    engine_.reset();
    for (auto& s : slots_) s.reset();
    if (stored) {
      KVFUZZ_CHECK(stored->ready(), "a store's ticket is not ready after its engine is gone");
      const auto w = stored->wait();
      KVFUZZ_CHECK(w.has_value() && *w <= cfg_.chunk_tokens, "a store in flight at the end: " +
                                                                 (w ? std::to_string(*w) + " tokens" : w.error().what()));
    }
    if (retrieved) {
      KVFUZZ_CHECK(retrieved->ready(), "a retrieve's ticket is not ready after its engine is gone");
      const auto n = retrieved->wait();
      KVFUZZ_CHECK(n.has_value(), "a retrieve in flight at the end: " + n.error().what());
      verify_destination(*dst, p.tokens, {}, *n, {}, "retrieve in flight at the end", &chain);
    }
  }

  kvfuzz::reader& in_;
  geometry_choice gc_{};
  kvortex::engine_config cfg_;
  std::size_t token_bytes_{0};
  std::array<std::array<token_id, prompt_tokens>, 4> bases_{};
  std::array<chunk_key, 6> made_up_keys_{};
  std::vector<token_id> probe_;
  // Caches outlive every transfer (a dropped one's copies may still be running): declared first.
  std::vector<std::unique_ptr<cache>> caches_;
  std::optional<engine_type> engine_;
  std::array<std::optional<slot>, max_slots> slots_;
  std::map<chunk_key, key_info> known_;
  std::set<chunk_key> unknown_;
  std::vector<std::uint64_t> last_;
  bool stopped_{false};
  std::uint8_t ending_{0};
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  kvfuzz::reader in(data, size);
  harness h(in);
  h.run();
  return 0;
}
