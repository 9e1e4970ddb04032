// GPU transfer benchmarks: paged KV blocks <-> pinned host, ours against every baseline in the same
// run; the same methods beside a saturating cuBLAS bf16 GEMM; pinned pool start-up.
//
//   kvortex-gpu-bench --benchmark_format=json --benchmark_out=gpu.json
//   python3 scripts/gpu-table.py gpu.json
//
// Shape: 32 layers x K and V x N random blocks of 16 tokens, 128-dim bf16 heads; 2, 4, 8 or 16
// heads give 8, 16, 32 or 64 KiB blocks; N is chosen so that every iteration moves 512 MiB.
// Counters: GBps, ratio_to_limit (against one contiguous pinned cudaMemcpyAsync of the same bytes,
// measured in the same run), gemm_tflops / gemm_alone_tflops / gemm_loss_pct (interference).
// Baselines: contiguous (the limit), per_block_memcpy (one cudaMemcpyAsync per block, as if the
// cache were NHD), memcpy_batch (one cudaMemcpyBatchAsync of the blocks), per_head_memcpy2d (what an
// HND cache costs done plainly: one cudaMemcpy2DAsync per head and block, into the chunk layout),
// zero_copy_uva. ours_dma_only_* is the scheduler without kernels (the NVRTC-less fallback).

#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <kvortex/allocators/pinned_host_allocator.hpp>
#include <kvortex/detail/nvrtc_program.hpp>
#include <kvortex/kvortex.hpp>
#include <kvortex/schedulers/cuda_transfer_scheduler.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace kvortex;
using gpu_engine = kvortex::engine;
using clk = std::chrono::steady_clock;

constexpr std::size_t iter_bytes = std::size_t{512} << 20;
constexpr std::uint32_t layers = 32, block_tokens = 16, head_dim = 128;

bool ck(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "CUDA error %s in %s\n", cudaGetErrorString(e), what);
  return false;
}
#define CK(x) ck((x), #x)

bool gpu_present() { return detail::cuda::has_device(); }

// --------------------------------------------------------------------------------------------
// Shared buffers: a contiguous device buffer and a pinned host buffer of iter_bytes each.
struct common_bufs {
  std::byte* dev{nullptr};
  std::byte* host{nullptr};
  cudaStream_t s[4]{};
  cudaEvent_t a{}, b{};
  common_bufs() {
    CK(cudaMalloc(reinterpret_cast<void**>(&dev), iter_bytes));
    CK(cudaHostAlloc(reinterpret_cast<void**>(&host), iter_bytes, cudaHostAllocDefault));
    CK(cudaMemset(dev, 1, iter_bytes));
    std::memset(host, 2, iter_bytes);
    for (auto& x : s) CK(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking));
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
  }
};
common_bufs& bufs() {
  static common_bufs b;
  return b;
}

// The limit: one contiguous pinned copy of iter_bytes, median of 5.
double contiguous_gbps(bool d2h) {
  static std::optional<double> cached[2];
  auto& c = cached[d2h ? 1 : 0];
  if (c) return *c;
  auto& B = bufs();
  std::vector<float> ms;
  for (int r = 0; r < 6; ++r) {
    CK(cudaEventRecord(B.a, B.s[0]));
    if (d2h)
      CK(cudaMemcpyAsync(B.host, B.dev, iter_bytes, cudaMemcpyDeviceToHost, B.s[0]));
    else
      CK(cudaMemcpyAsync(B.dev, B.host, iter_bytes, cudaMemcpyHostToDevice, B.s[0]));
    CK(cudaEventRecord(B.b, B.s[0]));
    CK(cudaEventSynchronize(B.b));
    float t = 0;
    CK(cudaEventElapsedTime(&t, B.a, B.b));
    if (r) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  c = iter_bytes / (ms[ms.size() / 2] * 1e-3) / 1e9;
  return *c;
}

// --------------------------------------------------------------------------------------------
// One fragment size: device caches, the selected blocks, the fragment lists and an engine.
struct fixture {
  std::size_t frag;  // block bytes in one layer and plane
  std::uint32_t heads;
  std::size_t sel, nb;
  std::vector<std::byte*> cache;  // per layer [2][nb][16][heads][128] bf16
  std::vector<std::int32_t> table;
  std::vector<void*> dsts_d2h, srcs_d2h, dsts_h2d, srcs_h2d;
  std::vector<std::size_t> sizes;
  detail::kernel_fragment* uva_d2h{nullptr};
  detail::kernel_fragment* uva_h2d{nullptr};
  std::optional<gpu_engine> engine;
  std::vector<token_id> stored_tokens;
  std::uint32_t next_seed{1000};

  explicit fixture(std::size_t frag_bytes) : frag(frag_bytes) {
    heads = static_cast<std::uint32_t>(frag / (block_tokens * head_dim * 2));
    sel = iter_bytes / (std::size_t{layers} * 2 * frag);
    nb = 2 * sel;
    for (std::uint32_t l = 0; l < layers; ++l) {
      void* p = nullptr;
      CK(cudaMalloc(&p, 2 * nb * frag));
      CK(cudaMemset(p, static_cast<int>(l), 2 * nb * frag));
      cache.push_back(static_cast<std::byte*>(p));
    }
    table.resize(nb);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(42));
    table.resize(sel);
    // Fragments in the order of the chunk layout: layer, plane, block.
    auto& B = bufs();
    std::vector<detail::kernel_fragment> kd2h, kh2d;
    for (std::uint32_t l = 0; l < layers; ++l)
      for (std::size_t p = 0; p < 2; ++p)
        for (std::size_t i = 0; i < sel; ++i) {
          std::byte* dev = cache[l] + (p * nb + static_cast<std::size_t>(table[i])) * frag;
          std::byte* host = B.host + ((l * 2 + p) * sel + i) * frag;
          dsts_d2h.push_back(host);
          srcs_d2h.push_back(dev);
          dsts_h2d.push_back(dev);
          srcs_h2d.push_back(host);
          sizes.push_back(frag);
          const auto fb = static_cast<std::uint32_t>(frag);
          kd2h.push_back({reinterpret_cast<std::uint64_t>(dev), reinterpret_cast<std::uint64_t>(host), fb, 1, 0, 0});
          kh2d.push_back({reinterpret_cast<std::uint64_t>(host), reinterpret_cast<std::uint64_t>(dev), fb, 1, 0, 0});
        }
    const std::size_t kb = kd2h.size() * sizeof(detail::kernel_fragment);
    CK(cudaMalloc(reinterpret_cast<void**>(&uva_d2h), kb));
    CK(cudaMalloc(reinterpret_cast<void**>(&uva_h2d), kb));
    CK(cudaMemcpy(uva_d2h, kd2h.data(), kb, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(uva_h2d, kh2d.data(), kb, cudaMemcpyHostToDevice));
  }
  ~fixture() {
    engine.reset();
    for (auto* p : cache) cudaFree(p);
    cudaFree(uva_d2h);
    cudaFree(uva_h2d);
  }
  [[nodiscard]] kv_geometry geometry() const {
    return {.num_layers = layers, .kv_planes = 2, .kv_heads = heads, .head_dim = head_dim, .element_bytes = 2};
  }
  [[nodiscard]] kv_layout layout(kv_order order) const {
    auto l = kv_layout::flash_attn(cache, geometry(), nb, block_tokens, order).value();
    l.on_device();
    return l;
  }
  [[nodiscard]] std::size_t tokens() const { return sel * block_tokens; }

  gpu_engine& eng(int variant, std::optional<cuda_transfer_scheduler::options> so) {
    if (engine && variant == engine_variant) return ensure_stored();
    engine.reset();
    engine_variant = variant;
    engine_config c;
    c.ns.model_id = "bench";
    c.geometry = geometry();
    c.chunk_tokens = 256;
    c.block_tokens = block_tokens;
    c.capacity_bytes = 3 * iter_bytes;
    auto s = cuda_transfer_scheduler::create(so.value_or(cuda_transfer_scheduler::options{}));
    auto a = pinned_host_allocator::create(c);
    if (!s || !a) {
      std::fprintf(stderr, "engine: %s\n", (!s ? s.error() : a.error()).what().c_str());
      std::abort();
    }
    (void)a->wait_all_ready(std::chrono::seconds(60));
    engine.emplace(std::move(gpu_engine::create(c, std::move(*a), sha256_hasher::create().value(), lru_eviction{},
                                                cpu_backend{}, std::move(*s))
                                 .value()));
    stored_tokens = fresh_tokens();
    return ensure_stored();
  }
  // Stores may have evicted the retrieve benchmarks' prompt: put it back.
  gpu_engine& ensure_stored() {
    if (engine->lookup(stored_tokens).value_or(0) < stored_tokens.size()) {
      auto t = engine->store(stored_tokens, layout(kv_order::nhd), table);
      (void)t.value().wait();
    }
    return *engine;
  }
  int engine_variant{-1};
  std::vector<token_id> fresh_tokens() {
    std::mt19937 rng(next_seed++);
    std::vector<token_id> t(tokens());
    for (auto& x : t) x = static_cast<token_id>(rng() % 128000);
    return t;
  }
};

std::unique_ptr<fixture>& current() {
  static std::unique_ptr<fixture> f;
  return f;
}
fixture& fix(std::size_t frag) {
  auto& f = current();
  if (!f || f->frag != frag) {
    f.reset();
    f = std::make_unique<fixture>(frag);
  }
  return *f;
}

detail::nvrtc::transfer_kernels& kernels() {
  static detail::nvrtc::transfer_kernels k = [] {
    auto r = detail::nvrtc::load_transfer_kernels(0);
    if (!r) {
      std::fprintf(stderr, "kernels: %s\n", r.error().what().c_str());
      std::abort();
    }
    return *r;
  }();
  return k;
}

// --------------------------------------------------------------------------------------------
// Methods. Each runs one iteration (iter_bytes) and returns after it is queued; `sync` waits.
enum class method { contiguous, per_block, batch, per_head_2d, uva, ours, ours_dma, ours_16cta, ours_8x32MiB };
const char* name(method m) {
  switch (m) {
    case method::contiguous: return "contiguous";
    case method::per_block: return "per_block_memcpy";
    case method::batch: return "memcpy_batch";
    case method::per_head_2d: return "per_head_memcpy2d";
    case method::uva: return "zero_copy_uva";
    case method::ours: return "ours";
    case method::ours_dma: return "ours_dma_only";
    case method::ours_16cta: return "ours_16cta";
    case method::ours_8x32MiB: return "ours_8x32MiB";
  }
  return "?";
}

std::optional<cuda_transfer_scheduler::options> options_for(method m) {
  if (m == method::ours) return std::nullopt;
  cuda_transfer_scheduler::options o;
  auto info = detail::cuda::query(0).value();
  auto t = select_cuda_transfer_tuning(info.cc_major, info.cc_minor);
  if (m == method::ours_dma) o.mode = cuda_transfer_mode::dma;
  if (m == method::ours_16cta) t.ctas = 16;
  if (m == method::ours_8x32MiB) t.slabs = 8;
  o.tuning = t;
  return o;
}

struct runner {
  method m;
  bool d2h;
  kv_order order;
  fixture* f;
  gpu_engine* e{nullptr};
  cudaStream_t s;

  runner(method mm, bool dir, kv_order o, std::size_t frag) : m(mm), d2h(dir), order(o), f(&fix(frag)) {
    s = bufs().s[0];
    if (m >= method::ours) e = &f->eng(static_cast<int>(m), options_for(m));
    if (m == method::uva) (void)kernels();
  }
  [[nodiscard]] std::size_t bytes() const { return iter_bytes; }
  // One iteration, synchronously; false on error.
  bool once() {
    auto& B = bufs();
    switch (m) {
      case method::contiguous:
        if (!CK(cudaMemcpyAsync(d2h ? static_cast<void*>(B.host) : B.dev, d2h ? static_cast<void*>(B.dev) : B.host,
                                iter_bytes, d2h ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, s)))
          return false;
        return CK(cudaStreamSynchronize(s));
      case method::per_block: {
        auto& dst = d2h ? f->dsts_d2h : f->dsts_h2d;
        auto& src = d2h ? f->srcs_d2h : f->srcs_h2d;
        for (std::size_t i = 0; i < dst.size(); ++i)
          if (!CK(cudaMemcpyAsync(dst[i], src[i], f->frag, cudaMemcpyDefault, s))) return false;
        return CK(cudaStreamSynchronize(s));
      }
      case method::batch: {
        auto& dst = d2h ? f->dsts_d2h : f->dsts_h2d;
        auto& src = d2h ? f->srcs_d2h : f->srcs_h2d;
        cudaMemcpyAttributes attr{};
        attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
        std::size_t idx = 0;
        if (!CK(cudaMemcpyBatchAsync(dst.data(), src.data(), f->sizes.data(), dst.size(), &attr, &idx, 1, s)))
          return false;
        return CK(cudaStreamSynchronize(s));
      }
      case method::per_head_2d: {
        // The HND cache's heads, each 16 rows of one head_dim into the chunk's token rows.
        const std::size_t hb = head_dim * 2, pitch = f->heads * hb;
        for (std::uint32_t l = 0; l < layers; ++l)
          for (std::size_t p = 0; p < 2; ++p)
            for (std::size_t i = 0; i < f->sel; ++i)
              for (std::size_t h = 0; h < f->heads; ++h) {
                std::byte* dev = f->cache[l] + (p * f->nb + static_cast<std::size_t>(f->table[i])) * f->frag + h * block_tokens * hb;
                std::byte* host = B.host + ((l * 2 + p) * f->sel + i) * f->frag + h * hb;
                const cudaError_t e = d2h ? cudaMemcpy2DAsync(host, pitch, dev, hb, hb, block_tokens, cudaMemcpyDeviceToHost, s)
                                          : cudaMemcpy2DAsync(dev, hb, host, pitch, hb, block_tokens, cudaMemcpyHostToDevice, s);
                if (!CK(e)) return false;
              }
        return CK(cudaStreamSynchronize(s));
      }
      case method::uva: {
        auto* fr = d2h ? f->uva_d2h : f->uva_h2d;
        auto n = static_cast<unsigned>(f->sizes.size());
        void* args[] = {&fr, &n};
        if (!CK(cudaLaunchKernel(reinterpret_cast<const void*>(kernels().gather), dim3(8), dim3(1024), args, 0, s)))
          return false;
        return CK(cudaStreamSynchronize(s));
      }
      default: {
        if (d2h) {
          const auto toks = f->fresh_tokens();
          auto t = e->store(toks, f->layout(order), f->table);
          return t && t->wait().has_value();
        }
        auto t = e->retrieve(f->stored_tokens, f->layout(order), f->table);
        if (!t) return false;
        auto got = t->wait();
        return got && *got == f->stored_tokens.size();
      }
    }
  }
};

void set_counters(benchmark::State& st, double gbps, bool d2h) {
  st.counters["GBps"] = gbps;
  st.counters["limit_GBps"] = contiguous_gbps(d2h);
  st.counters["ratio_to_limit"] = gbps / contiguous_gbps(d2h);
}

void bm_transfer(benchmark::State& st, method m, bool d2h, kv_order order, std::size_t frag) {
  if (!gpu_present()) {
    st.SkipWithError("no CUDA device");
    return;
  }
  runner r(m, d2h, order, frag);
  (void)contiguous_gbps(d2h);
  if (!r.once()) {  // warm-up
    st.SkipWithError("transfer failed");
    return;
  }
  double total_s = 0;
  std::size_t n = 0;
  for (auto _ : st) {
    const auto t0 = clk::now();
    if (!r.once()) {
      st.SkipWithError("transfer failed");
      return;
    }
    const double s = std::chrono::duration<double>(clk::now() - t0).count();
    st.SetIterationTime(s);
    total_s += s;
    ++n;
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(n * r.bytes()));
  set_counters(st, n * r.bytes() / total_s / 1e9, d2h);
}

// --------------------------------------------------------------------------------------------
// Compute interference: cuBLAS bf16 GEMM 8192^3 on its own stream.
struct gemm_rig {
  static constexpr int N = 8192;
  cublasHandle_t h{};
  cudaStream_t s{};
  __nv_bfloat16 *A{}, *B{}, *C{};
  cudaEvent_t g0{}, g1{};
  double alone{0};
  bool ok{false};
  gemm_rig() {
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cublasSetStream(h, s);
    const std::size_t n = std::size_t{N} * N;
    CK(cudaMalloc(reinterpret_cast<void**>(&A), n * 2));
    CK(cudaMalloc(reinterpret_cast<void**>(&B), n * 2));
    CK(cudaMalloc(reinterpret_cast<void**>(&C), n * 2));
    std::vector<__nv_bfloat16> hv(n);
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> d(-1.f, 1.f);
    for (auto& x : hv) x = __float2bfloat16(d(rng));
    CK(cudaMemcpy(A, hv.data(), n * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(B, hv.data(), n * 2, cudaMemcpyHostToDevice));
    CK(cudaEventCreate(&g0));
    CK(cudaEventCreate(&g1));
    for (int i = 0; i < 10; ++i) gemm();
    CK(cudaStreamSynchronize(s));
    alone = run(100);
    ok = alone > 0;
  }
  void gemm() {
    const float al = 1, be = 0;
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, N, N, N, &al, A, CUDA_R_16BF, N, B, CUDA_R_16BF, N, &be, C, CUDA_R_16BF,
                 N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  }
  // Queues `g` GEMMs between g0 and g1; returns TFLOP/s once they finished (blocks).
  double run(int g) {
    enqueue(g);
    CK(cudaEventSynchronize(g1));
    return tflops(g);
  }
  void enqueue(int g) {
    CK(cudaEventRecord(g0, s));
    for (int i = 0; i < g; ++i) gemm();
    CK(cudaEventRecord(g1, s));
  }
  double tflops(int g) {
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, g0, g1));
    return 2.0 * N * N * double(N) * g / (ms * 1e-3) / 1e12;
  }
};
gemm_rig& gemm() {
  static gemm_rig g;
  return g;
}

void bm_interference(benchmark::State& st, method m, bool d2h, std::size_t frag, kv_order order = kv_order::nhd) {
  if (!gpu_present()) {
    st.SkipWithError("no CUDA device");
    return;
  }
  auto& g = gemm();
  if (!g.ok) {
    st.SkipWithError("cuBLAS unavailable");
    return;
  }
  runner r(m, d2h, order, frag);
  (void)contiguous_gbps(d2h);
  if (!r.once()) {
    st.SkipWithError("transfer failed");
    return;
  }
  constexpr int G = 200;
  double tf = 0, gbps = 0, alone = 0;
  for (auto _ : st) {
    // GEMM alone right before, so clock and thermal drift cancel in the pair.
    alone = g.run(G);
    // The copy loop starts with the GEMMs and stops when they are done.
    std::atomic<bool> stop{false};
    std::size_t moved = 0;
    double copy_s = 0;
    bool okc = true;
    g.enqueue(G);
    std::thread copier([&] {
      const auto t0 = clk::now();
      while (!stop.load(std::memory_order_acquire)) {
        if (!r.once()) {
          okc = false;
          break;
        }
        moved += r.bytes();
        if (cudaEventQuery(g.g1) == cudaSuccess) break;
      }
      copy_s = std::chrono::duration<double>(clk::now() - t0).count();
    });
    CK(cudaEventSynchronize(g.g1));
    stop = true;
    copier.join();
    if (!okc) {
      st.SkipWithError("transfer failed");
      return;
    }
    tf = g.tflops(G);
    gbps = moved / copy_s / 1e9;
    st.SetIterationTime(copy_s);
  }
  set_counters(st, gbps, d2h);
  st.counters["gemm_tflops"] = tf;
  st.counters["gemm_alone_tflops"] = alone;
  st.counters["gemm_loss_pct"] = 100.0 * (1.0 - tf / alone);
}

void bm_gemm_alone(benchmark::State& st) {
  if (!gpu_present()) {
    st.SkipWithError("no CUDA device");
    return;
  }
  auto& g = gemm();
  if (!g.ok) {
    st.SkipWithError("cuBLAS unavailable");
    return;
  }
  double tf = 0;
  for (auto _ : st) {
    tf = g.run(200);
    st.SetIterationTime(2.0 * gemm_rig::N * gemm_rig::N * double(gemm_rig::N) * 200 / (tf * 1e12));
  }
  st.counters["gemm_tflops"] = tf;
}

// --------------------------------------------------------------------------------------------
// Pool start-up: pinned pool (first piece, whole pool) against one cudaHostAlloc.
void bm_pool(benchmark::State& st, bool ours, std::size_t gib) {
  if (!gpu_present()) {
    st.SkipWithError("no CUDA device");
    return;
  }
  current().reset();  // give host memory back
  const std::size_t bytes = gib << 30;
  for (auto _ : st) {
    if (ours) {
      pinned_host_allocator::options o;
      o.capacity_bytes = bytes;
      auto a = pinned_host_allocator::create(o);
      if (!a) {
        st.SkipWithError(a.error().what().c_str());
        return;
      }
      const double first = a->first_ready_seconds();
      auto p = a->allocate(std::size_t{64} << 20);  // the first chunk is servable
      if (!p || !a->wait_all_ready(std::chrono::seconds(120))) {
        st.SkipWithError("pinned pool did not become ready");
        return;
      }
      a->deallocate(*p, std::size_t{64} << 20);
      st.SetIterationTime(a->all_ready_seconds());
      st.counters["first_ready_s"] = first;
      st.counters["all_ready_s"] = a->all_ready_seconds();
      st.counters["touch_s"] = a->growth_times().touch_s;
      st.counters["register_s"] = a->growth_times().register_s;
    } else {
      const auto t0 = clk::now();
      void* p = nullptr;
      if (!CK(cudaHostAlloc(&p, bytes, cudaHostAllocDefault))) {
        st.SkipWithError("cudaHostAlloc failed");
        return;
      }
      const double s = std::chrono::duration<double>(clk::now() - t0).count();
      CK(cudaFreeHost(p));
      st.SetIterationTime(s);
      st.counters["first_ready_s"] = s;
      st.counters["all_ready_s"] = s;
    }
  }
}

const bool registered = [] {
  const std::size_t KiB = 1024;
  const std::vector<std::size_t> frags = {8 * KiB, 16 * KiB, 32 * KiB, 64 * KiB};
  for (const std::size_t f : frags)
    for (const bool d2h : {true, false}) {
      const std::string dir = d2h ? "D2H" : "H2D", sz = std::to_string(f / KiB) + "KiB";
      for (const method m : {method::contiguous, method::per_block, method::batch, method::per_head_2d, method::uva,
                             method::ours_dma, method::ours}) {
        const bool per_layout = m >= method::ours;
        for (const kv_order o : {kv_order::nhd, kv_order::hnd}) {
          if (!per_layout && o == kv_order::hnd) continue;
          const std::string lay = per_layout ? (o == kv_order::nhd ? "_nhd" : "_hnd") : "";
          auto* b = benchmark::RegisterBenchmark(("transfer/" + std::string(name(m)) + lay + "/" + dir + "/" + sz).c_str(),
                                                 [=](benchmark::State& st) { bm_transfer(st, m, d2h, o, f); });
          b->UseManualTime()->Unit(benchmark::kMillisecond);
          if (m == method::per_block || m == method::per_head_2d)
            b->Iterations(2);
          else
            b->MinTime(0.3);
        }
      }
    }
  benchmark::RegisterBenchmark("interference/gemm_alone", bm_gemm_alone)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
  for (const std::size_t f : {8 * KiB, 32 * KiB})
    for (const bool d2h : {true, false})
      for (const method m : {method::contiguous, method::batch, method::uva, method::ours_dma, method::ours,
                             method::ours_16cta, method::ours_8x32MiB}) {
        const std::string n = "interference/" + std::string(name(m)) + "/" + (d2h ? "D2H" : "H2D") + "/" +
                              std::to_string(f / KiB) + "KiB";
        benchmark::RegisterBenchmark(n.c_str(), [=](benchmark::State& st) { bm_interference(st, m, d2h, f); })
            ->UseManualTime()
            ->Iterations(1)
            ->Unit(benchmark::kMillisecond);
      }
  // The HND layout beside the GEMM (ours only: the baselines copy the same fragments either way).
  for (const std::size_t f : {8 * KiB, 32 * KiB})
    for (const bool d2h : {true, false}) {
      const std::string n = "interference/ours_hnd/" + std::string(d2h ? "D2H" : "H2D") + "/" + std::to_string(f / KiB) + "KiB";
      benchmark::RegisterBenchmark(n.c_str(), [=](benchmark::State& st) { bm_interference(st, method::ours, d2h, f, kv_order::hnd); })
          ->UseManualTime()
          ->Iterations(1)
          ->Unit(benchmark::kMillisecond);
    }
  for (const std::size_t gib : {8, 32})
    for (const bool ours : {true, false})
      benchmark::RegisterBenchmark(("pool_startup/" + std::string(ours ? "pinned_pool" : "cudaHostAlloc") + "/" +
                                    std::to_string(gib) + "GiB")
                                       .c_str(),
                                   [=](benchmark::State& st) { bm_pool(st, ours, gib); })
          ->UseManualTime()
          ->Iterations(1)
          ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace
