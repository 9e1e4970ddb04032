#include <kvortex/kvortex.hpp>

#include <cstdio>
#include <vector>

int main() {
  kvortex::engine_config cfg;
  cfg.ns.model_id = "kvortex-test-package";
  cfg.geometry = {.num_layers = 1, .kv_planes = 2, .kv_heads = 1, .head_dim = 8, .element_bytes = 2};
  cfg.chunk_tokens = 16;
  cfg.block_tokens = 16;
  cfg.capacity_bytes = std::size_t{1} << 20;

  auto engine = kvortex::host_engine::create(cfg);
  if (!engine) {
    std::fprintf(stderr, "host_engine::create failed: %s\n", engine.error().what().c_str());
    return 1;
  }
  const std::vector<kvortex::token_id> tokens(16, 42);
  auto hit = engine->lookup(tokens);
  if (!hit || *hit != 0) {
    std::fprintf(stderr, "lookup on an empty engine should return 0\n");
    return 1;
  }
  std::puts("kvortex test_package: OK");
  return 0;
}
