// Disk tier bandwidth against raw sequential I/O of the same bytes in the same directory, and the
// time to rebuild the index of 100k entries on open.
//
// disk/{write,read}/chunk:4MiB: every iteration moves 64 chunks of 4 MiB (256 MiB) twice, once
// through disk_tier::put/get (one file per chunk: create, pwritev, rename; open, preadv, verify)
// and once as the baseline: one file written or read sequentially in 4 MiB pwrite/pread calls
// with O_DIRECT, as `dd bs=4M oflag=direct` does. The two passes alternate (and which goes first
// alternates), so a shared machine's changing disk speed hits both alike. The reported time is
// the tier's; counters: tier_GBps, raw_GBps and ratio (tier bandwidth / raw bandwidth). `threads`
// splits the 64 chunks over that many threads (requests in flight at once) on both sides. Before
// each write pass that side's previous files are deleted, untimed, so both allocate fresh blocks.
// fsync:1 is fsync_policy::data for the tier and fdatasync after every 4 MiB for the baseline.
// io_uring:1 opens the tier with disk_io_engine::io_uring (requests of 1 MiB, 4 in flight per
// call; skipped, with the reason, where the build or the kernel has none), io_uring:0 with posix
// (one pwritev/preadv per file); the baseline is the same plain loop in both.
// `direct` is 1 when both sides used O_DIRECT, 0 when the filesystem refused it (then both ran
// buffered, through the page cache). Reads also report xxh3_GBps, the checksum's speed on this
// CPU at that moment: a get reads a chunk, then verifies it, one after the other.
//
// The directory is a fresh one under $KVORTEX_BENCH_DIR, else $TMPDIR, else /tmp, removed at exit.
// disk/index_rebuild/entries:100000 opens a tier over 100k small chunk files (written once,
// before the first iteration, and in the page cache from then on): snapshot:0 scans the
// directories and stats every file, snapshot:1 takes sizes and order from the `.index` snapshot
// the previous close wrote (readdir only), verify:1 also reads and checks every header.
// close_seconds is the (untimed) close, which writes the snapshot.

#include <benchmark/benchmark.h>

#include "bench_support.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "kvortex/tiers/disk_tier.hpp"

namespace {

constexpr std::size_t chunk_bytes = std::size_t{4} << 20;
constexpr std::size_t chunks = 64;
constexpr std::size_t rebuild_entries = 100000;

using kvb::take;

struct bench_dir {
  bench_dir() {
    const char* base = std::getenv("KVORTEX_BENCH_DIR");
    if (base == nullptr || *base == '\0') base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/kvortex-bench-disk-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) {
      std::perror("mkdtemp");
      std::abort();
    }
    path = tmpl;
  }
  bench_dir(const bench_dir&) = delete;
  bench_dir& operator=(const bench_dir&) = delete;
  ~bench_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

const std::string& root() {
  static bench_dir d;
  return d.path;
}

// Page-aligned, touched memory with random contents (the checksums see real data).
struct buffer {
  explicit buffer(std::size_t n, std::uint64_t seed) : size(n), data(static_cast<std::byte*>(std::aligned_alloc(4096, n))) {
    if (data == nullptr) std::abort();
    std::mt19937_64 rng(seed);
    for (std::size_t i = 0; i < n; i += 8) {
      const std::uint64_t v = rng();
      std::memcpy(data + i, &v, std::min<std::size_t>(8, n - i));
    }
  }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  ~buffer() { std::free(data); }
  [[nodiscard]] std::span<std::byte> span() const { return {data, size}; }
  std::size_t size;
  std::byte* data;
};

kvortex::chunk_key key(std::uint64_t i) {
  kvortex::chunk_key k;
  std::uint64_t x = i * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  for (std::size_t w = 0; w < 4; ++w) {
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 32;
    std::memcpy(k.bytes.data() + 8 * w, &x, 8);
  }
  return k;
}

kvortex::disk_tier_config tier_config(const std::string& dir, kvortex::fsync_policy policy,
                                      kvortex::disk_io_engine engine = kvortex::disk_io_engine::automatic) {
  kvortex::disk_tier_config c;
  c.io_engine = engine;
  c.directory = dir;
  c.capacity_bytes = std::uint64_t{1} << 40;
  c.fsync = policy;
  for (std::size_t i = 0; i < c.ns.size(); ++i) c.ns[i] = static_cast<std::byte>(i + 1);
  return c;
}

// The `engine` argument: 0 pread/pwrite, 1 io_uring (skipped, with open's reason, where unavailable).
kvortex::disk_io_engine engine_arg(std::int64_t v) {
  return v == 0 ? kvortex::disk_io_engine::posix : kvortex::disk_io_engine::io_uring;
}

// Runs f(thread, chunk) for every chunk, chunk i on thread i % threads.
template <class F>
void on_threads(std::size_t threads, F&& f) {
  if (threads <= 1) {
    for (std::size_t i = 0; i < chunks; ++i) f(0, i);
    return;
  }
  std::vector<std::thread> pool;
  for (std::size_t t = 0; t < threads; ++t)
    pool.emplace_back([&f, t, threads] {
      for (std::size_t i = t; i < chunks; i += threads) f(t, i);
    });
  for (auto& th : pool) th.join();
}

std::vector<std::unique_ptr<buffer>> buffers(std::size_t threads) {
  std::vector<std::unique_ptr<buffer>> v;
  for (std::size_t t = 0; t < threads; ++t) v.push_back(std::make_unique<buffer>(chunk_bytes, t + 1));
  return v;
}

// The raw file, O_DIRECT when the filesystem takes it (as the tier's probe decides).
int open_raw(const std::string& path, int flags, bool& direct) {
  int fd = ::open(path.c_str(), flags | O_DIRECT | O_CLOEXEC, 0644);
  direct = fd >= 0;
  if (fd < 0) fd = ::open(path.c_str(), flags | O_CLOEXEC, 0644);
  if (fd < 0) {
    std::perror(path.c_str());
    std::abort();
  }
  return fd;
}

using clock_type = std::chrono::steady_clock;

// Times tier and raw passes alternately (which goes first alternates too, so a drift in the
// machine's disk speed hits both alike). The benchmark's time is the tier pass (manual time);
// raw_seconds its baseline; ratio = raw time / tier time, i.e. tier bandwidth / raw bandwidth.
struct paired_timer {
  double tier{0}, raw{0};
  template <class Tier, class Raw>
  void iteration(benchmark::State& state, std::int64_t n, Tier&& tier_pass, Raw&& raw_pass) {
    const auto timed = [](auto&& f) {
      const auto t0 = clock_type::now();
      f();
      return std::chrono::duration<double>(clock_type::now() - t0).count();
    };
    double t = 0, r = 0;
    if (n % 2 == 0) {
      t = timed(tier_pass);
      r = timed(raw_pass);
    } else {
      r = timed(raw_pass);
      t = timed(tier_pass);
    }
    tier += t;
    raw += r;
    state.SetIterationTime(t);
  }
  void report(benchmark::State& state, bool tier_direct, bool raw_direct) const {
    const double bytes = static_cast<double>(state.iterations()) * chunks * chunk_bytes;
    state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
    state.counters["tier_GBps"] = bytes / tier / 1e9;
    state.counters["raw_GBps"] = bytes / raw / 1e9;
    state.counters["ratio"] = raw / tier;
    state.counters["direct"] = tier_direct && raw_direct ? 1 : 0;
  }
};

// Tier: put 64 chunks (a file each). Raw: one file, 64 sequential 4 MiB pwrites (thread t writes
// chunks t, t + threads, ...). Each side's previous files are deleted, untimed, before its pass.
void disk_write(benchmark::State& state) {
  const auto threads = static_cast<std::size_t>(state.range(0));
  const bool sync = state.range(1) != 0;
  const std::string dir = root() + "/tier-write", raw_path = root() + "/raw-write";
  auto opened = kvortex::disk_tier::open(
      tier_config(dir, sync ? kvortex::fsync_policy::data : kvortex::fsync_policy::never, engine_arg(state.range(2))));
  if (!opened) {
    state.SkipWithError(opened.error().message.c_str());
    return;
  }
  auto tier = std::move(*opened);
  const auto src = buffers(threads);
  std::atomic<int> failed{0};
  bool raw_direct = false;
  paired_timer timer;
  std::int64_t n = 0;
  for (auto _ : state) {
    for (std::size_t i = 0; i < chunks; ++i) tier.remove(key(i));
    ::unlink(raw_path.c_str());
    timer.iteration(
        state, n++,
        [&] {
          on_threads(threads, [&](std::size_t t, std::size_t i) {
            if (!tier.put(key(i), src[t]->span())) failed.fetch_add(1);
          });
        },
        [&] {
          const int fd = open_raw(raw_path, O_WRONLY | O_CREAT | O_TRUNC, raw_direct);
          on_threads(threads, [&](std::size_t t, std::size_t i) {
            if (::pwrite(fd, src[t]->data, chunk_bytes, static_cast<off_t>(i * chunk_bytes)) !=
                static_cast<ssize_t>(chunk_bytes))
              failed.fetch_add(1);
            if (sync && ::fdatasync(fd) != 0) failed.fetch_add(1);
          });
          ::close(fd);
        });
  }
  ::unlink(raw_path.c_str());
  if (failed.load() != 0) state.SkipWithError("a write failed");
  timer.report(state, tier.direct_io(), raw_direct);
}

// Tier: get the 64 chunks. Raw: 64 sequential 4 MiB preads of one file of the same bytes.
void disk_read(benchmark::State& state) {
  const auto threads = static_cast<std::size_t>(state.range(0));
  const std::string dir = root() + "/tier-read", raw_path = root() + "/raw-read";
  auto opened = kvortex::disk_tier::open(tier_config(dir, kvortex::fsync_policy::never, engine_arg(state.range(1))));
  if (!opened) {
    state.SkipWithError(opened.error().message.c_str());
    return;
  }
  auto tier = std::move(*opened);
  bool raw_direct = false;
  {
    const buffer src(chunk_bytes, 99);
    for (std::size_t i = 0; i < chunks; ++i) take(tier.put(key(i), src.span()), "disk_tier::put");
    const int fd = open_raw(raw_path, O_WRONLY | O_CREAT | O_TRUNC, raw_direct);
    for (std::size_t i = 0; i < chunks; ++i)
      if (::pwrite(fd, src.data, chunk_bytes, static_cast<off_t>(i * chunk_bytes)) != static_cast<ssize_t>(chunk_bytes))
        std::abort();
    ::close(fd);
  }
  const auto dst = buffers(threads);
  const int fd = open_raw(raw_path, O_RDONLY, raw_direct);
  std::atomic<int> failed{0};
  paired_timer timer;
  std::int64_t n = 0;
  for (auto _ : state) {
    timer.iteration(
        state, n++,
        [&] {
          on_threads(threads, [&](std::size_t t, std::size_t i) {
            const auto r = tier.get(key(i), dst[t]->span());
            if (!r || *r != chunk_bytes) failed.fetch_add(1);
          });
        },
        [&] {
          on_threads(threads, [&](std::size_t t, std::size_t i) {
            if (::pread(fd, dst[t]->data, chunk_bytes, static_cast<off_t>(i * chunk_bytes)) !=
                static_cast<ssize_t>(chunk_bytes))
              failed.fetch_add(1);
          });
        });
  }
  ::close(fd);
  ::unlink(raw_path.c_str());
  if (failed.load() != 0) state.SkipWithError("a read failed");
  timer.report(state, tier.direct_io(), raw_direct);
  // What verifying costs on this CPU now: a get reads, then checksums (XXH3-64) the chunk.
  const auto t0 = clock_type::now();
  std::uint64_t sum = 0;
  for (std::size_t i = 0; i < 16; ++i) {
    benchmark::ClobberMemory();  // hash the bytes again each time, not a remembered result
    sum += kvortex::detail::chunk_payload_checksum(dst[0]->span());
  }
  benchmark::DoNotOptimize(sum);
  state.counters["xxh3_GBps"] = 16.0 * chunk_bytes / std::chrono::duration<double>(clock_type::now() - t0).count() / 1e9;
}

// 100k entries of 64 bytes (8 KiB files), written once by 4 threads.
const std::string& rebuild_dir() {
  static const std::string dir = [] {
    const std::string d = root() + "/rebuild";
    auto tier = take(kvortex::disk_tier::open(tier_config(d, kvortex::fsync_policy::never)), "disk_tier::open");
    std::vector<std::thread> pool;
    std::atomic<int> failed{0};
    for (std::size_t t = 0; t < 4; ++t)
      pool.emplace_back([&, t] {
        std::array<std::byte, 64> p{};
        for (std::size_t i = t; i < rebuild_entries; i += 4) {
          std::memcpy(p.data(), &i, sizeof i);
          if (!tier.put(key(i), p)) failed.fetch_add(1);
        }
      });
    for (auto& th : pool) th.join();
    if (failed.load() != 0) std::abort();
    return d;
  }();
  return dir;
}

void index_rebuild(benchmark::State& state) {
  auto cfg = tier_config(rebuild_dir(), kvortex::fsync_policy::never);
  cfg.index_snapshot = state.range(1) != 0;
  cfg.verify_on_open = state.range(2) != 0;
  { auto first = take(kvortex::disk_tier::open(cfg), "disk_tier::open"); }  // leaves the snapshot (if on)
  std::uint64_t entries = 0, from_snapshot = 0;
  double scan = 0, close = 0;
  for (auto _ : state) {
    auto tier = take(kvortex::disk_tier::open(cfg), "disk_tier::open");
    entries = tier.recovery().entries;
    from_snapshot = tier.recovery().from_snapshot;
    scan += tier.recovery().seconds;
    state.PauseTiming();
    const auto t0 = clock_type::now();
    { auto gone = std::move(tier); }  // closing (freeing the index, writing the snapshot) is not the rebuild
    close += std::chrono::duration<double>(clock_type::now() - t0).count();
    state.ResumeTiming();
  }
  if (entries != rebuild_entries) state.SkipWithError("the rebuilt index lacks entries");
  if (cfg.index_snapshot && from_snapshot != entries) state.SkipWithError("the snapshot was not used");
  const auto n = static_cast<double>(state.iterations());
  state.counters["entries"] = static_cast<double>(entries);
  state.counters["from_snapshot"] = static_cast<double>(from_snapshot);
  state.counters["scan_seconds"] = scan / n;
  state.counters["close_seconds"] = close / n;
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * entries));
}

void write_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads", "fsync", "io_uring"});
  for (const int e : {1, 0}) {
    for (const int t : {1, 4}) b->Args({t, 0, e});
    b->Args({1, 1, e});
  }
}
void read_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads", "io_uring"});
  for (const int e : {1, 0})
    for (const int t : {1, 4}) b->Args({t, e});
}

}  // namespace

BENCHMARK(disk_write)->Name("disk/write/chunk:4MiB")->Apply(write_args)->Unit(benchmark::kMillisecond)->UseManualTime();
BENCHMARK(disk_read)->Name("disk/read/chunk:4MiB")->Apply(read_args)->Unit(benchmark::kMillisecond)->UseManualTime();
BENCHMARK(index_rebuild)
    ->Name("disk/index_rebuild")
    ->ArgNames({"entries", "snapshot", "verify"})
    ->Args({static_cast<std::int64_t>(rebuild_entries), 0, 0})
    ->Args({static_cast<std::int64_t>(rebuild_entries), 1, 0})
    ->Args({static_cast<std::int64_t>(rebuild_entries), 0, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
