// The disk tier's I/O engines (io_uring through liburing, pread/pwrite) and what it logs. Every
// test works in a fresh temporary directory (mkdtemp under $TMPDIR or /tmp), removed afterwards;
// children (fork) run what changes process-wide state: RLIMIT_FSIZE, a seccomp filter.

#include <doctest/doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#if __has_include(<linux/seccomp.h>) && __has_include(<linux/filter.h>) && __has_include(<linux/audit.h>)
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#define KVORTEX_TEST_SECCOMP 1
#endif

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvortex/detail/chunk_record.hpp"
#include "kvortex/logging.hpp"
#include "kvortex/tiers/disk_tier.hpp"

namespace fs = std::filesystem;
using kvortex::chunk_key;
using kvortex::disk_io_engine;
using kvortex::disk_tier;
using kvortex::disk_tier_config;
using kvortex::errc;

namespace {

constexpr std::size_t block = disk_tier::block;

std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

chunk_key key(std::uint64_t id) {
  chunk_key k;
  for (std::size_t i = 0; i < 4; ++i) {
    const std::uint64_t v = mix(id * 4 + i + 1000);
    std::memcpy(k.bytes.data() + 8 * i, &v, 8);
  }
  return k;
}

void fill(std::span<std::byte> out, std::uint64_t id) {
  std::uint64_t s = mix(id ^ (out.size() << 20));
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (i % 8 == 0) s = mix(s);
    out[i] = static_cast<std::byte>(s >> (8 * (i % 8)));
  }
}

std::vector<std::byte> payload(std::uint64_t id, std::size_t n) {
  std::vector<std::byte> v(n);
  fill(v, id);
  return v;
}

// 4 KiB-aligned memory, optionally offset to be misaligned on purpose.
struct aligned_buffer {
  explicit aligned_buffer(std::size_t n, std::size_t offset = 0)
      : raw(static_cast<std::byte*>(std::aligned_alloc(block, (n + offset + block) / block * block))), off(offset), size(n) {
    REQUIRE(raw != nullptr);
  }
  aligned_buffer(const aligned_buffer&) = delete;
  aligned_buffer& operator=(const aligned_buffer&) = delete;
  ~aligned_buffer() { std::free(raw); }
  std::span<std::byte> span() { return {raw + off, size}; }
  std::byte* raw;
  std::size_t off, size;
};

struct temp_dir {
  temp_dir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/kvortex-disk-io-XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  [[nodiscard]] std::string sub(const std::string& name) const { return path + "/" + name; }
  std::string path;
};

// Small requests, so a chunk of a few blocks is already several requests and refills the queue.
disk_tier_config config(const std::string& dir, disk_io_engine engine) {
  disk_tier_config c;
  c.directory = dir;
  c.capacity_bytes = std::uint64_t{1} << 30;
  for (std::size_t i = 0; i < c.ns.size(); ++i) c.ns[i] = static_cast<std::byte>(i * 7 + 3);
  c.io_engine = engine;
  c.io_request_bytes = 2 * block;
  c.io_queue_depth = 3;
  return c;
}

disk_tier open_tier(const disk_tier_config& c) {
  auto t = disk_tier::open(c);
  if (!t) FAIL("disk_tier::open: " << t.error().what());
  return std::move(*t);
}

// Whether this build and kernel give the tier a working io_uring.
bool io_uring_here() {
#ifdef KVORTEX_HAS_LIBURING
  int e = 0;
  auto r = kvortex::detail::disk_io::ring::create(4, e);
  return r && r->probe() == 0;
#else
  return false;
#endif
}

std::vector<disk_io_engine> engines() {
  std::vector<disk_io_engine> v{disk_io_engine::posix};
  if (io_uring_here()) v.push_back(disk_io_engine::io_uring);
  return v;
}

std::vector<std::byte> read_file(const std::string& path) {
  std::vector<std::byte> out(fs::file_size(path));
  const int fd = ::open(path.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  REQUIRE(::pread(fd, out.data(), out.size(), 0) == static_cast<ssize_t>(out.size()));
  ::close(fd);
  return out;
}

void flip_byte(const std::string& path, std::size_t offset) {
  const int fd = ::open(path.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  std::byte b{};
  REQUIRE(::pread(fd, &b, 1, static_cast<off_t>(offset)) == 1);
  b ^= std::byte{0x10};
  REQUIRE(::pwrite(fd, &b, 1, static_cast<off_t>(offset)) == 1);
  ::close(fd);
}

// Runs `body` in a forked child and returns its exit code (128 + signal if it was killed).
int in_child(const std::function<int()>& body) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int rc = 99;
    try {
      rc = body();
    } catch (...) {
    }
    std::fflush(nullptr);
    ::_exit(rc);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// The records a test's sink received (copies: a record's views live only during the call).
struct captured {
  kvortex::log_level level;
  std::string component, event, message;
};
struct log_capture {
  log_capture() {
    kvortex::set_log_rate_limit(0, std::chrono::milliseconds{0});  // every record, however many
    kvortex::set_log_sink(
        [this](const kvortex::log_record& r) {
          std::lock_guard lock(mu);
          records.push_back({r.level, std::string(r.component), std::string(r.event), std::string(r.message)});
        },
        kvortex::log_level::debug);
  }
  log_capture(const log_capture&) = delete;
  log_capture& operator=(const log_capture&) = delete;
  ~log_capture() {
    kvortex::set_log_sink({});
    kvortex::set_log_rate_limit(5, std::chrono::milliseconds{10'000});  // the facility's default
  }
  // The records of `event`, from the disk tier.
  std::vector<captured> of(const std::string& event) {
    std::lock_guard lock(mu);
    std::vector<captured> v;
    for (const auto& r : records)
      if (r.component == "disk" && r.event == event) v.push_back(r);
    return v;
  }
  std::mutex mu;
  std::vector<captured> records;
};

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("disk io: the engine is the one configured, and io_engine() reports it") {
  temp_dir d;
  {
    auto t = open_tier(config(d.sub("posix"), disk_io_engine::posix));
    CHECK(t.io_engine() == disk_io_engine::posix);
  }
  const bool uring = io_uring_here();
  MESSAGE("io_uring works here: " << std::string(uring ? "yes" : "no"));
  {
    auto t = open_tier(config(d.sub("auto"), disk_io_engine::automatic));
    CHECK(t.io_engine() == (uring ? disk_io_engine::io_uring : disk_io_engine::posix));
  }
  auto t = disk_tier::open(config(d.sub("uring"), disk_io_engine::io_uring));
  if (uring) {
    REQUIRE(t.has_value());
    CHECK(t->io_engine() == disk_io_engine::io_uring);
  } else {
    REQUIRE_FALSE(t.has_value());
    CHECK(t.error().code == errc::unsupported);
  }
  auto bad = config(d.sub("bad"), disk_io_engine::posix);
  bad.io_request_bytes = block + 1;
  CHECK(bad.validate().error().message.find("io_request_bytes") != std::string::npos);
  bad.io_request_bytes = block;
  bad.io_queue_depth = 0;
  CHECK(bad.validate().error().message.find("io_queue_depth") != std::string::npos);
  bad.io_queue_depth = 1;
  bad.io_engine = static_cast<disk_io_engine>(7);
  CHECK(bad.validate().error().message.find("io_engine") != std::string::npos);
}

TEST_CASE("disk io: every engine writes the same bytes, and reads what any engine wrote") {
  const auto list = engines();
  // Sizes around the block and request (2 blocks) boundaries, and one of many requests.
  const std::vector<std::size_t> sizes{1, 100, block - 1, block, block + 1, 2 * block, 2 * block + 1, 7 * block - 3,
                                       (std::size_t{1} << 20) + 5};
  for (const auto direct : {kvortex::direct_io_mode::automatic, kvortex::direct_io_mode::off}) {
    for (const std::size_t misalign : {std::size_t{0}, std::size_t{24}}) {
      temp_dir d;
      std::vector<disk_tier> tiers;
      for (const auto e : list) {
        auto c = config(d.sub(std::string(kvortex::to_string(e))), e);
        c.direct_io = direct;
        tiers.push_back(open_tier(c));
      }
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        const std::size_t n = sizes[i];
        const bool direct_on = tiers.front().direct_io();
        CAPTURE(n);
        CAPTURE(misalign);
        CAPTURE(direct_on);
        aligned_buffer src(n, misalign);
        fill(src.span(), i);
        for (auto& t : tiers) REQUIRE(t.put(key(i), src.span()).has_value());
        // The files are byte for byte the same, whichever engine wrote them.
        const auto first = read_file(tiers.front().path_of(key(i)));
        CHECK(first.size() == kvortex::detail::disk_entry_bytes(n));
        for (auto& t : tiers) CHECK(read_file(t.path_of(key(i))) == first);
        // Every tier reads every tier's file (the same directory layout: reopen crosswise).
        for (auto& t : tiers) {
          aligned_buffer out(n + 3 * block, misalign);  // larger than the payload: padding is in `out`
          const auto r = t.get(key(i), out.span());
          REQUIRE(r.has_value());
          CHECK(*r == n);
          CHECK(std::memcmp(out.span().data(), src.span().data(), n) == 0);
          aligned_buffer exact(n, misalign);
          const auto r2 = t.get(key(i), exact.span());
          REQUIRE(r2.has_value());
          CHECK(std::memcmp(exact.span().data(), src.span().data(), n) == 0);
        }
      }
      // Crosswise: each engine opens the directory another engine filled.
      std::vector<std::string> dirs;
      for (auto& t : tiers) dirs.push_back(t.config().directory);
      tiers.clear();
      for (std::size_t a = 0; a < list.size(); ++a) {
        auto c = config(dirs[(a + 1) % dirs.size()], list[a]);
        c.direct_io = direct;
        auto t = open_tier(c);
        CHECK(t.recovery().entries == sizes.size());
        for (std::size_t i = 0; i < sizes.size(); ++i) {
          aligned_buffer out(sizes[i], misalign);
          const auto r = t.get(key(i), out.span());
          REQUIRE(r.has_value());
          CHECK(*r == sizes[i]);
          CHECK(out.span().size() == sizes[i]);
          const auto want = [&] {
            aligned_buffer w(sizes[i]);
            fill(w.span(), i);
            return std::vector<std::byte>(w.span().begin(), w.span().end());
          }();
          CHECK(std::memcmp(out.span().data(), want.data(), sizes[i]) == 0);
        }
      }
    }
  }
}

TEST_CASE("disk io: with every engine, a changed byte in any request of a file is a miss, removed and logged") {
  log_capture logs;
  for (const auto e : engines()) {
    CAPTURE(kvortex::to_string(e));
    temp_dir d;
    auto t = open_tier(config(d.path, e));
    const std::size_t n = 5 * block + 100;  // 4 requests of 2 blocks: header, 3 payload pieces, tail
    const std::vector<std::size_t> offsets{0, 90, block + 3, 3 * block + 1, 5 * block + 7, block + n - 1,
                                           kvortex::detail::disk_entry_bytes(n) - 1};
    std::uint64_t removed = 0;
    for (const std::size_t at : offsets) {
      CAPTURE(at);
      aligned_buffer src(n);
      fill(src.span(), at);
      REQUIRE(t.put(key(at), src.span()).has_value());
      flip_byte(t.path_of(key(at)), at);
      aligned_buffer out(n);
      const auto r = t.get(key(at), out.span());
      REQUIRE_FALSE(r.has_value());
      CHECK(r.error().code == errc::not_found);
      CHECK(t.stats().corrupt_removed == ++removed);
      CHECK_FALSE(fs::exists(t.path_of(key(at))));
      const auto rec = logs.of("corrupt_entry_removed");
      REQUIRE(rec.size() >= 1);
      CHECK(rec.back().level == kvortex::log_level::warning);
      CHECK(contains(rec.back().message, t.path_of(key(at))));
      CHECK(contains(rec.back().message, "removed"));
    }
  }
}

TEST_CASE("disk io: logged: the index rebuild with its counts, a damaged snapshot, invalid files removed on open") {
  temp_dir d;
  const auto c = config(d.path, disk_io_engine::automatic);
  {
    auto t = open_tier(c);
    for (std::uint64_t id = 0; id < 3; ++id) REQUIRE(t.put(key(id), payload(id, 3 * block)).has_value());
  }
  REQUIRE(fs::exists(d.sub(".index")));
  flip_byte(d.sub(".index"), 20);
  // A truncated chunk file: removed on open, counted.
  {
    const std::string bad = d.path + "/" + kvortex::detail::disk_paths::entry(key(9)).data();
    fs::create_directories(fs::path(bad).parent_path());
    const auto bytes = kvortex::detail::encode_disk_entry(c.ns, key(9), payload(9, 3 * block));
    FILE* f = std::fopen(bad.c_str(), "wb");
    REQUIRE(f != nullptr);
    REQUIRE(std::fwrite(bytes.data(), 1, block, f) == block);  // the header block only
    std::fclose(f);
  }
  log_capture logs;
  auto t = open_tier(c);
  CHECK(t.recovery().entries == 3);
  CHECK(t.recovery().invalid_removed == 1);
  const auto ignored = logs.of("snapshot_ignored");
  REQUIRE(ignored.size() == 1);
  CHECK(ignored[0].level == kvortex::log_level::warning);
  CHECK(contains(ignored[0].message, "damaged"));
  const auto rebuilt = logs.of("index_rebuilt");
  REQUIRE(rebuilt.size() == 1);
  CHECK(rebuilt[0].level == kvortex::log_level::info);
  CHECK(contains(rebuilt[0].message, "3 entries"));
  CHECK(contains(rebuilt[0].message, "0 from the snapshot"));
  CHECK(contains(rebuilt[0].message, "1 invalid"));
  CHECK(contains(rebuilt[0].message, std::string("io_engine ") + std::string(kvortex::to_string(t.io_engine()))));
  const auto removed = logs.of("corrupt_entry_removed");
  REQUIRE(removed.size() == 1);
  CHECK(contains(removed[0].message, "1 empty, truncated"));
}

TEST_CASE("disk io: disk full (RLIMIT_FSIZE) with every engine: the write fails alone, logged as disk_full") {
  for (const auto e : engines()) {
    CAPTURE(kvortex::to_string(e));
    for (const bool aligned : {true, false}) {  // direct (fallocate first) and buffered
      CAPTURE(aligned);
      temp_dir d;
      const auto c = config(d.path, e);
      const int rc = in_child([&]() -> int {
        log_capture logs;
        ::signal(SIGXFSZ, SIG_IGN);  // else the kernel kills a process writing past the limit
        const rlimit lim{256 * 1024, 256 * 1024};
        if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) return 10;
        auto t = disk_tier::open(c);
        if (!t) return 11;
        if (t->io_engine() != e) return 12;
        aligned_buffer small(60000, aligned ? 0 : 8);
        fill(small.span(), 1);
        if (!t->put(key(1), small.span())) return 13;
        aligned_buffer big(1 << 20, aligned ? 0 : 8);
        fill(big.span(), 2);
        const auto r = t->put(key(2), big.span());
        if (r) return 14;
        if (r.error().code != errc::backend_failure || !contains(r.error().message, "disk full")) return 15;
        if (t->stats().write_errors != 1) return 16;
        const auto full = logs.of("disk_full");
        if (full.size() != 1) return 17;
        if (full[0].level != kvortex::log_level::error || full[0].message != r.error().message) return 18;
        aligned_buffer out(60000);
        const auto g = t->get(key(1), out.span());  // still serving
        if (!g || std::memcmp(out.span().data(), small.span().data(), 60000) != 0) return 19;
        if (!t->put(key(3), small.span())) return 20;
        return 0;
      });
      CHECK(rc == 0);
    }
  }
}

TEST_CASE("disk io: where the kernel refuses io_uring, automatic falls back to pread/pwrite and says so") {
#if defined(KVORTEX_HAS_LIBURING) && defined(KVORTEX_TEST_SECCOMP) && (defined(__x86_64__) || defined(__aarch64__))
  temp_dir d;
  const int rc = in_child([&]() -> int {
#if defined(__x86_64__)
    constexpr std::uint32_t arch = AUDIT_ARCH_X86_64;
#else
    constexpr std::uint32_t arch = AUDIT_ARCH_AARCH64;
#endif
    // io_uring_setup fails with EPERM, as under a container runtime's default seccomp profile.
    sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, arch, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    sock_fprog prog{static_cast<unsigned short>(sizeof filter / sizeof filter[0]), filter};
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
      return 50;  // no seccomp here: nothing to test
    log_capture logs;
    auto forced = disk_tier::open(config(d.sub("uring"), disk_io_engine::io_uring));
    if (forced) return 10;
    if (forced.error().code != errc::unsupported || !contains(forced.error().message, "refused")) return 11;
    auto t = disk_tier::open(config(d.sub("auto"), disk_io_engine::automatic));
    if (!t) return 12;
    if (t->io_engine() != disk_io_engine::posix) return 13;
    const auto fell = logs.of("io_uring_unavailable");
    if (fell.size() != 1 || fell[0].level != kvortex::log_level::info) return 14;
    if (!contains(fell[0].message, "pread/pwrite") || !contains(fell[0].message, "Operation not permitted")) return 15;
    const auto bytes = payload(4, 3 * block + 1);
    if (!t->put(key(4), bytes)) return 16;
    std::vector<std::byte> out(bytes.size());
    const auto g = t->get(key(4), out);
    if (!g || out != bytes) return 17;
    return 0;
  });
  if (rc == 50) {
    MESSAGE("seccomp filters cannot be installed here: not tested");
    return;
  }
  CHECK(rc == 0);
#else
  MESSAGE("built without liburing (or seccomp headers): nothing to fall back from");
#endif
}
