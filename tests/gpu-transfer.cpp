// GPU data path: bit-exact round trips through the pinned pool and the CUDA scheduler for every
// layout and element size, hints (events, streams), concurrency, DMA-only mode (every layout,
// bounce slabs, host reordering), pool growth.
// Every test skips with a message when no GPU is present.

#include "gpu_support.hpp"

#include <atomic>
#include <chrono>
#include <optional>
#include <random>
#include <thread>

using namespace kvortex;
using namespace kvg;

namespace {

// Stores `n` tokens from `src` (blocks `ts`), retrieves them into `dst` (blocks `td`) and checks
// `dst` byte for byte: retrieved tokens hold `src`'s KV, every other byte is untouched.
void round_trip(gpu_engine& e, device_cache& src, std::span<const std::int32_t> ts, device_cache& dst,
                std::span<const std::int32_t> td, std::span<const token_id> toks, std::size_t expect_tokens) {
  auto st = e.store(toks, src.device_layout(), ts);
  REQUIRE_MESSAGE(st.has_value(), (st ? "" : st.error().what()));
  auto stored = st->wait();
  REQUIRE_MESSAGE(stored.has_value(), (stored ? "" : stored.error().what()));
  CHECK(*stored == expect_tokens);
  CHECK(e.lookup(toks).value() == expect_tokens);

  auto rt = e.retrieve(toks, dst.device_layout(), td);
  REQUIRE_MESSAGE(rt.has_value(), (rt ? "" : rt.error().what()));
  auto got = rt->wait();
  REQUIRE_MESSAGE(got.has_value(), (got ? "" : got.error().what()));
  CHECK(*got == expect_tokens);

  auto img = image(src.mirror_layout(), ts, *got);
  apply(dst.mirror_layout(), td, *got, img);
  CHECK(differences(dst.download(), dst.host) == 0);
}

cuda_transfer_scheduler dma_scheduler(std::optional<cuda_transfer_tuning> t = std::nullopt) {
  cuda_transfer_scheduler::options o;
  o.mode = cuda_transfer_mode::dma;
  o.tuning = t;
  auto s = cuda_transfer_scheduler::create(o);
  REQUIRE_MESSAGE(s.has_value(), (s ? "" : s.error().what()));
  CHECK_FALSE(s->uses_kernels());
  return std::move(*s);
}

// DMA-only with 4 KiB bounce slabs: a batch spans many slabs and reuses each, and blocks larger
// than a slab fall back to 2D copies.
constexpr cuda_transfer_tuning tiny_dma{.slab_bytes = 4096, .slabs = 2, .ctas = 2, .threads = 64,
                                        .max_fragment_bytes = 1024, .dma_min_fragment_bytes = 0, .dma_streams = 3,
                                        .descriptor_capacity = 1024};

// By value: GCC 13 flags a reference bound to a call with a temporary argument (-Wdangling-reference).
layout_case find_layout(const std::vector<layout_case>& layouts, const std::string& n) {
  for (const auto& l : layouts)
    if (l.name == n) return l;
  FAIL("no layout " << n);
  return layouts.front();
}

// `threads` threads each store 500 tokens and retrieve them into their own cache, 3 times.
void concurrent_round_trips(gpu_engine& e, const layout_case& lc) {
  constexpr int threads = 4;
  std::atomic<int> failures{0};
  std::vector<std::thread> ts;
  std::vector<std::unique_ptr<device_cache>> srcs, dsts;
  for (int t = 0; t < threads; ++t) {
    srcs.push_back(std::make_unique<device_cache>(lc, 64, 16));
    dsts.push_back(std::make_unique<device_cache>(lc, 64, 16));
    srcs.back()->randomize(100 + t);
    dsts.back()->randomize(200 + t);
  }
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      const auto toks = tokens(500, 1000 + t);
      const auto tsrc = random_table(32, 64, 300 + t), tdst = random_table(32, 64, 400 + t);
      for (int rep = 0; rep < 3; ++rep) {
        auto st = e.store(toks, srcs[t]->device_layout(), tsrc);
        if (!st || !st->wait()) ++failures;
        auto rt = e.retrieve(toks, dsts[t]->device_layout(), tdst);
        if (!rt) {
          ++failures;
          continue;
        }
        auto got = rt->wait();
        if (!got || *got != 500) ++failures;
      }
    });
  for (auto& t : ts) t.join();
  CHECK(failures.load() == 0);
  for (int t = 0; t < threads; ++t) {
    auto img = image(srcs[t]->mirror_layout(), random_table(32, 64, 300 + t), 500);
    apply(dsts[t]->mirror_layout(), random_table(32, 64, 400 + t), 500, img);
    CHECK(differences(dsts[t]->download(), dsts[t]->host) == 0);
  }
}

}  // namespace

TEST_CASE("gpu: bit-exact round trip for every layout and element size") {
  KVG_REQUIRE_GPU();
  for (std::uint32_t elem : {1u, 2u, 4u}) {
    for (const auto& lc : all_layouts(elem)) {
      CAPTURE(lc.name);
      CAPTURE(elem);
      auto e = make_engine(config_for(lc.geometry));
      const std::size_t n = 100;  // 3 full chunks of 32 and a partial one of 4
      const std::size_t nb = lc.paged ? 24 : 7;
      const std::size_t blocks = (n + 15) / 16;
      device_cache src(lc, nb, 16), dst(lc, nb, 16);
      src.randomize(elem * 100 + 1);
      dst.randomize(elem * 100 + 2);
      const auto ts = lc.paged ? random_table(blocks, nb, 11 + elem) : std::vector<std::int32_t>{};
      const auto td = lc.paged ? random_table(blocks, nb, 29 + elem) : std::vector<std::int32_t>{};
      const auto toks = tokens(n, 5 + elem);
      // Page layouts carry whole blocks only: the partial chunk's 4 tokens are not stored.
      const std::size_t expect = lc.name == "pages" ? 96 : n;
      round_trip(e, src, ts, dst, td, toks, expect);
    }
  }
}

TEST_CASE("gpu: store from one layout, retrieve into another (NHD -> HND, FlashAttention -> FlashInfer)") {
  KVG_REQUIRE_GPU();
  const auto layouts = all_layouts(2);
  const auto a = find_layout(layouts, "flash_attn_nhd");
  for (const char* other : {"flash_attn_hnd", "flashinfer_nhd", "flashinfer_hnd"}) {
    CAPTURE(other);
    const auto b = find_layout(layouts, other);
    auto e = make_engine(config_for(a.geometry));
    device_cache src(a, 40, 16), dst(b, 40, 16);
    src.randomize(3);
    dst.randomize(4);
    const auto toks = tokens(320, 9);
    round_trip(e, src, random_table(20, 40, 1), dst, random_table(20, 40, 2), toks, 320);
  }
}

TEST_CASE("gpu: larger fragments and many slabs (32 KiB blocks, 8 MiB of KV)") {
  KVG_REQUIRE_GPU();
  layout_case lc = all_layouts(2).front();  // flash_attn_nhd
  lc.geometry = geo(8, 2, 8, 128, 2);        // 2 KiB rows: 32 KiB blocks
  lc.tensors = 8;
  auto c = config_for(lc.geometry, 64);
  c.chunk_tokens = 256;
  auto e = make_engine(c);
  device_cache src(lc, 300, 16), dst(lc, 300, 16);
  src.randomize(7);
  dst.randomize(8);
  const auto toks = tokens(2000, 3);  // 7 full chunks, 208 tokens partial
  round_trip(e, src, random_table(125, 300, 5), dst, random_table(125, 300, 6), toks, 2000);
}

TEST_CASE("gpu: several threads store and retrieve at once") {
  KVG_REQUIRE_GPU();
  const auto lc = all_layouts(2).front();
  auto e = make_engine(config_for(lc.geometry, 256));
  concurrent_round_trips(e, lc);
}

TEST_CASE("gpu: DMA-only round trips are bit-exact for every layout and element size") {
  KVG_REQUIRE_GPU();
  for (const bool tiny : {false, true})
    for (std::uint32_t elem : {1u, 2u, 4u})
      for (const auto& lc : all_layouts(elem))
        for (const bool adjacent : {false, true}) {
          if (adjacent && !lc.paged) continue;  // contiguous layouts have no table
          CAPTURE(lc.name);
          CAPTURE(elem);
          CAPTURE(tiny);
          CAPTURE(adjacent);  // identity table: neighbouring blocks merge into one copy
          auto e = make_engine(config_for(lc.geometry), dma_scheduler(tiny ? std::optional(tiny_dma) : std::nullopt));
          const std::size_t n = 100, nb = lc.paged ? 24 : 7, blocks = (n + 15) / 16;
          device_cache src(lc, nb, 16), dst(lc, nb, 16);
          src.randomize(elem * 100 + 1);
          dst.randomize(elem * 100 + 2);
          const auto ts = lc.paged && !adjacent ? random_table(blocks, nb, 11 + elem) : std::vector<std::int32_t>{};
          const auto td = lc.paged && !adjacent ? random_table(blocks, nb, 29 + elem) : std::vector<std::int32_t>{};
          const std::size_t expect = lc.name == "pages" ? 96 : n;
          round_trip(e, src, ts, dst, td, tokens(n, 5 + elem), expect);
        }
}

TEST_CASE("gpu: DMA-only chunks are the same for every layout (HND <-> NHD, FlashInfer <-> FlashAttention)") {
  KVG_REQUIRE_GPU();
  // A round trip within one layout would pass with the heads left in cache order in the chunk;
  // across layouts it passes only when both directions use the chunk layout. 310 tokens end in a
  // partial block, whose heads are not contiguous in the cache.
  const auto layouts = all_layouts(2);
  const std::pair<const char*, const char*> pairs[] = {{"flash_attn_hnd", "flash_attn_nhd"},
                                                       {"flash_attn_nhd", "flash_attn_hnd"},
                                                       {"flashinfer_hnd", "flash_attn_nhd"},
                                                       {"flash_attn_hnd", "flashinfer_hnd"}};
  for (const bool tiny : {false, true})
    for (const auto& [from, to] : pairs) {
      CAPTURE(from);
      CAPTURE(to);
      CAPTURE(tiny);
      const auto a = find_layout(layouts, from);
      const auto b = find_layout(layouts, to);
      auto e = make_engine(config_for(a.geometry), dma_scheduler(tiny ? std::optional(tiny_dma) : std::nullopt));
      device_cache src(a, 40, 16), dst(b, 40, 16);
      src.randomize(3);
      dst.randomize(4);
      round_trip(e, src, random_table(20, 40, 1), dst, random_table(20, 40, 2), tokens(310, 9), 310);
    }
}

TEST_CASE("gpu: DMA-only, several threads store and retrieve HND caches at once") {
  KVG_REQUIRE_GPU();
  const auto lc = find_layout(all_layouts(2), "flash_attn_hnd");
  for (const bool tiny : {false, true}) {
    CAPTURE(tiny);
    auto e = make_engine(config_for(lc.geometry, 256), dma_scheduler(tiny ? std::optional(tiny_dma) : std::nullopt));
    concurrent_round_trips(e, lc);
  }
}

TEST_CASE("gpu: DMA-only reordering keeps the hints' order (retrieve releases the stream, store waits)") {
  KVG_REQUIRE_GPU();
  // HND-like blocks: on the device [4 heads][16 tokens][256 B], in the chunk [16 tokens][4 heads][256 B];
  // 2048 blocks (32 MiB) span several 8 MiB bounce slabs.
  constexpr std::size_t heads = 4, rows = 16, w = 256, block = heads * rows * w, count = 2048, bytes = block * count;
  auto sched = dma_scheduler();
  std::byte *dev = nullptr, *host = nullptr, *check = nullptr, *fresh = nullptr;
  KVG_CUDA(cudaMalloc(reinterpret_cast<void**>(&dev), 2 * bytes));
  KVG_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&host), bytes, cudaHostAllocDefault));
  KVG_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&check), bytes, cudaHostAllocDefault));
  KVG_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&fresh), 2 * bytes, cudaHostAllocDefault));
  std::mt19937_64 rng(2);
  for (std::size_t i = 0; i < bytes / 8; ++i) reinterpret_cast<std::uint64_t*>(host)[i] = rng();
  for (std::size_t i = 0; i < 2 * bytes / 8; ++i) reinterpret_cast<std::uint64_t*>(fresh)[i] = rng();
  const auto order = random_table(count, 2 * count, 78);
  std::vector<copy_op> to_dev, to_host;
  for (std::size_t i = 0; i < count; ++i)
    for (std::size_t h = 0; h < heads; ++h) {
      std::byte* d = dev + static_cast<std::size_t>(order[i]) * block + h * rows * w;
      std::byte* c = host + i * block + h * w;
      to_dev.push_back({c, d, w, rows, heads * w, w});
      to_host.push_back({d, c, w, rows, w, heads * w});
    }
  // The device bytes of block i, token r, head h for a chunk `c`.
  const auto transposed_equal = [&](const std::byte* dev_order, const std::byte* chunk) {
    std::size_t bad = 0;
    for (std::size_t i = 0; i < count; ++i)
      for (std::size_t h = 0; h < heads; ++h)
        for (std::size_t r = 0; r < rows; ++r)
          bad += std::memcmp(dev_order + i * block + (h * rows + r) * w, chunk + i * block + (r * heads + h) * w, w) != 0;
    return bad;
  };
  cudaStream_t s{};
  KVG_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t ev{};
  KVG_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));

  // Retrieve with a stream: copies queued on it afterwards see the data without a host wait.
  std::atomic<bool> done{false};
  sched.submit(to_dev, transfer_hints{transfer_direction::from_store, memory_location::device, nullptr, s},
               [&](result<void> r) {
                 CHECK(r.has_value());
                 done = true;
               });
  for (std::size_t i = 0; i < count; ++i)
    KVG_CUDA(cudaMemcpyAsync(check + i * block, dev + static_cast<std::size_t>(order[i]) * block, block,
                             cudaMemcpyDeviceToHost, s));
  KVG_CUDA(cudaStreamSynchronize(s));
  CHECK(transposed_equal(check, host) == 0);
  sched.drain();
  CHECK(done.load());

  // Store that waits for an event: the caller rewrites the device blocks first (64 MiB upload).
  KVG_CUDA(cudaMemcpyAsync(dev, fresh, 2 * bytes, cudaMemcpyHostToDevice, s));
  KVG_CUDA(cudaEventRecord(ev, s));
  std::atomic<bool> ok{false};
  sched.submit(to_host, transfer_hints{transfer_direction::to_store, memory_location::device, ev, nullptr},
               [&](result<void> r) { ok = r.has_value(); });
  sched.drain();
  CHECK(ok.load());
  for (std::size_t i = 0; i < count; ++i)
    std::memcpy(check + i * block, fresh + static_cast<std::size_t>(order[i]) * block, block);
  CHECK(transposed_equal(check, host) == 0);

  (void)cudaEventDestroy(ev);
  (void)cudaStreamDestroy(s);
  (void)cudaFree(dev);
  (void)cudaFreeHost(host);
  (void)cudaFreeHost(check);
  (void)cudaFreeHost(fresh);
}

TEST_CASE("gpu: retrieve releases the caller's stream, store waits for the caller's event") {
  KVG_REQUIRE_GPU();
  auto sched = cuda_transfer_scheduler::create(cuda_transfer_scheduler::options{});
  REQUIRE(sched.has_value());
  constexpr std::size_t frag = 8192, count = 2048, bytes = frag * count;  // 16 MiB in 2048 fragments
  std::byte *dev = nullptr, *host = nullptr, *check = nullptr;
  KVG_CUDA(cudaMalloc(reinterpret_cast<void**>(&dev), 2 * bytes));
  KVG_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&host), bytes, cudaHostAllocDefault));
  KVG_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&check), bytes, cudaHostAllocDefault));
  std::mt19937_64 rng(1);
  for (std::size_t i = 0; i < bytes / 8; ++i) reinterpret_cast<std::uint64_t*>(host)[i] = rng();
  // Device fragments at every other 8 KiB slot, in a shuffled order.
  const auto order = random_table(count, 2 * count, 77);
  std::vector<copy_op> to_dev, to_host;
  for (std::size_t i = 0; i < count; ++i) {
    to_dev.push_back({host + i * frag, dev + static_cast<std::size_t>(order[i]) * frag, frag});
    to_host.push_back({dev + static_cast<std::size_t>(order[i]) * frag, host + i * frag, frag});
  }
  cudaStream_t s{};
  KVG_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t ev{};
  KVG_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));

  // Retrieve with a stream: work queued on it afterwards sees the data without a host wait.
  std::atomic<bool> done{false};
  transfer_hints h{transfer_direction::from_store, memory_location::device, nullptr, s};
  sched->submit(to_dev, h, [&](result<void> r) {
    CHECK(r.has_value());
    done = true;
  });
  for (std::size_t i = 0; i < count; ++i)
    KVG_CUDA(cudaMemcpyAsync(check + i * frag, dev + static_cast<std::size_t>(order[i]) * frag, frag,
                             cudaMemcpyDeviceToHost, s));
  KVG_CUDA(cudaStreamSynchronize(s));
  CHECK(std::memcmp(check, host, bytes) == 0);
  sched->drain();
  CHECK(done.load());

  // Store that waits for an event: the caller rewrites the device fragments first.
  KVG_CUDA(cudaMemsetAsync(dev, 0x5A, 2 * bytes, s));
  KVG_CUDA(cudaEventRecord(ev, s));
  transfer_hints hs{transfer_direction::to_store, memory_location::device, ev, nullptr};
  std::atomic<bool> ok{false};
  sched->submit(to_host, hs, [&](result<void> r) { ok = r.has_value(); });
  sched->drain();
  CHECK(ok.load());
  std::size_t bad = 0;
  for (std::size_t i = 0; i < bytes; ++i) bad += host[i] != std::byte{0x5A};
  CHECK(bad == 0);

  (void)cudaEventDestroy(ev);
  (void)cudaStreamDestroy(s);
  (void)cudaFree(dev);
  (void)cudaFreeHost(host);
  (void)cudaFreeHost(check);
}

TEST_CASE("gpu: DMA-only mode and the kernels give the same bytes") {
  KVG_REQUIRE_GPU();
  layout_case lc = all_layouts(2).front();
  auto c = config_for(lc.geometry);
  for (auto mode : {cuda_transfer_mode::dma, cuda_transfer_mode::staged}) {
    CAPTURE(static_cast<int>(mode));
    cuda_transfer_scheduler::options o;
    o.mode = mode;
    auto s = cuda_transfer_scheduler::create(o);
    REQUIRE(s.has_value());
    if (mode == cuda_transfer_mode::staged && !s->uses_kernels()) {
      MESSAGE("kernels unavailable: " << s->kernel_status());
      continue;
    }
    auto e = make_engine(c, std::move(*s));
    device_cache src(lc, 24, 16), dst(lc, 24, 16);
    src.randomize(1);
    dst.randomize(2);
    round_trip(e, src, random_table(7, 24, 3), dst, random_table(7, 24, 4), tokens(100, 1), 100);
  }
}

TEST_CASE("gpu: small staging slabs and descriptor ring force many windows") {
  KVG_REQUIRE_GPU();
  layout_case lc = all_layouts(2)[1];  // flash_attn_hnd: 64-byte fragments
  auto c = config_for(lc.geometry, 256);
  cuda_transfer_scheduler::options o;
  o.mode = cuda_transfer_mode::staged;
  o.tuning = cuda_transfer_tuning{.slab_bytes = 8192, .slabs = 2, .ctas = 2, .threads = 64,
                                  .max_fragment_bytes = 1024, .dma_min_fragment_bytes = 0, .dma_streams = 2,
                                  .descriptor_capacity = 1024};
  auto s = cuda_transfer_scheduler::create(o);
  REQUIRE(s.has_value());
  auto e = make_engine(c, std::move(*s));
  device_cache src(lc, 80, 16), dst(lc, 80, 16);
  src.randomize(1);
  dst.randomize(2);
  round_trip(e, src, random_table(63, 80, 3), dst, random_table(63, 80, 4), tokens(1000, 2), 1000);
}

TEST_CASE("gpu: 2D ops with random rows and pitches, staged and DMA-only, both directions") {
  KVG_REQUIRE_GPU();
  // Host side (chunk) interleaves groups of "heads" as HND chunks do (pitch = heads * bytes), plus
  // 1D ops and lone 2D ops with gaps between host rows; device side rows at random pitches.
  struct spec {
    std::size_t dev_off, host_off, bytes, rows, dev_pitch, host_pitch;
  };
  std::mt19937 rng(17);
  std::vector<spec> specs;
  std::size_t dev_at = 0, host_at = 0;
  for (int g = 0; g < 400; ++g) {
    const unsigned kind = rng() % 5;
    const bool aligned = rng() % 2 == 0;  // 16-byte paths of the kernels
    std::size_t bytes = kind == 0 ? 1 + rng() % 20000 : 1 + rng() % 600;
    if (aligned) bytes = (bytes + 15) / 16 * 16;
    const std::size_t rows = kind == 0 ? 1 : 1 + rng() % 24;
    const std::size_t heads = kind == 1 ? 1 : 1 + rng() % 8;
    const std::size_t hp = kind == 1 ? bytes + 16 * (1 + rng() % 4) : heads * bytes;
    host_at = aligned ? (host_at + 15) / 16 * 16 : host_at + rng() % 16;
    for (std::size_t h = 0; h < heads; ++h) {
      std::size_t dp = bytes + (rng() % 3 == 0 ? 0 : rng() % 64);
      if (aligned) {
        dp = (dp + 15) / 16 * 16;
        dev_at = (dev_at + 15) / 16 * 16;
      }
      specs.push_back({dev_at, host_at + h * bytes, bytes, rows, dp, hp});
      dev_at += (rows - 1) * dp + bytes + rng() % 32;
    }
    host_at += (rows - 1) * hp + heads * bytes;
  }
  const std::size_t dev_bytes = dev_at + 64, host_bytes = host_at + 64;
  std::byte *dev = nullptr, *host = nullptr;
  KVG_CUDA(cudaMalloc(reinterpret_cast<void**>(&dev), dev_bytes));
  KVG_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&host), host_bytes, cudaHostAllocDefault));
  std::vector<std::byte> dev_data(dev_bytes), host_data(host_bytes);
  for (auto& b : dev_data) b = static_cast<std::byte>(rng());
  for (auto& b : host_data) b = static_cast<std::byte>(rng());
  std::vector<copy_op> store_ops, retrieve_ops;
  for (const auto& x : specs) {
    store_ops.push_back({dev + x.dev_off, host + x.host_off, x.bytes, x.rows, x.dev_pitch, x.host_pitch});
    retrieve_ops.push_back({host + x.host_off, dev + x.dev_off, x.bytes, x.rows, x.host_pitch, x.dev_pitch});
  }
  // What each direction must produce, from host mirrors.
  std::vector<std::byte> want_host(host_bytes, std::byte{0x3C}), want_dev(dev_bytes, std::byte{0xC3});
  for (const auto& x : specs) {
    copy_host({dev_data.data() + x.dev_off, want_host.data() + x.host_off, x.bytes, x.rows, x.dev_pitch, x.host_pitch});
    copy_host({host_data.data() + x.host_off, want_dev.data() + x.dev_off, x.bytes, x.rows, x.host_pitch, x.dev_pitch});
  }

  struct variant {
    const char* name;
    cuda_transfer_mode mode;
    std::optional<cuda_transfer_tuning> tuning;
  };
  const cuda_transfer_tuning tiny{.slab_bytes = 8192, .slabs = 2, .ctas = 2, .threads = 64, .max_fragment_bytes = 1024,
                                  .dma_min_fragment_bytes = 0, .dma_streams = 2, .descriptor_capacity = 1024};
  const cuda_transfer_tuning odd{.slab_bytes = 5000, .slabs = 3, .ctas = 3, .threads = 96, .max_fragment_bytes = 700,
                                 .dma_min_fragment_bytes = 0, .dma_streams = 3, .descriptor_capacity = 1100};
  for (const auto& v : {variant{"staged default", cuda_transfer_mode::staged, std::nullopt},
                        variant{"staged tiny slabs", cuda_transfer_mode::staged, tiny},
                        variant{"staged odd slabs", cuda_transfer_mode::staged, odd},
                        variant{"dma", cuda_transfer_mode::dma, std::nullopt},
                        variant{"dma tiny bounce slabs", cuda_transfer_mode::dma, tiny_dma},
                        variant{"dma odd bounce slabs", cuda_transfer_mode::dma, odd}}) {
    CAPTURE(v.name);
    cuda_transfer_scheduler::options o;
    o.mode = v.mode;
    o.tuning = v.tuning;
    auto s = cuda_transfer_scheduler::create(o);
    REQUIRE_MESSAGE(s.has_value(), (s ? "" : s.error().what()));
    if (v.mode == cuda_transfer_mode::staged && !s->uses_kernels()) {
      MESSAGE("kernels unavailable: " << s->kernel_status());
      continue;
    }
    for (int rep = 0; rep < 2; ++rep) {
      // Store: device -> host.
      KVG_CUDA(cudaMemcpy(dev, dev_data.data(), dev_bytes, cudaMemcpyHostToDevice));
      std::memset(host, 0x3C, host_bytes);
      std::atomic<int> ok{0};
      s->submit(store_ops, transfer_hints{transfer_direction::to_store, memory_location::device, nullptr, nullptr},
                [&](result<void> r) { ok += r.has_value() ? 1 : 0; });
      s->drain();
      CHECK(ok.load() == 1);
      CHECK(std::memcmp(host, want_host.data(), host_bytes) == 0);
      // Retrieve: host -> device.
      std::memcpy(host, host_data.data(), host_bytes);
      KVG_CUDA(cudaMemset(dev, 0xC3, dev_bytes));
      s->submit(retrieve_ops, transfer_hints{transfer_direction::from_store, memory_location::device, nullptr, nullptr},
                [&](result<void> r) { ok += r.has_value() ? 1 : 0; });
      s->drain();
      CHECK(ok.load() == 2);
      std::vector<std::byte> got(dev_bytes);
      KVG_CUDA(cudaMemcpy(got.data(), dev, dev_bytes, cudaMemcpyDeviceToHost));
      CHECK(got == want_dev);
    }
  }
  (void)cudaFree(dev);
  (void)cudaFreeHost(host);
}

TEST_CASE("gpu: many small batches in a row (one per layer) do not exhaust the descriptor ring") {
  KVG_REQUIRE_GPU();
  cuda_transfer_scheduler::options o;
  o.mode = cuda_transfer_mode::staged;
  o.tuning = cuda_transfer_tuning{.slab_bytes = 1 << 20, .slabs = 2, .ctas = 4, .threads = 128,
                                  .max_fragment_bytes = 65536, .dma_min_fragment_bytes = 0, .dma_streams = 2,
                                  .descriptor_capacity = 1024};
  auto s = cuda_transfer_scheduler::create(o);
  REQUIRE(s.has_value());
  if (!s->uses_kernels()) {
    MESSAGE("kernels unavailable: " << s->kernel_status());
    return;
  }
  constexpr std::size_t frag = 256, count = 3000;
  std::byte *dev = nullptr, *host = nullptr;
  KVG_CUDA(cudaMalloc(reinterpret_cast<void**>(&dev), 2 * frag * count));
  KVG_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&host), frag * count, cudaHostAllocDefault));
  std::vector<std::byte> data(frag * count);
  std::mt19937 rng(5);
  for (auto& b : data) b = static_cast<std::byte>(rng());
  KVG_CUDA(cudaMemcpy(dev, data.data(), data.size(), cudaMemcpyHostToDevice));
  std::memset(host, 0, frag * count);
  // One op per batch, each its own ring window: far more batches than the ring has windows.
  std::vector<copy_op> ops;
  for (std::size_t i = 0; i < count; ++i) ops.push_back({dev + i * frag, host + i * frag, frag});
  std::atomic<std::size_t> ok{0};
  for (std::size_t i = 0; i < count; ++i)
    s->submit(std::span(&ops[i], 1), transfer_hints{transfer_direction::to_store, memory_location::device, nullptr, nullptr},
              [&](result<void> r) { ok += r.has_value() ? 1 : 0; });
  s->drain();
  CHECK(ok.load() == count);
  CHECK(std::memcmp(host, data.data(), data.size()) == 0);
  (void)cudaFree(dev);
  (void)cudaFreeHost(host);
}

TEST_CASE("gpu: layer-wise store and retrieve with per-layer events and a stream") {
  KVG_REQUIRE_GPU();
  const auto lc = all_layouts(2).front();
  auto e = make_engine(config_for(lc.geometry));
  device_cache src(lc, 24, 16), dst(lc, 24, 16);
  src.randomize(1);
  dst.randomize(2);
  const auto toks = tokens(96, 4);
  const auto ts = random_table(6, 24, 1), td = random_table(6, 24, 2);
  cudaStream_t s{};
  KVG_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  std::vector<cudaEvent_t> evs(lc.geometry.num_layers);
  for (auto& ev : evs) KVG_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  auto st = e.begin_store(toks, src.device_layout(), ts);
  REQUIRE(st.has_value());
  for (std::size_t l = 0; l < evs.size(); ++l) {
    KVG_CUDA(cudaEventRecord(evs[l], s));
    REQUIRE(st->submit_layer(l, transfer_hints{transfer_direction::to_store, memory_location::device, evs[l], nullptr}));
  }
  auto stt = st->finish();
  REQUIRE(stt.has_value());
  REQUIRE(stt->wait().value() == 96);
  auto rt = e.begin_retrieve(toks, dst.device_layout(), td);
  REQUIRE(rt.has_value());
  for (std::size_t l = 0; l < evs.size(); ++l)
    REQUIRE(rt->submit_layer(l, transfer_hints{transfer_direction::from_store, memory_location::device, nullptr, s}));
  auto rtt = rt->finish();
  REQUIRE(rtt.has_value());
  KVG_CUDA(cudaStreamSynchronize(s));
  REQUIRE(rtt->wait().value() == 96);
  auto img = image(src.mirror_layout(), ts, 96);
  apply(dst.mirror_layout(), td, 96, img);
  CHECK(differences(dst.download(), dst.host) == 0);
  for (auto ev : evs) (void)cudaEventDestroy(ev);
  (void)cudaStreamDestroy(s);
}

TEST_CASE("gpu: pinned pool serves while it grows") {
  KVG_REQUIRE_GPU();
  pinned_host_allocator::options o;
  o.capacity_bytes = std::size_t{2} << 30;
  o.piece_bytes = std::size_t{64} << 20;  // 32 pieces
  auto a = pinned_host_allocator::create(o);
  REQUIRE_MESSAGE(a.has_value(), (a ? "" : a.error().what()));
  CHECK(a->capacity() == o.capacity_bytes);
  CHECK(a->ready_bytes() >= o.piece_bytes);
  CHECK(a->first_ready_seconds() >= 0.0);
  // Ask for 1.5 GiB right away: allocations past the ready pieces wait for them.
  std::vector<void*> blocks;
  const std::size_t blk = std::size_t{16} << 20;
  for (int i = 0; i < 96; ++i) {
    auto p = a->allocate(blk);
    REQUIRE_MESSAGE(p.has_value(), (p ? "" : p.error().what()));
    blocks.push_back(*p);
    cudaPointerAttributes attr{};
    KVG_CUDA(cudaPointerGetAttributes(&attr, *p));
    CHECK(attr.type == cudaMemoryTypeHost);  // registered, not pageable
  }
  CHECK(a->bytes_reserved() == 96 * blk);
  CHECK(a->wait_all_ready(std::chrono::seconds(60)));
  CHECK(a->ready_bytes() == a->capacity());
  CHECK(a->all_ready_seconds() >= a->first_ready_seconds());
  // Full: the 128th fits, the 129th does not (each 64 MiB piece holds four 16 MiB slabs).
  for (int i = 96; i < 128; ++i) blocks.push_back(a->allocate(blk).value());
  auto over = a->allocate(blk);
  REQUIRE_FALSE(over.has_value());
  CHECK(over.error().code == errc::out_of_memory);
  for (void* p : blocks) a->deallocate(p, blk);
  CHECK(a->bytes_reserved() == 0);
  MESSAGE("2 GiB pool in 64 MiB pieces: first piece " << a->first_ready_seconds() << " s, all "
                                                     << a->all_ready_seconds() << " s");
}

TEST_CASE("gpu: engine stores while its pinned pool is still growing") {
  KVG_REQUIRE_GPU();
  layout_case lc = all_layouts(2).front();
  lc.geometry = geo(8, 2, 8, 128, 2);
  lc.tensors = 8;
  auto c = config_for(lc.geometry, 256);
  c.chunk_tokens = 256;  // 8 MiB chunks
  pinned_host_allocator::options o;
  o.capacity_bytes = c.capacity_bytes;
  o.piece_bytes = std::size_t{32} << 20;
  auto e = make_engine(c, cuda_transfer_scheduler::create(c).value(), pinned_host_allocator::create(o).value());
  MESSAGE("pool ready at the first store: " << e.get_allocator().ready_bytes() << " of " << e.get_allocator().capacity());
  device_cache src(lc, 512, 16), dst(lc, 512, 16);
  src.randomize(1);
  dst.randomize(2);
  const auto toks = tokens(4096, 8);  // 16 chunks: 128 MiB over 4 pieces
  round_trip(e, src, random_table(256, 512, 1), dst, random_table(256, 512, 2), toks, 4096);
}

TEST_CASE("gpu: without a device the GPU policies report unsupported") {
  if (kvortex::detail::cuda::has_device()) {
    MESSAGE("a CUDA device is present: nothing to check here");
    return;
  }
  auto s = cuda_transfer_scheduler::create(cuda_transfer_scheduler::options{});
  REQUIRE_FALSE(s.has_value());
  CHECK(s.error().code == errc::unsupported);
  pinned_host_allocator::options o;
  o.capacity_bytes = 1 << 20;
  auto a = pinned_host_allocator::create(o);
  REQUIRE_FALSE(a.has_value());
  CHECK(a.error().code == errc::unsupported);
}
