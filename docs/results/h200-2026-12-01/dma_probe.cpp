// Which DMA-only method moves paged KV fragments fastest (no kernels): timings of the candidate
// methods for the scheduler's DMA fallback, on the benchmark's shape (32 layers x K,V x random
// blocks, 512 MiB an iteration, chunk order on the host).
//
//   g++ -O2 -std=c++20 -I/usr/local/cuda/include dma_probe.cpp -L/usr/local/cuda/lib64 -lcudart -lpthread
//   ./a.out > probe.jsonl          (every candidate method)
//   ./a.out sweep > sweep.jsonl    (batch shapes: streams x copies per call; host reorder threads)
//
// Prints one JSON line per method: {"dir","layout","frag","method","GBps","ratio"}; the ratio is to
// one contiguous pinned cudaMemcpyAsync of the same bytes measured in the same run.

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr std::size_t iter_bytes = std::size_t{512} << 20;
constexpr std::size_t layers = 32, hb = 256, tokens = 16;

void ck(cudaError_t e, const char* what, int line) {
  if (e == cudaSuccess) return;
  std::fprintf(stderr, "CUDA error %s at %s (line %d)\n", cudaGetErrorString(e), what, line);
  std::exit(1);
}
#define CK(x) ck((x), #x, __LINE__)

using clk = std::chrono::steady_clock;

struct op2d {
  std::byte* dst;
  const std::byte* src;
  std::size_t width, height, dpitch, spitch;
};

struct rig {
  std::size_t frag, heads, sel, nb;
  std::byte* host{};
  std::byte* dev_lin{};  // a contiguous device buffer (staging / limit)
  std::vector<std::byte*> cache;
  std::vector<int> table;
  cudaStream_t s[4]{};
  explicit rig(std::size_t f) : frag(f), heads(f / (tokens * hb)) {
    sel = iter_bytes / (layers * 2 * frag);
    nb = 2 * sel;
    CK(cudaHostAlloc(reinterpret_cast<void**>(&host), iter_bytes, cudaHostAllocDefault));
    CK(cudaMalloc(reinterpret_cast<void**>(&dev_lin), iter_bytes));
    std::mt19937_64 rng(9);
    for (std::size_t i = 0; i < iter_bytes / 8; ++i) reinterpret_cast<std::uint64_t*>(host)[i] = rng();
    CK(cudaMemcpy(dev_lin, host, iter_bytes, cudaMemcpyHostToDevice));
    for (std::size_t l = 0; l < layers; ++l) {
      void* p = nullptr;
      CK(cudaMalloc(&p, 2 * nb * frag));
      CK(cudaMemcpy(p, host, std::min(2 * nb * frag, iter_bytes), cudaMemcpyHostToDevice));
      cache.push_back(static_cast<std::byte*>(p));
    }
    table.resize(nb);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(42));
    table.resize(sel);
    for (auto& x : s) CK(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking));
  }
  ~rig() {
    for (auto* p : cache) cudaFree(p);
    cudaFree(dev_lin);
    cudaFreeHost(host);
    for (auto x : s) cudaStreamDestroy(x);
  }
  std::byte* dev_block(std::size_t l, std::size_t p, std::size_t i) const {
    return cache[l] + (p * nb + static_cast<std::size_t>(table[i])) * frag;
  }
  std::byte* host_block(std::size_t l, std::size_t p, std::size_t i) const { return host + ((l * 2 + p) * sel + i) * frag; }
  // 1D fragments in chunk order (layer, plane, block).
  std::vector<op2d> nhd(bool d2h) const {
    std::vector<op2d> v;
    for (std::size_t l = 0; l < layers; ++l)
      for (std::size_t p = 0; p < 2; ++p)
        for (std::size_t i = 0; i < sel; ++i) {
          auto* d = dev_block(l, p, i);
          auto* h = host_block(l, p, i);
          v.push_back(d2h ? op2d{h, d, frag, 1, 0, 0} : op2d{d, h, frag, 1, 0, 0});
        }
    return v;
  }
  // K and V of one block as one 2D op of 2 rows (device pitch nb*frag, host pitch sel*frag).
  std::vector<op2d> nhd_planes(bool d2h) const {
    std::vector<op2d> v;
    for (std::size_t l = 0; l < layers; ++l)
      for (std::size_t i = 0; i < sel; ++i) {
        auto* d = dev_block(l, 0, i);
        auto* h = host_block(l, 0, i);
        v.push_back(d2h ? op2d{h, d, frag, 2, sel * frag, nb * frag} : op2d{d, h, frag, 2, nb * frag, sel * frag});
      }
    return v;
  }
  // HND: each head of each block, 16 rows of 256 bytes (device pitch 256, host pitch heads*256).
  std::vector<op2d> hnd(bool d2h) const {
    std::vector<op2d> v;
    for (std::size_t l = 0; l < layers; ++l)
      for (std::size_t p = 0; p < 2; ++p)
        for (std::size_t i = 0; i < sel; ++i)
          for (std::size_t h = 0; h < heads; ++h) {
            auto* d = dev_block(l, p, i) + h * tokens * hb;
            auto* c = host_block(l, p, i) + h * hb;
            v.push_back(d2h ? op2d{c, d, hb, tokens, heads * hb, hb} : op2d{d, c, hb, tokens, hb, heads * hb});
          }
    return v;
  }
};

double contiguous(rig& r, bool d2h) {
  std::vector<double> t;
  for (int k = 0; k < 4; ++k) {
    const auto t0 = clk::now();
    CK(cudaMemcpyAsync(d2h ? static_cast<void*>(r.host) : r.dev_lin, d2h ? static_cast<void*>(r.dev_lin) : r.host,
                       iter_bytes, d2h ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, r.s[0]));
    CK(cudaStreamSynchronize(r.s[0]));
    if (k) t.push_back(std::chrono::duration<double>(clk::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return iter_bytes / t[t.size() / 2] / 1e9;
}

// Median GB/s over `reps` runs after one warm-up; `fn` queues one iteration.
double timeit(rig& r, const std::function<void()>& fn, int reps = 3) {
  std::vector<double> t;
  for (int k = 0; k <= reps; ++k) {
    CK(cudaDeviceSynchronize());
    const auto t0 = clk::now();
    fn();
    CK(cudaDeviceSynchronize());
    const double s = std::chrono::duration<double>(clk::now() - t0).count();
    if (k) t.push_back(s);
    if (k == 0 && s > 2.0) reps = 1;  // slow methods: one timed run
  }
  (void)r;
  std::sort(t.begin(), t.end());
  return iter_bytes / t[t.size() / 2] / 1e9;
}

// --- methods over a list of ops (1D when height == 1) -------------------------------------------
void per_call(const std::vector<op2d>& v, cudaStream_t* s, int ns) {
  for (std::size_t i = 0; i < v.size(); ++i) {
    const auto& o = v[i];
    if (o.height == 1)
      CK(cudaMemcpyAsync(o.dst, o.src, o.width, cudaMemcpyDefault, s[i % ns]));
    else
      CK(cudaMemcpy2DAsync(o.dst, o.dpitch, o.src, o.spitch, o.width, o.height, cudaMemcpyDefault, s[i % ns]));
  }
}

// 1D batch: 2D ops become one entry per row. Split into `ns` contiguous parts, each in `chunk` entries.
void batch1d(const std::vector<op2d>& v, cudaStream_t* s, int ns, std::size_t chunk) {
  std::vector<void*> d;
  std::vector<const void*> sr;
  std::vector<std::size_t> z;
  for (const auto& o : v)
    for (std::size_t r = 0; r < o.height; ++r) {
      d.push_back(o.dst + r * o.dpitch);
      sr.push_back(o.src + r * o.spitch);
      z.push_back(o.width);
    }
  cudaMemcpyAttributes a{};
  a.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  a.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  std::size_t idx = 0;
  const std::size_t n = d.size();
  for (int k = 0; k < ns; ++k) {
    const std::size_t b = n * k / ns, e = n * (k + 1) / ns;
    for (std::size_t x = b; x < e; x += chunk) {
      const std::size_t m = std::min(chunk, e - x);
      CK(cudaMemcpyBatchAsync(d.data() + x, sr.data() + x, z.data() + x, m, &a, &idx, 1, s[k]));
    }
  }
}

void batch3d(const std::vector<op2d>& v, cudaStream_t* s, int ns, std::size_t chunk) {
  std::vector<cudaMemcpy3DBatchOp> ops(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    const auto& o = v[i];
    auto& b = ops[i];
    std::memset(&b, 0, sizeof b);
    b.src.type = cudaMemcpyOperandTypePointer;
    b.src.op.ptr.ptr = const_cast<std::byte*>(o.src);
    b.src.op.ptr.rowLength = o.height > 1 ? o.spitch : 0;
    b.dst.type = cudaMemcpyOperandTypePointer;
    b.dst.op.ptr.ptr = o.dst;
    b.dst.op.ptr.rowLength = o.height > 1 ? o.dpitch : 0;
    b.extent = make_cudaExtent(o.width, o.height, 1);
    b.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    b.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  }
  const std::size_t n = ops.size();
  for (int k = 0; k < ns; ++k) {
    const std::size_t b = n * k / ns, e = n * (k + 1) / ns;
    for (std::size_t x = b; x < e; x += chunk)
      CK(cudaMemcpy3DBatchAsync(std::min(chunk, e - x), ops.data() + x, 0, s[k]));
  }
}

// Host side of each op replaced by a packed slot in a device buffer (D2D), then one contiguous PCIe
// copy per slab of `slab` bytes, two streams, pipelined: the DMA-only analogue of the staged path.
void via_device(rig& r, const std::vector<op2d>& v, bool d2h, bool three_d, std::size_t slab) {
  // Ops are in chunk order and the host side of consecutive ops tiles host[0, iter_bytes).
  std::vector<op2d> dd;
  dd.reserve(v.size());
  for (const auto& o : v) {
    if (d2h) {
      const std::size_t off = static_cast<std::size_t>(o.dst - r.host);
      dd.push_back({r.dev_lin + off, o.src, o.width, o.height, o.dpitch, o.spitch});
    } else {
      const std::size_t off = static_cast<std::size_t>(o.src - r.host);
      dd.push_back({o.dst, r.dev_lin + off, o.width, o.height, o.dpitch, o.spitch});
    }
  }
  // Split ops at slab boundaries of the host offset.
  std::size_t i = 0;
  cudaEvent_t ev[64];
  int nev = 0;
  for (std::size_t lo = 0; lo < iter_bytes; lo += slab) {
    const std::size_t hi = std::min(iter_bytes, lo + slab);
    const std::size_t b = i;
    while (i < dd.size()) {
      const std::size_t off = static_cast<std::size_t>((d2h ? dd[i].dst : dd[i].src) - r.dev_lin);
      if (off >= hi) break;
      ++i;
    }
    std::vector<op2d> part(dd.begin() + static_cast<std::ptrdiff_t>(b), dd.begin() + static_cast<std::ptrdiff_t>(i));
    CK(cudaEventCreateWithFlags(&ev[nev], cudaEventDisableTiming));
    if (d2h) {
      if (three_d) batch3d(part, &r.s[0], 1, part.size()); else batch1d(part, &r.s[0], 1, part.size());
      CK(cudaEventRecord(ev[nev], r.s[0]));
      CK(cudaStreamWaitEvent(r.s[1], ev[nev], 0));
      CK(cudaMemcpyAsync(r.host + lo, r.dev_lin + lo, hi - lo, cudaMemcpyDeviceToHost, r.s[1]));
    } else {
      CK(cudaMemcpyAsync(r.dev_lin + lo, r.host + lo, hi - lo, cudaMemcpyHostToDevice, r.s[1]));
      CK(cudaEventRecord(ev[nev], r.s[1]));
      CK(cudaStreamWaitEvent(r.s[0], ev[nev], 0));
      if (three_d) batch3d(part, &r.s[0], 1, part.size()); else batch1d(part, &r.s[0], 1, part.size());
    }
    ++nev;
  }
  CK(cudaDeviceSynchronize());
  for (int k = 0; k < nev; ++k) CK(cudaEventDestroy(ev[k]));
}

// Moves each op's bytes in host memory (what a CPU transpose pass would cost), `threads` threads.
void cpu_pass(const std::vector<op2d>& v, std::byte* from, std::byte* to, std::size_t host_side_off_base, int threads,
              bool d2h, std::byte* host) {
  (void)host_side_off_base;
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      const std::size_t b = v.size() * t / threads, e = v.size() * (t + 1) / threads;
      for (std::size_t i = b; i < e; ++i) {
        const auto& o = v[i];
        // Host-side rows at the op's chunk position; "device" side packed at the same offset base.
        const std::byte* hs = d2h ? o.dst : o.src;
        const std::size_t off = static_cast<std::size_t>(hs - host);
        const std::size_t hp = d2h ? o.dpitch : o.spitch;
        for (std::size_t r = 0; r < o.height; ++r) std::memcpy(to + off + r * hp, from + off + r * o.width, o.width);
      }
    });
  for (auto& x : ts) x.join();
}

// Bit-exact check of an HND method: device -> host, then host -> device into poisoned caches.
bool verify(rig& r, const std::vector<op2d>& d2h_ops, const std::vector<op2d>& h2d_ops,
            const std::function<void(const std::vector<op2d>&, bool)>& run) {
  // Expected host: replay with cudaMemcpy2D (synchronous, trusted).
  std::vector<std::byte> want(iter_bytes);
  std::memset(r.host, 0x11, iter_bytes);
  run(d2h_ops, true);
  CK(cudaDeviceSynchronize());
  std::vector<std::byte> got(r.host, r.host + iter_bytes);
  std::memset(r.host, 0x22, iter_bytes);
  for (const auto& o : d2h_ops)
    CK(cudaMemcpy2D(o.dst, o.dpitch ? o.dpitch : o.width, o.src, o.spitch ? o.spitch : o.width, o.width, o.height,
                    cudaMemcpyDefault));
  bool ok = std::memcmp(got.data(), r.host, iter_bytes) == 0;
  // H2D: poison the caches, run, compare one layer against a download of the trusted replay.
  std::vector<std::byte> a(2 * r.nb * r.frag), b(2 * r.nb * r.frag);
  for (auto* c : r.cache) CK(cudaMemset(c, 0x33, 2 * r.nb * r.frag));
  run(h2d_ops, false);
  CK(cudaDeviceSynchronize());
  CK(cudaMemcpy(a.data(), r.cache[5], a.size(), cudaMemcpyDeviceToHost));
  for (auto* c : r.cache) CK(cudaMemset(c, 0x33, 2 * r.nb * r.frag));
  for (const auto& o : h2d_ops)
    CK(cudaMemcpy2D(o.dst, o.dpitch ? o.dpitch : o.width, o.src, o.spitch ? o.spitch : o.width, o.width, o.height,
                    cudaMemcpyDefault));
  CK(cudaMemcpy(b.data(), r.cache[5], b.size(), cudaMemcpyDeviceToHost));
  ok = ok && a == b;
  return ok;
}

}  // namespace

// Batch shapes (streams x copies per call) for 1D fragments, and host reorder threads.
int sweep(const cudaDeviceProp& prop) {
  for (const std::size_t frag : {std::size_t{8} << 10, std::size_t{16} << 10, std::size_t{32} << 10, std::size_t{64} << 10}) {
    rig r(frag);
    for (const bool d2h : {true, false}) {
      const double lim = contiguous(r, d2h);
      const auto nhd = r.nhd(d2h);
      for (const int ns : {1, 2, 4})
        for (const std::size_t per : {std::size_t{256}, std::size_t{1024}, std::size_t{4096}, nhd.size()}) {
          const double g = timeit(r, [&] { batch1d(nhd, r.s, ns, per); }, 2);
          std::printf("{\"gpu\":\"%s\",\"sweep\":\"batch\",\"dir\":\"%s\",\"frag_KiB\":%zu,\"streams\":%d,\"per_call\":%zu,"
                      "\"GBps\":%.2f,\"limit_GBps\":%.2f,\"ratio\":%.3f}\n",
                      prop.name, d2h ? "D2H" : "H2D", frag >> 10, ns, per == nhd.size() ? 0 : per, g, lim, g / lim);
          std::fflush(stdout);
        }
      if (frag == (std::size_t{8} << 10) || frag == (std::size_t{32} << 10)) {
        const auto hnd = r.hnd(d2h);
        std::vector<std::byte> scratch(iter_bytes);
        for (const int th : {1, 2, 4, 6, 8}) {
          std::vector<double> t;
          for (int k = 0; k < 3; ++k) {
            const auto t0 = clk::now();
            if (d2h)
              cpu_pass(hnd, scratch.data(), r.host, 0, th, true, r.host);
            else
              cpu_pass(hnd, r.host, scratch.data(), 0, th, false, r.host);
            t.push_back(std::chrono::duration<double>(clk::now() - t0).count());
          }
          std::sort(t.begin(), t.end());
          const double g = iter_bytes / t[1] / 1e9;
          std::printf("{\"gpu\":\"%s\",\"sweep\":\"reorder_threads\",\"dir\":\"%s\",\"frag_KiB\":%zu,\"threads\":%d,"
                      "\"GBps\":%.2f,\"limit_GBps\":%.2f,\"ratio\":%.3f}\n",
                      prop.name, d2h ? "D2H" : "H2D", frag >> 10, th, g, lim, g / lim);
          std::fflush(stdout);
        }
      }
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "quick") == 0;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::fprintf(stderr, "device: %s, async engines %d\n", prop.name, prop.asyncEngineCount);
  if (argc > 1 && std::strcmp(argv[1], "sweep") == 0) return sweep(prop);
  for (const std::size_t frag : {std::size_t{8} << 10, std::size_t{32} << 10}) {
    rig r(frag);
    for (const bool d2h : {true, false}) {
      const double lim = contiguous(r, d2h);
      const char* dir = d2h ? "D2H" : "H2D";
      const auto emit = [&](const char* lay, const char* m, double g) {
        std::printf("{\"gpu\":\"%s\",\"dir\":\"%s\",\"layout\":\"%s\",\"frag_KiB\":%zu,\"method\":\"%s\",\"GBps\":%.2f,"
                    "\"limit_GBps\":%.2f,\"ratio\":%.3f}\n",
                    prop.name, dir, lay, frag >> 10, m, g, lim, g / lim);
        std::fflush(stdout);
      };
      emit("-", "contiguous", lim);
      const auto nhd = r.nhd(d2h), planes = r.nhd_planes(d2h), hnd = r.hnd(d2h);
      emit("nhd", "per_block_1s", timeit(r, [&] { per_call(nhd, r.s, 1); }));
      emit("nhd", "per_block_4s", timeit(r, [&] { per_call(nhd, r.s, 4); }));
      emit("nhd", "memcpy2d_planes_1s", timeit(r, [&] { per_call(planes, r.s, 1); }));
      emit("nhd", "memcpy2d_planes_4s", timeit(r, [&] { per_call(planes, r.s, 4); }));
      emit("nhd", "batch_1s", timeit(r, [&] { batch1d(nhd, r.s, 1, nhd.size()); }));
      emit("nhd", "batch_4s", timeit(r, [&] { batch1d(nhd, r.s, 4, nhd.size()); }));
      emit("nhd", "batch_1s_x1024", timeit(r, [&] { batch1d(nhd, r.s, 1, 1024); }));
      emit("nhd", "batch_4s_x1024", timeit(r, [&] { batch1d(nhd, r.s, 4, 1024); }));
      emit("nhd", "batch3d_1s", timeit(r, [&] { batch3d(nhd, r.s, 1, nhd.size()); }));
      emit("nhd", "batch3d_planes_1s", timeit(r, [&] { batch3d(planes, r.s, 1, planes.size()); }));
      emit("nhd", "batch3d_planes_4s", timeit(r, [&] { batch3d(planes, r.s, 4, planes.size()); }));
      emit("nhd", "via_device_batch_32MiB", timeit(r, [&] { via_device(r, nhd, d2h, false, std::size_t{32} << 20); }));
      emit("nhd", "via_device_batch3d_planes_32MiB",
           timeit(r, [&] { via_device(r, planes, d2h, true, std::size_t{32} << 20); }));
      // HND
      if (!quick) emit("hnd", "batch_rows_4s(current)", timeit(r, [&] { batch1d(hnd, r.s, 4, hnd.size()); }, 1));
      emit("hnd", "memcpy2d_1s", timeit(r, [&] { per_call(hnd, r.s, 1); }));
      emit("hnd", "memcpy2d_4s", timeit(r, [&] { per_call(hnd, r.s, 4); }));
      emit("hnd", "batch3d_1s", timeit(r, [&] { batch3d(hnd, r.s, 1, hnd.size()); }));
      emit("hnd", "batch3d_4s", timeit(r, [&] { batch3d(hnd, r.s, 4, hnd.size()); }));
      emit("hnd", "batch3d_1s_x4096", timeit(r, [&] { batch3d(hnd, r.s, 1, 4096); }));
      emit("hnd", "via_device_batch3d_32MiB", timeit(r, [&] { via_device(r, hnd, d2h, true, std::size_t{32} << 20); }));
      emit("hnd", "via_device_batch3d_8MiB", timeit(r, [&] { via_device(r, hnd, d2h, true, std::size_t{8} << 20); }));
      // D2D alone: the transposes inside device memory (no PCIe).
      {
        std::vector<op2d> dd;
        for (const auto& o : hnd) {
          const std::size_t off = static_cast<std::size_t>((d2h ? o.dst : o.src) - r.host);
          dd.push_back(d2h ? op2d{r.dev_lin + off, o.src, o.width, o.height, o.dpitch, o.spitch}
                           : op2d{o.dst, r.dev_lin + off, o.width, o.height, o.dpitch, o.spitch});
        }
        emit("hnd", "d2d_batch3d_only", timeit(r, [&] { batch3d(dd, r.s, 1, dd.size()); }));
        std::vector<op2d> dn;
        for (const auto& o : nhd) {
          const std::size_t off = static_cast<std::size_t>((d2h ? o.dst : o.src) - r.host);
          dn.push_back(d2h ? op2d{r.dev_lin + off, o.src, o.width, 1, 0, 0} : op2d{o.dst, r.dev_lin + off, o.width, 1, 0, 0});
        }
        emit("nhd", "d2d_batch_only", timeit(r, [&] { batch1d(dn, r.s, 1, dn.size()); }));
      }
      // CPU transpose pass (host to host), 1 and 4 threads, for the host-assisted alternative.
      {
        std::vector<std::byte> scratch(iter_bytes);
        std::byte* h = r.host;
        for (int th : {1, 4}) {
          std::vector<double> t;
          for (int k = 0; k < 3; ++k) {
            const auto t0 = clk::now();
            if (d2h)
              cpu_pass(hnd, scratch.data(), h, 0, th, true, h);
            else
              cpu_pass(hnd, h, scratch.data(), 0, th, false, h);
            t.push_back(std::chrono::duration<double>(clk::now() - t0).count());
          }
          std::sort(t.begin(), t.end());
          emit("hnd", th == 1 ? "cpu_transpose_1t" : "cpu_transpose_4t", iter_bytes / t[1] / 1e9);
        }
      }
    }
    // Bit-exactness of the 3D batch and memcpy2D HND methods.
    {
      const auto a = r.hnd(true), b = r.hnd(false);
      const bool ok3 = verify(r, a, b, [&](const std::vector<op2d>& v, bool) { batch3d(v, r.s, 4, v.size()); });
      const bool ok2 = verify(r, a, b, [&](const std::vector<op2d>& v, bool) { per_call(v, r.s, 4); });
      const bool okv = verify(r, a, b, [&](const std::vector<op2d>& v, bool d) { via_device(r, v, d, true, 32 << 20); });
      std::printf("{\"gpu\":\"%s\",\"frag_KiB\":%zu,\"verify_hnd_batch3d\":%s,\"verify_hnd_memcpy2d\":%s,\"verify_hnd_via_device\":%s}\n",
                  prop.name, frag >> 10, ok3 ? "true" : "false", ok2 ? "true" : "false", okv ? "true" : "false");
      std::fflush(stdout);
    }
  }
  return 0;
}
