// The disk tier on real files: every test works in a fresh temporary directory (mkdtemp under
// $TMPDIR or /tmp), removed afterwards. Children (fork) stand in for other processes: one that
// writes and exits, one killed with SIGKILL mid-write, one under RLIMIT_FSIZE or on a full tmpfs.

#include <doctest/doctest.h>

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "kvortex/concepts/storage_tier.hpp"
#include "kvortex/detail/chunk_record.hpp"
#include "kvortex/tiers/disk_tier.hpp"

namespace fs = std::filesystem;
using kvortex::chunk_key;
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

// A key spread over all 32 bytes, so keys land in every fan-out directory.
chunk_key key(std::uint64_t id) {
  chunk_key k;
  for (std::size_t i = 0; i < 4; ++i) {
    const std::uint64_t v = mix(id * 4 + i);
    std::memcpy(k.bytes.data() + 8 * i, &v, 8);
  }
  return k;
}

kvortex::namespace_digest digest(std::uint8_t seed) {
  kvortex::namespace_digest d;
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<std::byte>(seed * 31 + i);
  return d;
}

// Self-describing payload: bytes 0-7 hold the id, 8-15 the version, the rest follow from both, so
// any payload a tier returns can be checked without knowing which write it came from.
void fill_payload(std::span<std::byte> out, std::uint64_t id, std::uint64_t version = 0) {
  std::array<std::byte, 16> head{};
  std::memcpy(head.data(), &id, 8);
  std::memcpy(head.data() + 8, &version, 8);
  std::uint64_t s = mix(id ^ (version << 40) ^ out.size());
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (i < head.size()) {
      out[i] = head[i];
    } else {
      if (i % 8 == 0) s = mix(s);
      out[i] = static_cast<std::byte>(s >> (8 * (i % 8)));
    }
  }
}

std::vector<std::byte> payload(std::uint64_t id, std::size_t n, std::uint64_t version = 0) {
  std::vector<std::byte> v(n);
  fill_payload(v, id, version);
  return v;
}

// True when `p` is exactly what fill_payload wrote for the id and version it names, and that id
// is `id`. Payloads shorter than 16 bytes are checked against `id`, version 0.
bool payload_ok(std::span<const std::byte> p, std::uint64_t id) {
  std::uint64_t got_id = id, version = 0;
  if (p.size() >= 16) {
    std::memcpy(&got_id, p.data(), 8);
    std::memcpy(&version, p.data() + 8, 8);
  }
  if (got_id != id) return false;
  const auto want = payload(id, p.size(), version);
  return std::memcmp(want.data(), p.data(), p.size()) == 0;
}

// 4 KiB-aligned memory (what O_DIRECT needs), optionally offset to be misaligned on purpose.
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
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/kvortex-disk-XXXXXX";
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

disk_tier_config config(const std::string& dir, std::uint64_t capacity = std::uint64_t{1} << 30) {
  disk_tier_config c;
  c.directory = dir;
  c.capacity_bytes = capacity;
  c.ns = digest(1);
  return c;
}

disk_tier open_tier(const disk_tier_config& c) {
  auto t = disk_tier::open(c);
  if (!t) FAIL("disk_tier::open: " << t.error().what());
  return std::move(*t);
}

void put_ok(disk_tier& t, std::uint64_t id, std::span<const std::byte> bytes) {
  const auto r = t.put(key(id), bytes);
  if (!r) FAIL("put " << id << ": " << r.error().what());
}

// Reads `id` into a fresh aligned buffer of `capacity` bytes; the payload, or nothing on a miss.
std::optional<std::vector<std::byte>> get_bytes(disk_tier& t, std::uint64_t id, std::size_t capacity) {
  aligned_buffer buf(capacity);
  const auto r = t.get(key(id), buf.span());
  if (!r) {
    INFO("get " << id << ": " << r.error().what());
    CHECK(r.error().code == errc::not_found);
    return std::nullopt;
  }
  return std::vector<std::byte>(buf.span().begin(), buf.span().begin() + static_cast<std::ptrdiff_t>(*r));
}

std::vector<std::byte> read_file(const std::string& path) {
  std::vector<std::byte> out;
  FILE* f = std::fopen(path.c_str(), "rb");
  REQUIRE(f != nullptr);
  std::array<std::byte, 65536> buf;
  while (const std::size_t n = std::fread(buf.data(), 1, buf.size(), f)) out.insert(out.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(n));
  std::fclose(f);
  return out;
}

void write_file(const std::string& path, std::span<const std::byte> bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  REQUIRE(std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size());
  REQUIRE(std::fclose(f) == 0);
}

void flip_byte(const std::string& path, std::size_t offset, std::uint8_t mask = 0x01) {
  const int fd = ::open(path.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  std::byte b{};
  REQUIRE(::pread(fd, &b, 1, static_cast<off_t>(offset)) == 1);
  b ^= static_cast<std::byte>(mask);
  REQUIRE(::pwrite(fd, &b, 1, static_cast<off_t>(offset)) == 1);
  ::close(fd);
}

// Chunk files (64-hex names) and temporary files under a tier's directory.
struct disk_listing {
  std::vector<std::string> entries, temps;
  std::uint64_t entry_bytes{0};
};
disk_listing list_dir(const std::string& dir) {
  disk_listing l;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const std::string name = e.path().filename().string();
    if (name.starts_with(".tmp.")) {
      l.temps.push_back(e.path().string());
    } else if (kvortex::detail::disk_paths::parse(name)) {
      l.entries.push_back(e.path().string());
      l.entry_bytes += e.file_size();
    }
  }
  return l;
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

}  // namespace

static_assert(kvortex::storage_tier<disk_tier>);

TEST_CASE("disk tier: configuration is validated") {
  temp_dir d;
  auto c = config(d.path);
  c.directory.clear();
  CHECK(disk_tier::open(c).error().code == errc::invalid_config);
  c = config(d.path, block);
  auto r = disk_tier::open(c);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::invalid_config);
  CHECK(r.error().message.find("capacity_bytes") != std::string::npos);
  c = config(d.path);
  c.max_chunk_bytes = 0;
  CHECK(disk_tier::open(c).error().code == errc::invalid_config);
  // direct_io_mode::on: O_DIRECT, or a refusal that says the filesystem lacks it.
  c = config(d.sub("direct"));
  c.direct_io = kvortex::direct_io_mode::on;
  if (auto t = disk_tier::open(c); t) {
    CHECK(t->direct_io());
  } else {
    CHECK(t.error().code == errc::unsupported);
  }
  // A path under a regular file cannot be a directory.
  write_file(d.sub("plain"), payload(1, 10));
  c = config(d.sub("plain/tier"));
  r = disk_tier::open(c);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::backend_failure);
}

TEST_CASE("disk tier: round trips of many sizes, aligned and unaligned, direct and buffered") {
  const std::vector<std::size_t> sizes{1,        15,       16,        511,           4095,    4096, 4097,
                                       8191,     12288,    65536 + 3, (1 << 20) - 1, 1 << 20, (4 << 20) + 1};
  for (const auto mode : {kvortex::direct_io_mode::automatic, kvortex::direct_io_mode::off}) {
    CAPTURE(static_cast<int>(mode));
    temp_dir d;
    auto c = config(d.path);
    c.direct_io = mode;
    auto t = open_tier(c);
    if (mode == kvortex::direct_io_mode::off) CHECK_FALSE(t.direct_io());
    MESSAGE("direct I/O in " << d.path << ": " << std::string(t.direct_io() ? "yes" : "no"));
    std::uint64_t id = 0, want_bytes = 0;
    for (const std::size_t n : sizes) {
      for (const std::size_t src_off : {std::size_t{0}, std::size_t{1}}) {
        CAPTURE(n);
        CAPTURE(src_off);
        ++id;
        aligned_buffer src(n, src_off);
        fill_payload(src.span(), id);
        put_ok(t, id, src.span());
        want_bytes += kvortex::detail::disk_entry_bytes(n);
        // The file is the documented format: decodable on its own, of the documented size.
        const auto file = read_file(t.path_of(key(id)));
        CHECK(file.size() == kvortex::detail::disk_entry_bytes(n));
        std::vector<std::byte> decoded(n);
        kvortex::detail::chunk_record_expect e{c.ns, key(id), 0, ~std::uint64_t{0}};
        const auto dr = kvortex::detail::decode_disk_entry(file, e, decoded);
        REQUIRE(dr.has_value());
        CHECK(*dr == n);
        CHECK(payload_ok(decoded, id));
        // Reads into aligned, misaligned, exact and larger buffers.
        for (const std::size_t dst_off : {std::size_t{0}, std::size_t{3}}) {
          for (const std::size_t extra : {std::size_t{0}, std::size_t{1}, block, 3 * block + 5}) {
            aligned_buffer dst(n + extra, dst_off);
            std::memset(dst.span().data(), 0xEE, dst.span().size());
            const auto r = t.get(key(id), dst.span());
            REQUIRE_MESSAGE(r.has_value(), r.error().what());
            CHECK(*r == n);
            CHECK(payload_ok(dst.span().first(n), id));
          }
        }
        // A buffer one byte short is a size mismatch, and leaves the chunk alone.
        aligned_buffer small(n - 1);
        const auto r = t.get(key(id), small.span());
        REQUIRE_FALSE(r);
        CHECK(r.error().code == errc::size_mismatch);
        CHECK(t.contains(std::array{key(id)}) == 1);
      }
    }
    const auto s = t.stats();
    CHECK(s.writes == 2 * sizes.size());
    CHECK(s.hits == 2 * sizes.size() * 8);
    CHECK(s.misses == 0);
    CHECK(s.corrupt_removed == 0);
    CHECK(s.entries == 2 * sizes.size());
    CHECK(s.bytes_held == want_bytes);
    CHECK(list_dir(d.path).entry_bytes == want_bytes);
    CHECK(s.write_latency.count == s.writes);
    CHECK(s.read_latency.count == s.hits + 2 * sizes.size());
  }
}

TEST_CASE("disk tier: replace, remove, contains and misses") {
  temp_dir d;
  auto t = open_tier(config(d.path));
  const auto a = payload(7, 10000, 1), b = payload(7, 300, 2);
  put_ok(t, 7, a);
  put_ok(t, 7, b);  // a write of a key held replaces it, even with another size
  auto got = get_bytes(t, 7, 20000);
  REQUIRE(got);
  CHECK(got->size() == 300);
  CHECK(payload_ok(*got, 7));
  CHECK((*got)[8] == std::byte{2});
  CHECK(t.stats().entries == 1);
  CHECK(t.stats().bytes_held == kvortex::detail::disk_entry_bytes(300));

  for (std::uint64_t id = 10; id < 20; ++id) put_ok(t, id, payload(id, 5000));
  std::vector<chunk_key> keys;
  for (std::uint64_t id = 10; id < 20; ++id) keys.push_back(key(id));
  CHECK(t.contains(keys) == 10);
  t.remove(key(15));
  CHECK(t.contains(keys) == 5);
  CHECK(t.contains(std::span(keys).subspan(6)) == 4);
  CHECK(t.contains(std::span<const chunk_key>{}) == 0);
  t.remove(key(15));  // twice: no effect
  t.remove(key(999));
  CHECK_FALSE(fs::exists(t.path_of(key(15))));
  const auto before = t.stats();
  CHECK_FALSE(get_bytes(t, 15, 5000));
  CHECK_FALSE(get_bytes(t, 999, 5000));
  CHECK(t.stats().misses == before.misses + 2);
  CHECK(t.stats().entries == 10);

  // Refused writes: empty, and larger than the capacity.
  CHECK(t.put(key(1), {}).error().code == errc::invalid_argument);
  temp_dir d2;
  auto small = open_tier(config(d2.path, 64 * 1024));
  const auto big = payload(1, 64 * 1024);
  const auto r = small.put(key(1), big);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::capacity_exhausted);
  CHECK(small.stats().rejected_writes == 1);
  CHECK(small.stats().entries == 0);
  CHECK(list_dir(d2.path).temps.empty());

  // A moved-from tier answers shut_down; the moved-to one serves.
  disk_tier moved = std::move(t);
  CHECK(t.put(key(1), a).error().code == errc::shut_down);  // NOLINT(bugprone-use-after-move)
  CHECK(t.contains(keys) == 0);                            // NOLINT(bugprone-use-after-move)
  CHECK(get_bytes(moved, 10, 5000).has_value());
}

TEST_CASE("disk tier: capacity is enforced by LRU eviction") {
  temp_dir d;
  constexpr std::size_t n = 3 * block;                   // a 16 KiB file each
  const std::uint64_t file = kvortex::detail::disk_entry_bytes(n);
  auto t = open_tier(config(d.path, 10 * file + 100));   // room for 10
  for (std::uint64_t id = 0; id < 10; ++id) put_ok(t, id, payload(id, n));
  CHECK(t.stats().evictions == 0);
  REQUIRE(get_bytes(t, 0, n));  // 0 becomes the most recently used
  for (std::uint64_t id = 10; id < 19; ++id) put_ok(t, id, payload(id, n));
  // 0 was touched after 1..9, so they went first.
  CHECK(fs::exists(t.path_of(key(0))));
  for (std::uint64_t id = 1; id < 10; ++id) CHECK_FALSE(fs::exists(t.path_of(key(id))));
  for (std::uint64_t id = 19; id < 30; ++id) put_ok(t, id, payload(id, n));
  const auto s = t.stats();
  CHECK(s.entries == 10);
  CHECK(s.evictions == 20);
  CHECK(s.bytes_held == 10 * file);
  CHECK(s.bytes_held <= s.capacity_bytes);
  const auto l = list_dir(d.path);
  CHECK(l.entries.size() == 10);
  CHECK(l.entry_bytes == 10 * file);
  for (std::uint64_t id = 0; id < 20; ++id) CHECK_FALSE(fs::exists(t.path_of(key(id))));
  for (std::uint64_t id = 20; id < 30; ++id) {
    const auto g = get_bytes(t, id, n);
    REQUIRE(g);
    CHECK(payload_ok(*g, id));
  }
}

TEST_CASE("disk tier: persistence across close and reopen") {
  temp_dir d;
  auto c = config(d.path);
  c.fsync = kvortex::fsync_policy::data;
  std::map<std::uint64_t, std::size_t> sizes;
  {
    auto t = open_tier(c);
    std::mt19937 rng(5);
    for (std::uint64_t id = 0; id < 80; ++id) {
      sizes[id] = 1 + rng() % 70000;
      put_ok(t, id, payload(id, sizes[id]));
    }
    t.remove(key(3));
    sizes.erase(3);
  }
  auto t = open_tier(c);
  const auto rec = t.recovery();
  CHECK(rec.entries == sizes.size());
  CHECK(rec.stale_removed == 0);
  CHECK(rec.invalid_removed == 0);
  CHECK(rec.evicted == 0);
  std::uint64_t bytes = 0;
  for (const auto& [id, n] : sizes) {
    bytes += kvortex::detail::disk_entry_bytes(n);
    const auto g = get_bytes(t, id, n);
    REQUIRE(g);
    CHECK(g->size() == n);
    CHECK(payload_ok(*g, id));
  }
  CHECK(rec.bytes == bytes);
  CHECK(t.stats().bytes_held == bytes);
  CHECK_FALSE(get_bytes(t, 3, 70000));
}

TEST_CASE("disk tier: without a snapshot, a reopen orders eviction by write time and shrinks to a smaller capacity") {
  temp_dir d;
  constexpr std::size_t n = block;
  const std::uint64_t file = kvortex::detail::disk_entry_bytes(n);
  auto c = config(d.path);
  c.index_snapshot = false;
  {
    auto t = open_tier(c);
    for (std::uint64_t id = 0; id < 6; ++id) {
      put_ok(t, id, payload(id, n));
      // File times advance by the kernel's tick; keep the writes a few ticks apart.
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
  }
  c.capacity_bytes = 3 * file;
  auto t = open_tier(c);
  CHECK(t.recovery().from_snapshot == 0);
  CHECK(t.recovery().entries == 3);
  CHECK(t.recovery().evicted == 3);
  CHECK(t.stats().evictions == 3);
  for (std::uint64_t id = 0; id < 3; ++id) CHECK_FALSE(fs::exists(t.path_of(key(id))));
  for (std::uint64_t id = 3; id < 6; ++id) CHECK(get_bytes(t, id, n).has_value());
  // The oldest survivor goes first.
  put_ok(t, 6, payload(6, n));
  CHECK_FALSE(fs::exists(t.path_of(key(3))));
  CHECK(fs::exists(t.path_of(key(4))));
}

TEST_CASE("disk tier: the index snapshot keeps the LRU order across a restart, and a stale or damaged one is only a hint") {
  temp_dir d;
  constexpr std::size_t n = block;
  const std::uint64_t file = kvortex::detail::disk_entry_bytes(n);
  auto c = config(d.path);
  {
    auto t = open_tier(c);
    for (std::uint64_t id = 0; id < 6; ++id) put_ok(t, id, payload(id, n));
    REQUIRE(get_bytes(t, 0, n));  // order now 1 2 3 4 5 0
  }
  REQUIRE(fs::exists(d.sub(".index")));
  SUBCASE("eviction order") {
    c.capacity_bytes = 3 * file;
    auto t = open_tier(c);
    CHECK(t.recovery().from_snapshot == 6);
    CHECK(t.recovery().entries == 3);
    CHECK_FALSE(fs::exists(d.sub(".index")));  // consumed: a crash from here on leaves none
    for (std::uint64_t id : {1, 2, 3}) CHECK_FALSE(fs::exists(t.path_of(key(id))));
    for (std::uint64_t id : {4, 5, 0}) CHECK(fs::exists(t.path_of(key(id))));
  }
  SUBCASE("stale: the directory changed after the snapshot was written") {
    fs::copy_file(d.sub(".index"), d.sub("old-index"));
    const int rc = in_child([&] {
      auto t = disk_tier::open(c);
      if (!t || t->recovery().from_snapshot != 6) return 1;
      if (!t->put(key(1), payload(1, 5 * n + 7))) return 2;  // replaced: a new inode, another size
      if (!t->put(key(7), payload(7, n))) return 3;          // added
      t->remove(key(2));                                     // removed
      ::_exit(0);                                            // a crash: no new snapshot
    });
    REQUIRE(rc == 0);
    CHECK_FALSE(fs::exists(d.sub(".index")));
    fs::rename(d.sub("old-index"), d.sub(".index"));  // the stale one back, as if never consumed
    auto t = open_tier(c);
    const auto rec = t.recovery();
    CHECK(rec.entries == 6);
    CHECK(rec.from_snapshot == 4);  // 0 3 4 5 unchanged; 1 and 7 stat'ed
    std::uint64_t bytes = 0;
    for (std::uint64_t id : {0, 1, 3, 4, 5, 7}) {
      const auto g = get_bytes(t, id, 6 * n);
      REQUIRE(g);
      CHECK(g->size() == (id == 1 ? 5 * n + 7 : n));
      CHECK(payload_ok(*g, id));
      bytes += kvortex::detail::disk_entry_bytes(g->size());
    }
    CHECK_FALSE(get_bytes(t, 2, n));
    CHECK(t.stats().bytes_held == bytes);
    CHECK(list_dir(d.path).entry_bytes == bytes);
  }
  SUBCASE("damaged") {
    flip_byte(d.sub(".index"), 100);
    auto t = open_tier(c);
    CHECK(t.recovery().from_snapshot == 0);
    CHECK(t.recovery().entries == 6);
    CHECK(t.stats().bytes_held == 6 * file);
  }
  SUBCASE("another namespace's") {
    c.ns = digest(9);
    auto t = open_tier(c);
    CHECK(t.recovery().from_snapshot == 0);
    CHECK(t.recovery().entries == 6);  // the files are only checked when read
  }
}

TEST_CASE("disk tier: persistence across a process") {
  temp_dir d;
  const auto c = config(d.path);
  const int rc = in_child([&] {
    auto t = disk_tier::open(c);
    if (!t) return 1;
    for (std::uint64_t id = 0; id < 50; ++id) {
      const auto p = payload(id, 1000 + id * 997);
      if (!t->put(key(id), p)) return 2;
    }
    return 0;  // exits without closing anything: the kernel drops the lock
  });
  REQUIRE(rc == 0);
  auto t = open_tier(c);
  CHECK(t.recovery().entries == 50);
  for (std::uint64_t id = 0; id < 50; ++id) {
    const auto g = get_bytes(t, id, 1000 + id * 997);
    REQUIRE(g);
    CHECK(payload_ok(*g, id));
  }
}

TEST_CASE("disk tier: one exclusive tier per directory") {
  temp_dir d;
  const auto c = config(d.path);
  {
    auto a = open_tier(c);
    auto b = disk_tier::open(c);
    REQUIRE_FALSE(b);
    CHECK(b.error().code == errc::backend_failure);
    CHECK(b.error().message.find("in use") != std::string::npos);
    CHECK(b.error().message.find("pid " + std::to_string(::getpid())) != std::string::npos);
    auto shared = c;
    shared.sharing = kvortex::directory_sharing::shared;
    CHECK_FALSE(disk_tier::open(shared));
  }
  CHECK(disk_tier::open(c).has_value());  // released on close

  // Another process holding it: refused, naming that process; free again once it dies.
  int ready[2], hold[2];
  REQUIRE(::pipe(ready) == 0);
  REQUIRE(::pipe(hold) == 0);
  std::fflush(nullptr);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    auto t = disk_tier::open(c);
    const char ok = t ? 'y' : 'n';
    (void)!::write(ready[1], &ok, 1);
    char x;
    (void)!::read(hold[0], &x, 1);  // until the parent kills us
    ::_exit(0);
  }
  char ok = 0;
  REQUIRE(::read(ready[0], &ok, 1) == 1);
  REQUIRE(ok == 'y');
  const auto b = disk_tier::open(c);
  REQUIRE_FALSE(b);
  CHECK(b.error().message.find("pid " + std::to_string(child)) != std::string::npos);
  ::kill(child, SIGKILL);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  for (int fd : {ready[0], ready[1], hold[0], hold[1]}) ::close(fd);
  CHECK(disk_tier::open(c).has_value());
}

TEST_CASE("disk tier: shared mode: tiers see each other's chunks, and exclude exclusive ones") {
  temp_dir d;
  auto c = config(d.path);
  c.sharing = kvortex::directory_sharing::shared;
  auto a = open_tier(c);
  auto b = open_tier(c);
  CHECK_FALSE(disk_tier::open(config(d.path)));  // exclusive refused while shared holders live
  for (std::uint64_t id = 0; id < 20; ++id) put_ok(a, id, payload(id, 9000));
  std::vector<chunk_key> keys;
  for (std::uint64_t id = 0; id < 20; ++id) keys.push_back(key(id));
  CHECK(b.contains(keys) == 20);  // found on disk, not in b's index until now
  for (std::uint64_t id = 0; id < 20; ++id) {
    const auto g = get_bytes(b, id, 9000);
    REQUIRE(g);
    CHECK(payload_ok(*g, id));
  }
  // a rewrites a chunk b has indexed: b reads the new version, whole.
  put_ok(a, 5, payload(5, 4000, 9));
  auto g = get_bytes(b, 5, 9000);
  REQUIRE(g);
  CHECK(g->size() == 4000);
  CHECK(payload_ok(*g, 5));
  // a removes a chunk b has indexed: a miss in b, its entry dropped.
  a.remove(key(6));
  CHECK_FALSE(get_bytes(b, 6, 9000));
  CHECK(b.contains(keys) == 6);
  CHECK(b.stats().corrupt_removed == 0);
}

TEST_CASE("disk tier: truncated, corrupt, foreign, empty and temporary files are misses, counted and removed") {
  temp_dir d;
  const auto c = config(d.path);
  constexpr std::size_t n = 3 * block + 100;  // a 5-block file: header, 3 full blocks, a padded one
  std::string dir_of_0;
  {
    auto t = open_tier(c);
    for (std::uint64_t id = 0; id < 20; ++id) put_ok(t, id, payload(id, n));
  }
  // Build the damage with a plain view of the files.
  auto path = [&](std::uint64_t id) { return d.path + "/" + kvortex::detail::disk_paths::entry(key(id)).data(); };
  fs::resize_file(path(0), 0);                      // empty
  fs::resize_file(path(1), 3 * block + 17);         // cut mid-block
  fs::resize_file(path(2), 3 * block);              // cut at a block boundary
  flip_byte(path(3), 20);                           // header: namespace digest
  flip_byte(path(4), block + 1000);                 // payload
  flip_byte(path(5), block + n + 3);                // padding after the payload
  flip_byte(path(6), 200);                          // header padding
  {                                                 // another namespace's entry for key 7
    const auto foreign = kvortex::detail::encode_disk_entry(digest(2), key(7), payload(7, n));
    write_file(path(7), foreign);
  }
  fs::copy_file(path(9), path(8), fs::copy_options::overwrite_existing);  // key 9's file under key 8's name
  {                                                 // a longer file: a whole extra block
    auto bytes = read_file(path(10));
    bytes.resize(bytes.size() + block);
    write_file(path(10), bytes);
  }
  const std::string temp = d.path + "/" + std::string(path(11)).substr(d.path.size() + 1, 3) + ".tmp.deadbeef.1.2";
  write_file(temp, payload(11, 5000));
  const std::string foreign_file = d.sub("README");
  write_file(foreign_file, payload(1, 10));         // not the tier's: left alone

  SUBCASE("found on open by size, or at the first get") {
    auto nc = c;
    nc.index_snapshot = false;  // every file is stat'ed
    auto t = open_tier(nc);
    const auto rec = t.recovery();
    CHECK(rec.stale_removed == 1);
    CHECK(rec.invalid_removed == 2);  // the empty file and the one cut mid-block
    CHECK(rec.entries == 18);
    CHECK_FALSE(fs::exists(temp));
    CHECK_FALSE(fs::exists(path(0)));
    CHECK_FALSE(fs::exists(path(1)));
    CHECK(t.stats().stale_removed == 1);
    CHECK(t.stats().corrupt_removed == 2);
    for (std::uint64_t id : {2, 3, 4, 5, 6, 7, 8, 10}) {
      CAPTURE(id);
      CHECK_FALSE(get_bytes(t, id, 2 * n));
      CHECK_FALSE(fs::exists(path(id)));
      CHECK_FALSE(get_bytes(t, id, 2 * n));  // and stays a miss
    }
    CHECK(t.stats().corrupt_removed == 2 + 8);
    CHECK(t.stats().misses == 16);
    CHECK(t.stats().hits == 0);
    for (std::uint64_t id = 9; id < 20; id += id == 9 ? 2 : 1) {
      const auto g = get_bytes(t, id, n);
      REQUIRE(g);
      CHECK(payload_ok(*g, id));
    }
    CHECK(t.stats().entries == 10);
    CHECK(fs::exists(foreign_file));
  }
  SUBCASE("with the snapshot (sizes not stat'ed), found at the first get") {
    auto t = open_tier(c);
    const auto rec = t.recovery();
    CHECK(rec.stale_removed == 1);
    CHECK(rec.invalid_removed == 0);
    CHECK(rec.entries == 20);
    CHECK(rec.from_snapshot == 20);  // damaged in place: same inodes
    for (std::uint64_t id : {0, 1, 2, 3, 4, 5, 6, 7, 8, 10}) {
      CAPTURE(id);
      CHECK_FALSE(get_bytes(t, id, 2 * n));
      CHECK_FALSE(fs::exists(path(id)));
    }
    CHECK(t.stats().corrupt_removed == 10);
    CHECK(t.stats().hits == 0);
    for (std::uint64_t id = 9; id < 20; id += id == 9 ? 2 : 1) CHECK(get_bytes(t, id, n).has_value());
    CHECK(t.stats().entries == 10);
    CHECK(t.stats().bytes_held == 10 * kvortex::detail::disk_entry_bytes(n));
  }
  SUBCASE("found on open when verifying headers") {
    auto vc = c;
    vc.verify_on_open = true;
    auto t = open_tier(vc);
    const auto rec = t.recovery();
    CHECK(rec.stale_removed == 1);
    // Every bad header or size: 0 1 2 3 6 7 8 10. The payload and its padding (4, 5) are only
    // read by get.
    CHECK(rec.invalid_removed == 8);
    CHECK(rec.entries == 12);
    for (std::uint64_t id : {0, 1, 2, 3, 6, 7, 8, 10}) CHECK_FALSE(fs::exists(path(id)));
    CHECK_FALSE(get_bytes(t, 4, n));
    CHECK_FALSE(get_bytes(t, 5, n));
    CHECK(t.stats().corrupt_removed == 8 + 2);
    for (std::uint64_t id = 11; id < 20; ++id) CHECK(get_bytes(t, id, n).has_value());
  }
}

TEST_CASE("disk tier: a flipped bit anywhere in a file is a miss, never wrong bytes") {
  temp_dir d;
  for (const auto mode : {kvortex::direct_io_mode::automatic, kvortex::direct_io_mode::off}) {
    auto c = config(d.path);
    c.direct_io = mode;
    auto t = open_tier(c);
    constexpr std::size_t n = block + 1234;  // 3 blocks: header, full payload block, padded block
    const std::size_t file = kvortex::detail::disk_entry_bytes(n);
    std::vector<std::size_t> offsets;
    for (std::size_t o = 0; o < 128; ++o) offsets.push_back(o);  // every header byte
    for (std::size_t o = 128; o < file; o += 61) offsets.push_back(o);
    offsets.push_back(file - 1);
    std::uint64_t removed = 0;
    for (const std::size_t o : offsets) {
      CAPTURE(o);
      put_ok(t, 1, payload(1, n));
      flip_byte(t.path_of(key(1)), o, static_cast<std::uint8_t>(1u << (o % 8)));
      for (const std::size_t cap : {n, n + block}) {  // both read shapes (tail block or not)
        aligned_buffer out(cap);
        const auto r = t.get(key(1), out.span());
        CHECK_FALSE(r.has_value());
        if (!r) CHECK(r.error().code == errc::not_found);
      }
      ++removed;
      CHECK(t.stats().corrupt_removed == removed);
      CHECK_FALSE(fs::exists(t.path_of(key(1))));
    }
    CHECK(t.stats().hits == 0);
    CHECK(t.stats().entries == 0);
  }
}

TEST_CASE("disk tier: a write that cannot land fails alone, counted, and the tier keeps serving") {
  temp_dir d;
  auto t = open_tier(config(d.path));
  // Find two keys in different fan-out directories, then make one directory unusable: a regular
  // file stands where it was.
  const std::uint64_t good = 1;
  std::uint64_t bad = 2;
  while (key(bad).bytes[0] == key(good).bytes[0]) ++bad;
  put_ok(t, good, payload(good, 10000));
  const std::string sub = fs::path(t.path_of(key(bad))).parent_path().string();
  fs::remove_all(sub);
  write_file(sub, payload(0, 10));
  const auto r = t.put(key(bad), payload(bad, 10000));
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::backend_failure);
  CHECK(r.error().message.find(sub) != std::string::npos);
  CHECK(t.stats().write_errors == 1);
  CHECK(t.stats().errors() == 1);
  CHECK(t.stats().entries == 1);
  CHECK(get_bytes(t, good, 10000).has_value());
  put_ok(t, good + 1000, payload(good + 1000, 100));
  // Once the directory is gone (not blocked by a file), a write recreates it.
  fs::remove(sub);
  put_ok(t, bad, payload(bad, 10000));
  const auto g = get_bytes(t, bad, 10000);
  REQUIRE(g);
  CHECK(payload_ok(*g, bad));
}

TEST_CASE("disk tier: disk full (RLIMIT_FSIZE): a clear error for that write, counted, and the tier keeps serving") {
  temp_dir d;
  const auto c = config(d.path);
  const int rc = in_child([&]() -> int {
    ::signal(SIGXFSZ, SIG_IGN);  // else the kernel kills a process writing past the limit
    const rlimit lim{256 * 1024, 256 * 1024};
    if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) return 10;
    auto t = disk_tier::open(c);
    if (!t) return 11;
    for (std::uint64_t id = 0; id < 5; ++id)
      if (!t->put(key(id), payload(id, 60000))) return 12;
    const auto big = t->put(key(100), payload(100, 1 << 20));  // a 1 MiB chunk does not fit
    if (big) return 13;
    if (big.error().code != errc::backend_failure) return 14;
    if (big.error().message.find("disk full") == std::string::npos) return 15;
    std::fprintf(stderr, "expected failure: %s\n", big.error().what().c_str());
    if (t->stats().write_errors != 1) return 16;
    if (!list_dir(c.directory).temps.empty()) return 17;  // the partial temporary file is gone
    for (std::uint64_t id = 0; id < 5; ++id) {            // still serving, reads and writes
      std::vector<std::byte> out(60000);
      const auto g = t->get(key(id), out);
      if (!g || !payload_ok(out, id)) return 18;
    }
    if (!t->put(key(5), payload(5, 60000))) return 19;
    if (t->contains(std::array{key(100)}) != 0) return 20;
    return 0;
  });
  REQUIRE(rc == 0);
  auto t = open_tier(c);
  CHECK(t.recovery().entries == 6);
  CHECK(t.recovery().stale_removed == 0);
  for (std::uint64_t id = 0; id < 6; ++id) CHECK(get_bytes(t, id, 60000).has_value());
}

TEST_CASE("disk tier: disk full (a 2 MiB tmpfs): a clear error, counted, and the tier keeps serving") {
  temp_dir d;
  const std::string mnt = d.sub("mnt");
  fs::create_directory(mnt);
  // A private mount namespace in the child: the mount disappears with it.
  const int rc = in_child([&]() -> int {
    if (::unshare(CLONE_NEWNS) != 0) return 77;
    if (::mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return 77;
    if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=2m") != 0) return 77;
    auto c = config(mnt + "/tier", std::uint64_t{1} << 30);
    auto t = disk_tier::open(c);
    if (!t) return 11;
    constexpr std::size_t n = 60000;
    std::uint64_t stored = 0;
    kvortex::error first_error;
    for (std::uint64_t id = 0; id < 100; ++id) {
      const auto r = t->put(key(id), payload(id, n));
      if (r) {
        ++stored;
        continue;
      }
      first_error = r.error();
      break;
    }
    std::fprintf(stderr, "tmpfs: %llu chunks stored, then: %s\n", static_cast<unsigned long long>(stored),
                 first_error.what().c_str());
    if (stored == 0 || stored >= 100) return 12;
    if (first_error.code != errc::backend_failure) return 13;
    if (first_error.message.find("disk full") == std::string::npos) return 14;
    if (t->stats().write_errors != 1) return 15;
    if (!list_dir(c.directory).temps.empty()) return 16;
    for (std::uint64_t id = 0; id < stored; ++id) {
      std::vector<std::byte> out(n);
      const auto g = t->get(key(id), out);
      if (!g || !payload_ok(out, id)) return 17;
    }
    t->remove(key(0));  // room again: writes succeed again
    if (!t->put(key(1000), payload(1000, n))) return 18;
    return 0;
  });
  if (rc == 77) {
    MESSAGE("skipped: cannot mount a tmpfs here (needs CAP_SYS_ADMIN); the RLIMIT_FSIZE case covers disk full");
    return;
  }
  CHECK(rc == 0);
}

TEST_CASE("disk tier: crash test: SIGKILL at random times loses no acknowledged chunk and returns no wrong bytes") {
  temp_dir d;
  auto c = config(d.sub("tier"));
  c.fsync = kvortex::fsync_policy::data_and_directory;
  const std::string record = d.sub("acknowledged");
  constexpr int rounds = 24;
  std::mt19937 rng(20261201);
  std::set<std::uint64_t> acked;
  std::uint64_t stale = 0, killed_in_open = 0, acked_total = 0, wanted = 0;
  for (int round = 0; round < rounds; ++round) {
    CAPTURE(round);
    int ready[2];
    REQUIRE(::pipe(ready) == 0);
    const auto seed = static_cast<std::uint32_t>(rng());
    std::fflush(nullptr);
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      ::close(ready[0]);
      auto t = disk_tier::open(c);
      if (!t) ::_exit(3);
      const int rec = ::open(record.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
      if (rec < 0) ::_exit(4);
      (void)!::write(ready[1], "r", 1);
      std::mt19937 r(seed);
      for (std::uint64_t n = 0;; ++n) {
        // Mostly new chunks, some rewrites of earlier ones (same bytes: the id decides them).
        const std::uint64_t id = n % 5 == 4 && n > 0 ? static_cast<std::uint64_t>(round) * 100000 + r() % n
                                                     : static_cast<std::uint64_t>(round) * 100000 + n;
        const std::size_t size = 1 + mix(id) % (256 * 1024);
        const auto p = payload(id, size);
        if (!t->put(key(id), p)) ::_exit(5);
        if (::write(rec, &id, sizeof id) != sizeof id) ::_exit(6);  // acknowledged
      }
    }
    ::close(ready[1]);
    // Kill mostly while writing (after 0-4 more acknowledgements, whatever this machine's speed,
    // then up to 20 ms later), sometimes while the child is still opening (rebuilding).
    if (rng() % 5 != 0) {
      char x;
      REQUIRE(::read(ready[0], &x, 1) == 1);
      const std::uint64_t want = acked_total + rng() % 5;
      wanted += want - acked_total;
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      for (;;) {
        struct stat sb{};
        if (::stat(record.c_str(), &sb) == 0 && static_cast<std::uint64_t>(sb.st_size) / 8 >= want) break;
        REQUIRE(std::chrono::steady_clock::now() < give_up);
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 20000));
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
      ++killed_in_open;
    }
    ::kill(child, SIGKILL);
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    ::close(ready[0]);
    REQUIRE_MESSAGE(WIFSIGNALED(status), "the writer exited on its own, code " << WEXITSTATUS(status));

    // Every acknowledged chunk is back, byte for byte.
    if (fs::exists(record)) {
      const auto bytes = read_file(record);
      acked_total = bytes.size() / 8;
      for (std::size_t i = 0; i + 8 <= bytes.size(); i += 8) {
        std::uint64_t id;
        std::memcpy(&id, bytes.data() + i, 8);
        acked.insert(id);
      }
    }
    auto t = open_tier(c);
    stale += t.recovery().stale_removed;
    CHECK(t.recovery().invalid_removed == 0);
    for (const std::uint64_t id : acked) {
      const std::size_t size = 1 + mix(id) % (256 * 1024);
      const auto g = get_bytes(t, id, size);
      REQUIRE_MESSAGE(g.has_value(), "acknowledged chunk " << id << " lost");
      CHECK(g->size() == size);
      CHECK(payload_ok(*g, id));
    }
    // Whatever else is on disk (written but not yet acknowledged) is whole or a miss.
    for (const auto& path : list_dir(c.directory).entries) {
      const auto k = kvortex::detail::disk_paths::parse(fs::path(path).filename().string());
      REQUIRE(k);
      aligned_buffer out(256 * 1024);
      const auto r = t.get(*k, out.span());
      if (!r) continue;
      std::uint64_t id;
      REQUIRE(*r >= 16);
      std::memcpy(&id, out.span().data(), 8);
      CHECK(key(id) == *k);
      CHECK(payload_ok(out.span().first(*r), id));
    }
    CHECK(t.stats().corrupt_removed == 0);
    CHECK(list_dir(c.directory).temps.empty());
  }
  MESSAGE(acked.size() << " acknowledged chunks checked over " << rounds << " kills (" << killed_in_open
                       << " while opening); " << stale << " half-written files removed");
  CHECK(acked_total >= wanted);
  CHECK(acked.size() >= 10);
}

TEST_CASE("disk tier: concurrent put, get, contains and remove from 8 threads") {
  temp_dir d;
  constexpr std::uint64_t keys = 300;
  auto t = open_tier(config(d.path, 40 * kvortex::detail::disk_entry_bytes(48 * 1024)));  // evicts all the time
  std::atomic<std::uint64_t> wrong{0}, hits{0}, gets{0}, failures{0}, version{1};
  std::vector<std::thread> threads;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(1500);
  for (unsigned w = 0; w < 8; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937 rng(w);
      aligned_buffer out(64 * 1024);
      std::vector<std::byte> in(64 * 1024);
      for (unsigned ops = 0; ops < 200 || std::chrono::steady_clock::now() < deadline; ++ops) {
        const std::uint64_t id = rng() % keys;
        const unsigned op = rng() % 10;
        if (op < 4) {
          const std::size_t n = 16 + rng() % (48 * 1024);
          const std::size_t off = rng() % 2 == 0 ? 0 : 8;  // aligned (direct) and not (buffered)
          const auto p = std::span(in).subspan(off, n);
          fill_payload(p, id, version.fetch_add(1));
          if (!t.put(key(id), p)) failures.fetch_add(1);
        } else if (op < 8) {
          const std::size_t off = rng() % 2 == 0 ? 0 : 24;
          const auto r = t.get(key(id), out.span().subspan(off));
          gets.fetch_add(1);
          if (r) {
            hits.fetch_add(1);
            if (!payload_ok(out.span().subspan(off, *r), id)) wrong.fetch_add(1);
          } else if (r.error().code != errc::not_found) {
            failures.fetch_add(1);
          }
        } else if (op < 9) {
          const std::array<chunk_key, 3> ks{key(id), key((id + 1) % keys), key((id + 2) % keys)};
          (void)t.contains(ks);
        } else {
          t.remove(key(id));
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(wrong.load() == 0);
  CHECK(failures.load() == 0);
  CHECK(hits.load() > 0);
  const auto s = t.stats();
  CHECK(s.hits == hits.load());
  CHECK(s.misses == gets.load() - hits.load());
  CHECK(s.read_latency.count == gets.load());
  MESSAGE(s.writes << " writes, " << s.hits << " hits, " << s.misses << " misses, " << s.evictions << " evictions");
  CHECK(s.corrupt_removed == 0);
  CHECK(s.bytes_held <= s.capacity_bytes);
  // The index and the directory agree.
  const auto l = list_dir(d.path);
  CHECK(l.temps.empty());
  CHECK(l.entries.size() == s.entries);
  CHECK(l.entry_bytes == s.bytes_held);
  for (const auto& path : l.entries) {
    const auto k = kvortex::detail::disk_paths::parse(fs::path(path).filename().string());
    REQUIRE(k);
    CHECK(t.contains(std::array{*k}) == 1);
  }
}
