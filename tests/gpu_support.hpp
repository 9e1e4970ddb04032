#pragma once
// GPU test fixtures: device KV caches in every layout, host mirrors, and the bit-exact check.

#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <kvortex/allocators/pinned_host_allocator.hpp>
#include <kvortex/detail/cuda_runtime.hpp>
#include <kvortex/kvortex.hpp>
#include <kvortex/schedulers/cuda_transfer_scheduler.hpp>

#include "test_support.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace kvg {

using gpu_engine = kvortex::engine;

// Skips the calling test when no GPU is present.
#define KVG_REQUIRE_GPU()                                              \
  do {                                                                 \
    if (!kvortex::detail::cuda::has_device()) {                        \
      MESSAGE("no CUDA device: GPU test skipped");                     \
      return;                                                          \
    }                                                                  \
  } while (0)

#define KVG_CUDA(x) REQUIRE_MESSAGE((x) == cudaSuccess, #x, ": ", cudaGetErrorString(cudaGetLastError()))

using make_fn = std::function<kvortex::result<kvortex::kv_layout>(std::span<std::byte* const>, const kvortex::kv_geometry&,
                                                                  std::size_t nb, std::size_t bt)>;

// One layout factory: its geometry, how many tensors and of what size, and how to view them.
struct layout_case {
  std::string name;
  kvortex::kv_geometry geometry;
  bool paged;  // false: contiguous (identity block table only)
  std::size_t tensors;
  std::function<std::size_t(const kvortex::kv_geometry&, std::size_t nb, std::size_t bt)> tensor_bytes;
  make_fn make;
};

inline kvortex::kv_geometry geo(std::uint32_t layers, std::uint32_t planes, std::uint32_t heads, std::uint32_t dim,
                                std::uint32_t elem) {
  return {.num_layers = layers, .kv_planes = planes, .kv_heads = heads, .head_dim = dim, .element_bytes = elem};
}

// Every factory in layout.hpp, for element size `elem`.
inline std::vector<layout_case> all_layouts(std::uint32_t elem) {
  using namespace kvortex;
  std::vector<layout_case> v;
  const auto per_layer2 = [](const kv_geometry& g, std::size_t nb, std::size_t bt) { return 2 * nb * bt * g.row_bytes(); };
  const auto per_layer1 = [](const kv_geometry& g, std::size_t nb, std::size_t bt) { return nb * bt * g.row_bytes(); };
  for (auto order : {kv_order::nhd, kv_order::hnd}) {
    const std::string o = order == kv_order::nhd ? "nhd" : "hnd";
    v.push_back({"flash_attn_" + o, geo(3, 2, 4, 32, elem), true, 3, per_layer2,
                 [order](auto p, auto& g, auto nb, auto bt) { return kv_layout::flash_attn(p, g, nb, bt, order); }});
    v.push_back({"flashinfer_" + o, geo(3, 2, 4, 32, elem), true, 3, per_layer2,
                 [order](auto p, auto& g, auto nb, auto bt) { return kv_layout::flashinfer(p, g, nb, bt, order); }});
  }
  // Rows of odd byte counts: the kernels' 4-byte and 1-byte paths.
  v.push_back({"flash_attn_nhd_odd", geo(2, 2, 3, 5, elem), true, 2, per_layer2,
               [](auto p, auto& g, auto nb, auto bt) { return kv_layout::flash_attn(p, g, nb, bt, kv_order::nhd); }});
  v.push_back({"mla", geo(3, 1, 1, 72, elem), true, 3, per_layer1,
               [](auto p, auto& g, auto nb, auto bt) { return kv_layout::mla(p, g, nb, bt); }});
  for (bool outer : {false, true})
    v.push_back({outer ? "cross_layer_blocks_outermost" : "cross_layer", geo(3, 2, 2, 32, elem), true, 1,
                 [](const kv_geometry& g, std::size_t nb, std::size_t bt) {
                   return std::size_t{g.num_layers} * g.kv_planes * nb * bt * g.row_bytes();
                 },
                 [outer](auto p, auto& g, auto nb, auto bt) { return kv_layout::cross_layer(p[0], g, nb, bt, outer); }});
  v.push_back({"pages", geo(2, 2, 2, 32, elem), true, 2,
               [](const kv_geometry& g, std::size_t nb, std::size_t bt) {
                 return nb * (g.kv_planes * bt * g.row_bytes() + 256);
               },
               [](auto p, auto& g, auto nb, auto bt) {
                 return kv_layout::pages(p, g, nb, bt, g.kv_planes * bt * g.row_bytes() + 256);
               }});
  v.push_back({"contiguous", geo(2, 2, 2, 32, elem), false, 2, per_layer2,
               [](auto p, auto& g, auto nb, auto bt) { return kv_layout::contiguous(p, g, nb * bt); }});
  return v;
}

// A KV cache in device memory, with a host mirror for checking.
struct device_cache {
  const layout_case* lc;
  std::size_t nb, bt;
  std::vector<std::byte*> dev, host_ptrs;
  std::vector<std::vector<std::byte>> host;

  device_cache(const layout_case& c, std::size_t blocks, std::size_t block_tokens) : lc(&c), nb(blocks), bt(block_tokens) {
    const std::size_t bytes = c.tensor_bytes(c.geometry, nb, bt);
    for (std::size_t i = 0; i < c.tensors; ++i) {
      void* p = nullptr;
      KVG_CUDA(cudaMalloc(&p, bytes));
      dev.push_back(static_cast<std::byte*>(p));
      host.emplace_back(bytes);
    }
    for (auto& h : host) host_ptrs.push_back(h.data());
  }
  device_cache(const device_cache&) = delete;
  device_cache& operator=(const device_cache&) = delete;
  ~device_cache() {
    for (auto* p : dev) (void)cudaFree(p);
  }
  // Random bytes everywhere, mirrored on the host.
  void randomize(std::uint32_t seed) {
    std::mt19937_64 rng(seed);
    for (std::size_t i = 0; i < dev.size(); ++i) {
      auto* w = reinterpret_cast<std::uint64_t*>(host[i].data());
      const std::size_t n = host[i].size();
      for (std::size_t k = 0; k < n / 8; ++k) w[k] = rng();
      for (std::size_t k = n / 8 * 8; k < n; ++k) host[i][k] = static_cast<std::byte>(rng());
      KVG_CUDA(cudaMemcpy(dev[i], host[i].data(), n, cudaMemcpyHostToDevice));
    }
  }
  std::vector<std::vector<std::byte>> download() const {
    std::vector<std::vector<std::byte>> out;
    for (std::size_t i = 0; i < dev.size(); ++i) {
      out.emplace_back(host[i].size());
      KVG_CUDA(cudaMemcpy(out.back().data(), dev[i], host[i].size(), cudaMemcpyDeviceToHost));
    }
    return out;
  }
  kvortex::kv_layout device_layout() const {
    auto l = lc->make(dev, lc->geometry, nb, bt);
    REQUIRE_MESSAGE(l.has_value(), (l ? "" : l.error().what()));
    l->on_device();
    return *l;
  }
  kvortex::kv_layout mirror_layout() {
    auto l = lc->make(host_ptrs, lc->geometry, nb, bt);
    REQUIRE_MESSAGE(l.has_value(), (l ? "" : l.error().what()));
    return *l;
  }
};

// The first `n` tokens' KV as the layout addresses them, in the layout's chunk order.
inline std::vector<std::byte> image(const kvortex::kv_layout& host_layout, std::span<const std::int32_t> table,
                                    std::size_t n) {
  std::vector<std::byte> img(n * host_layout.geometry().token_bytes());
  std::vector<kvortex::copy_op> ops;
  host_layout.append_copies(ops, table, 0, n, img.data(), true);
  for (const auto& op : ops) kvortex::copy_host(op);
  return img;
}

// Writes `img` into the mirror through the layout (what a correct retrieve does to the cache).
inline void apply(const kvortex::kv_layout& host_layout, std::span<const std::int32_t> table, std::size_t n,
                  std::vector<std::byte>& img) {
  std::vector<kvortex::copy_op> ops;
  host_layout.append_copies(ops, table, 0, n, img.data(), false);
  for (const auto& op : ops) kvortex::copy_host(op);
}

using kvt::random_table;

inline std::vector<kvortex::token_id> tokens(std::size_t n, std::uint32_t seed) { return kvt::make_tokens(n, seed); }

inline kvortex::engine_config config_for(const kvortex::kv_geometry& g, std::size_t capacity_chunks = 64) {
  kvortex::engine_config c;
  c.ns.model_id = "gpu-test";
  c.geometry = g;
  c.chunk_tokens = 32;
  c.block_tokens = 16;
  c.store_partial_chunks = true;
  c.capacity_bytes = capacity_chunks * c.chunk_bytes();
  return c;
}

inline gpu_engine make_engine(const kvortex::engine_config& c) {
  auto e = gpu_engine::create(c);
  REQUIRE_MESSAGE(e.has_value(), (e ? "" : e.error().what()));
  return std::move(*e);
}

// The default GPU stack with a scheduler (and optionally a pool) of the test's choosing.
inline gpu_engine make_engine(const kvortex::engine_config& c, kvortex::cuda_transfer_scheduler s,
                              kvortex::pinned_host_allocator pool) {
  auto e = gpu_engine::create(c, std::move(pool), kvortex::sha256_hasher::create().value(), kvortex::lru_eviction{},
                              kvortex::cpu_backend{}, std::move(s));
  REQUIRE_MESSAGE(e.has_value(), (e ? "" : e.error().what()));
  return std::move(*e);
}
inline gpu_engine make_engine(const kvortex::engine_config& c, kvortex::cuda_transfer_scheduler s) {
  return make_engine(c, std::move(s), kvortex::pinned_host_allocator::create(c).value());
}

// Byte positions where two mirrors differ, counted.
inline std::size_t differences(const std::vector<std::vector<std::byte>>& a, const std::vector<std::vector<std::byte>>& b) {
  std::size_t bad = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    for (std::size_t k = 0; k < a[i].size(); ++k) bad += a[i][k] != b[i][k];
  return bad;
}

}  // namespace kvg
