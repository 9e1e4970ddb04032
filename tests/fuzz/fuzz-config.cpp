// Fuzz target: engine_config fields from bytes -> validate(), checked against the documented
// rules (config.hpp) in both directions. An accepted configuration small enough to try (capacity
// at most 64 MiB, at most 8 copy threads) must give a host_engine or an error, never a crash or a
// hang; an engine it gives must report its configuration, start empty, and store and retrieve one
// prompt bit-exactly through a contiguous cache of that geometry.

#include "fuzz_support.hpp"
#include "test_support.hpp"

#include <algorithm>

namespace {

using kvortex::engine_config;
using kvortex::errc;

constexpr std::size_t max_try_capacity = std::size_t{64} << 20;
constexpr unsigned max_try_threads = 8;
constexpr std::size_t max_round_trip_bytes = std::size_t{1} << 20;

engine_config read_config(kvfuzz::reader& in) {
  engine_config c;
  c.ns.model_id = in.text(24);
  c.ns.dtype = in.text(8);
  c.ns.layout = in.text(8);
  c.ns.cache_salt = in.text(8);
  c.ns.tp_size = static_cast<std::uint32_t>(in.size_value(4));
  c.ns.tp_rank = static_cast<std::uint32_t>(in.size_value(4));
  auto& g = c.geometry;
  g.num_layers = static_cast<std::uint32_t>(in.size_value(6));
  g.kv_planes = static_cast<std::uint32_t>(in.size_value(2));
  g.kv_heads = static_cast<std::uint32_t>(in.size_value(8));
  g.head_dim = static_cast<std::uint32_t>(in.size_value(64));
  const std::uint8_t eb = in.u8();
  g.element_bytes = eb < 224 ? 1u << (eb % 4) : static_cast<std::uint32_t>(eb % 10);
  c.block_tokens = in.size_value(32);
  // Mostly a multiple of block_tokens, as required; sometimes anything.
  c.chunk_tokens = in.u8() < 224 ? c.block_tokens * in.size_value(8) : in.size_value(512);
  const std::uint64_t chunk = c.chunk_bytes();
  c.capacity_bytes = in.u8() < 224 ? chunk * in.size_value(8) + (in.flag() ? in.below(chunk + 1) : 0) : in.size_value(1 << 20);
  c.store_partial_chunks = in.flag();
  c.transfer_threads = static_cast<unsigned>(in.u8() < 224 ? in.below(9) : in.size_value(512));
  c.parallel_copy_bytes = in.size_value(1 << 16);
  c.transfer_batch_bytes = in.size_value(1 << 16);
  c.numa_node = static_cast<int>(static_cast<std::int8_t>(in.u8()));
  return c;
}

// validate()'s documented rules, independently; nullopt when they all hold.
std::optional<std::string> broken_rule(const engine_config& c) {
  const auto& g = c.geometry;
  if (g.num_layers == 0) return "num_layers";
  if (g.kv_planes != 1 && g.kv_planes != 2) return "kv_planes";
  if (g.kv_heads == 0) return "kv_heads";
  if (g.head_dim == 0) return "head_dim";
  if (g.element_bytes != 1 && g.element_bytes != 2 && g.element_bytes != 4 && g.element_bytes != 8) return "element_bytes";
  if (c.block_tokens == 0) return "block_tokens";
  if (c.chunk_tokens == 0 || c.chunk_tokens % c.block_tokens != 0) return "chunk_tokens";
  const auto chunk = kvfuzz::mul({g.num_layers, g.kv_planes, g.kv_heads, g.head_dim, g.element_bytes, c.chunk_tokens});
  if (!chunk || *chunk > (std::uint64_t{1} << 62)) return "chunk size";
  if (c.ns.tp_size == 0 || c.ns.tp_rank >= c.ns.tp_size) return "tp_rank";
  if (c.transfer_threads > engine_config::max_transfer_threads) return "transfer_threads";
  if (c.capacity_bytes < *chunk) return "capacity_bytes";
  return std::nullopt;
}

// One prompt through a contiguous cache: what fits is stored, found and copied back bit-exactly.
void round_trip(kvortex::host_engine& e, const engine_config& c, kvfuzz::reader& in) {
  const auto& g = c.geometry;
  const std::size_t token_bytes = g.token_bytes();
  const std::size_t max_tokens = std::min<std::size_t>(max_round_trip_bytes / token_bytes, 4 * c.chunk_tokens);
  if (max_tokens == 0) return;
  const std::size_t n = 1 + in.below(max_tokens);
  const auto tokens = kvt::make_tokens(n, in.u8());
  const std::size_t row = g.row_bytes();
  std::vector<std::vector<std::byte>> src(g.num_layers, std::vector<std::byte>(g.kv_planes * n * row));
  std::vector<std::byte*> ptrs;
  for (auto& l : src) ptrs.push_back(l.data());
  for (std::size_t l = 0; l < g.num_layers; ++l)
    for (std::size_t p = 0; p < g.kv_planes; ++p)
      for (std::size_t t = 0; t < n; ++t)
        for (std::size_t i = 0; i < row; ++i) src[l][(p * n + t) * row + i] = kvt::kv_byte(tokens[t], t, l, p, i);
  const auto lay = kvortex::kv_layout::contiguous(ptrs, g, n);
  KVFUZZ_CHECK(lay.has_value(), "a contiguous layout of a valid geometry was rejected: " + lay.error().what());

  const auto stored = e.store(tokens, *lay);
  if (!stored) kvfuzz::check_error(stored.error(), "store");
  KVFUZZ_CHECK(stored.has_value(), "store into a fresh engine failed: " + stored.error().what());
  const auto written = stored->wait();
  if (!written) kvfuzz::check_error(written.error(), "store's ticket");
  KVFUZZ_CHECK(written.has_value(), "a store's copies failed: " + written.error().what());

  // The chunks that fit, in order: full ones, then the partial tail when it is kept.
  std::size_t expect = 0, bytes = 0;
  for (std::size_t first = 0; first < n; first += c.chunk_tokens) {
    const std::size_t ntok = std::min(c.chunk_tokens, n - first);
    if (ntok < c.chunk_tokens && !c.store_partial_chunks) break;
    if (bytes + ntok * token_bytes > c.capacity_bytes) break;
    bytes += ntok * token_bytes;
    expect += ntok;
  }
  KVFUZZ_CHECK(*written == expect, "a store into a fresh engine wrote " + std::to_string(*written) + " of " +
                                       std::to_string(n) + " tokens, " + std::to_string(expect) + " fit");
  const auto found = e.lookup(tokens);
  KVFUZZ_CHECK(found.has_value() && *found == expect, "lookup after the store");
  const auto keys = e.chunk_keys(tokens);
  KVFUZZ_CHECK(keys.has_value() && keys->size() == n / c.chunk_tokens + (c.store_partial_chunks && n % c.chunk_tokens ? 1 : 0),
               "chunk_keys gives the wrong number of keys");

  for (auto& l : src) std::fill(l.begin(), l.end(), std::byte{0});
  const auto back = e.retrieve(tokens, *lay);
  KVFUZZ_CHECK(back.has_value(), "retrieve failed: " + back.error().what());
  const auto got = back->wait();
  KVFUZZ_CHECK(got.has_value() && *got == expect, "retrieve returned another count than lookup");
  for (std::size_t l = 0; l < g.num_layers; ++l)
    for (std::size_t p = 0; p < g.kv_planes; ++p)
      for (std::size_t t = 0; t < n; ++t)
        for (std::size_t i = 0; i < row; ++i) {
          const std::byte want = t < expect ? kvt::kv_byte(tokens[t], t, l, p, i) : std::byte{0};
          KVFUZZ_CHECK(src[l][(p * n + t) * row + i] == want,
                       "retrieved byte " + std::to_string(i) + " of token " + std::to_string(t) + ", layer " +
                           std::to_string(l) + ", plane " + std::to_string(p) + " is wrong");
        }
  const auto s = e.stats();
  KVFUZZ_CHECK(s.current_bytes == bytes && s.current_bytes <= s.capacity_bytes, "current_bytes after one store");
  KVFUZZ_CHECK(!kvortex::to_prometheus(s).empty(), "empty Prometheus text");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  kvfuzz::reader in(data, size);
  const engine_config c = read_config(in);
  const auto v = c.validate();
  const auto broken = broken_rule(c);
  if (!v) {
    kvfuzz::check_error(v.error(), "validate");
    KVFUZZ_CHECK(v.error().code == errc::invalid_config, v.error().what());
    KVFUZZ_CHECK(broken.has_value(), "validate() rejected a configuration the documented rules allow: " + v.error().what());
    const auto e = kvortex::host_engine::create(c);
    KVFUZZ_CHECK(!e.has_value(), "create() accepted what validate() rejects");
    KVFUZZ_CHECK(e.error() == v.error(), "create() and validate() disagree on why");
    return 0;
  }
  KVFUZZ_CHECK(!broken.has_value(), "validate() accepted a configuration breaking the rule on " + *broken);
  if (c.capacity_bytes > max_try_capacity || c.transfer_threads > max_try_threads) return 0;

  auto e = kvortex::host_engine::create(c);
  if (!e) {
    kvfuzz::check_error(e.error(), "create");
    return 0;
  }
  const auto& got = e->config();
  KVFUZZ_CHECK(got.capacity_bytes == c.capacity_bytes && got.chunk_tokens == c.chunk_tokens &&
                   got.block_tokens == c.block_tokens && got.geometry == c.geometry &&
                   got.store_partial_chunks == c.store_partial_chunks && got.ns.model_id == c.ns.model_id,
               "config() differs from the configuration given");
  const auto s = e->stats();
  KVFUZZ_CHECK(s.capacity_bytes == c.capacity_bytes && s.current_bytes == 0 && s.chunks == 0, "a fresh engine is not empty");
  round_trip(*e, c, in);
  e->shutdown();
  const auto after = e->lookup(kvt::make_tokens(4, 1));
  KVFUZZ_CHECK(!after && after.error().code == errc::shut_down, "lookup after shutdown() must fail with shut_down");
  return 0;
}
