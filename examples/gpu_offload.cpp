// Offloads a paged GPU KV cache (vLLM's FlashAttention layout) to pinned host memory and restores
// it into other blocks, then checks every byte. Prints "no CUDA device" and exits 0 without a GPU.

#include <cuda_runtime.h>

#include <kvortex/allocators/pinned_host_allocator.hpp>
#include <kvortex/kvortex.hpp>
#include <kvortex/schedulers/cuda_transfer_scheduler.hpp>

#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

using gpu_engine = kvortex::engine;  // the default GPU stack

int main() {
  if (!kvortex::detail::cuda::has_device()) {
    std::puts("no CUDA device");
    return 0;
  }
  // A small Llama-like shape: 4 layers, 8 KV heads of 128 bf16, blocks of 16 tokens.
  kvortex::engine_config cfg;
  cfg.ns.model_id = "example/llama-like";
  cfg.geometry = {.num_layers = 4, .kv_planes = 2, .kv_heads = 8, .head_dim = 128, .element_bytes = 2};
  cfg.chunk_tokens = 256;
  cfg.block_tokens = 16;
  cfg.capacity_bytes = std::size_t{256} << 20;
  auto eng = gpu_engine::create(cfg);
  if (!eng) {
    std::printf("engine: %s\n", eng.error().what().c_str());
    return 1;
  }

  const std::size_t num_blocks = 256, tokens = 1024, blocks = tokens / cfg.block_tokens;
  const std::size_t layer_bytes = 2 * num_blocks * cfg.block_tokens * cfg.geometry.row_bytes();
  std::vector<std::byte*> layers(cfg.geometry.num_layers);
  std::vector<std::vector<std::byte>> original(layers.size(), std::vector<std::byte>(layer_bytes));
  std::mt19937 rng(1);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    for (auto& b : original[l]) b = static_cast<std::byte>(rng());
    if (cudaMalloc(reinterpret_cast<void**>(&layers[l]), layer_bytes) != cudaSuccess ||
        cudaMemcpy(layers[l], original[l].data(), layer_bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
      std::puts("cudaMalloc/cudaMemcpy failed");
      return 1;
    }
  }
  auto layout = kvortex::kv_layout::flash_attn(layers, cfg.geometry, num_blocks, cfg.block_tokens).value();
  layout.on_device();

  std::vector<kvortex::token_id> prompt(tokens);
  for (auto& t : prompt) t = static_cast<kvortex::token_id>(rng() % 128000);
  std::vector<std::int32_t> table(blocks), restored_table(blocks);
  std::iota(table.begin(), table.end(), 0);                 // blocks 0..63
  std::iota(restored_table.begin(), restored_table.end(), 128);  // restored into blocks 128..191

  auto stored = eng->store(prompt, layout, table).value().wait();
  if (!stored) {
    std::printf("store: %s\n", stored.error().what().c_str());
    return 1;
  }
  std::printf("stored %zu tokens, lookup finds %zu\n", *stored, eng->lookup(prompt).value());

  auto got = eng->retrieve(prompt, layout, restored_table).value().wait();
  if (!got) {
    std::printf("retrieve: %s\n", got.error().what().c_str());
    return 1;
  }

  // Block 128+i of each layer and plane must now equal block i of the original.
  const std::size_t block_bytes = cfg.block_tokens * cfg.geometry.row_bytes();
  std::size_t bad = 0;
  std::vector<std::byte> now(layer_bytes);
  for (std::size_t l = 0; l < layers.size(); ++l) {
    (void)cudaMemcpy(now.data(), layers[l], layer_bytes, cudaMemcpyDeviceToHost);
    for (std::size_t p = 0; p < 2; ++p)
      for (std::size_t i = 0; i < blocks; ++i)
        bad += std::memcmp(now.data() + (p * num_blocks + restored_table[i]) * block_bytes,
                           original[l].data() + (p * num_blocks + table[i]) * block_bytes, block_bytes) != 0;
  }
  std::printf("restored %zu tokens into other blocks: %s\n", *got, bad == 0 ? "verified" : "MISMATCH");
  std::printf("pinned pool: %zu of %zu bytes ready, first piece after %.3f s\n", eng->get_allocator().ready_bytes(),
              eng->get_allocator().capacity(), eng->get_allocator().first_ready_seconds());
  for (auto* p : layers) (void)cudaFree(p);
  return bad == 0 && *got == tokens ? 0 : 1;
}
