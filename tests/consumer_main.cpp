// A consumer of KVortex: stores 64 tokens of KV through a host_engine, looks them up and
// retrieves them into zeroed buffers. Exits nonzero on any failure.
#include <kvortex/kvortex.hpp>

#include <cstddef>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

int failed(const char* what, const kvortex::error& e) {
  std::fprintf(stderr, "%s failed: %s\n", what, e.what().c_str());
  return 1;
}

}  // namespace

int main() {
  kvortex::engine_config cfg;
  cfg.ns.model_id = "kvortex-consumer-test";
  cfg.geometry = {.num_layers = 2, .kv_planes = 2, .kv_heads = 2, .head_dim = 8, .element_bytes = 2};
  cfg.chunk_tokens = 32;
  cfg.block_tokens = 16;
  cfg.capacity_bytes = std::size_t{1} << 20;

  auto engine = kvortex::host_engine::create(cfg);
  if (!engine) return failed("host_engine::create", engine.error());

  constexpr std::size_t tokens_n = 64;
  std::vector<kvortex::token_id> tokens(tokens_n);
  for (std::size_t i = 0; i < tokens_n; ++i) tokens[i] = static_cast<kvortex::token_id>(1000 + 7 * i);

  const std::size_t layer_bytes = cfg.geometry.token_bytes() / cfg.geometry.num_layers * tokens_n;
  std::vector<std::vector<std::byte>> src(cfg.geometry.num_layers, std::vector<std::byte>(layer_bytes));
  std::vector<std::vector<std::byte>> dst(cfg.geometry.num_layers, std::vector<std::byte>(layer_bytes));
  std::vector<std::byte*> src_ptrs;
  std::vector<std::byte*> dst_ptrs;
  for (std::size_t l = 0; l < src.size(); ++l) {
    for (std::size_t i = 0; i < layer_bytes; ++i) src[l][i] = static_cast<std::byte>((i * 31 + l * 17 + 5) & 0xFF);
    src_ptrs.push_back(src[l].data());
    dst_ptrs.push_back(dst[l].data());
  }

  auto src_layout = kvortex::kv_layout::contiguous(src_ptrs, cfg.geometry, tokens_n);
  if (!src_layout) return failed("kv_layout::contiguous (source)", src_layout.error());
  auto dst_layout = kvortex::kv_layout::contiguous(dst_ptrs, cfg.geometry, tokens_n);
  if (!dst_layout) return failed("kv_layout::contiguous (destination)", dst_layout.error());

  auto stored = engine->store(tokens, *src_layout);
  if (!stored) return failed("store", stored.error());
  auto stored_n = stored->wait();
  if (!stored_n) return failed("store wait", stored_n.error());
  if (*stored_n != tokens_n) {
    std::fprintf(stderr, "store wrote %zu tokens, expected %zu\n", *stored_n, tokens_n);
    return 1;
  }

  auto hit = engine->lookup(tokens);
  if (!hit) return failed("lookup", hit.error());
  if (*hit != tokens_n) {
    std::fprintf(stderr, "lookup returned %zu, expected %zu\n", *hit, tokens_n);
    return 1;
  }

  auto fetched = engine->retrieve(tokens, *dst_layout);
  if (!fetched) return failed("retrieve", fetched.error());
  auto fetched_n = fetched->wait();
  if (!fetched_n) return failed("retrieve wait", fetched_n.error());
  if (*fetched_n != tokens_n) {
    std::fprintf(stderr, "retrieve read %zu tokens, expected %zu\n", *fetched_n, tokens_n);
    return 1;
  }

  for (std::size_t l = 0; l < src.size(); ++l) {
    if (std::memcmp(src[l].data(), dst[l].data(), layer_bytes) != 0) {
      std::fprintf(stderr, "layer %zu: retrieved bytes differ from stored bytes\n", l);
      return 1;
    }
  }
  engine->shutdown();
  std::puts("kvortex consumer round trip: OK");
  return 0;
}
