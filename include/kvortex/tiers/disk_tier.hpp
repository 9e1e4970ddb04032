#pragma once
/// @file disk_tier.hpp
/// @brief A storage tier of chunk files under a local directory: survives restarts and crashes,
/// with its own capacity and LRU eviction. Linux (POSIX I/O, flock, O_DIRECT). Needs xxHash.

#if !__has_include(<xxhash.h>)
#error "kvortex/tiers/disk_tier.hpp needs xxHash's <xxhash.h> for its checksums (Debian: apt-get install libxxhash-dev; CMake: KVORTEX_WITH_XXHASH)"
#else

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kvortex/concepts/storage_tier.hpp"
#include "kvortex/detail/chunk_record.hpp"
#include "kvortex/detail/disk_io.hpp"
#include "kvortex/error.hpp"
#include "kvortex/eviction/lru_eviction.hpp"
#include "kvortex/logging.hpp"
#include "kvortex/stats.hpp"
#include "kvortex/tiers/disk_tier_config.hpp"
#include "kvortex/tiers/tier_stats.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief What `disk_tier::open` found while rebuilding the index.
struct disk_recovery {
  std::uint64_t entries{0};         ///< chunk files indexed
  std::uint64_t bytes{0};           ///< their bytes
  std::uint64_t stale_removed{0};   ///< temporary files (writes a crash cut short) removed
  std::uint64_t invalid_removed{0}; ///< empty, truncated (or, verifying, foreign or corrupt) files removed
  std::uint64_t evicted{0};         ///< files over the capacity (a smaller one than before) removed
  std::uint64_t from_snapshot{0};   ///< entries whose size and order came from the index snapshot (no stat)
  double seconds{0};                ///< wall time of the rebuild
};

namespace detail {

/// Relative paths of a chunk's files under the tier's root: `hh/<64 hex digits>`, the fan-out
/// directory `hh` being the key's first byte.
struct disk_paths {
  static constexpr std::size_t name_chars = 64;
  static constexpr std::string_view temp_prefix = ".tmp.";
  using buffer = std::array<char, 128>;

  static void hex(const chunk_key& k, char* out) noexcept {
    static constexpr char digits[] = "0123456789abcdef";
    for (std::size_t i = 0; i < k.bytes.size(); ++i) {
      const auto b = std::to_integer<unsigned>(k.bytes[i]);
      out[2 * i] = digits[b >> 4];
      out[2 * i + 1] = digits[b & 0xF];
    }
  }
  static void fanout(unsigned b, char* out) noexcept {
    static constexpr char digits[] = "0123456789abcdef";
    out[0] = digits[(b >> 4) & 0xF];
    out[1] = digits[b & 0xF];
    out[2] = '\0';
  }
  /// "hh/<hex>"
  [[nodiscard]] static buffer entry(const chunk_key& k) noexcept {
    buffer p{};
    fanout(std::to_integer<unsigned>(k.bytes[0]), p.data());
    p[2] = '/';
    hex(k, p.data() + 3);
    p[3 + name_chars] = '\0';
    return p;
  }
  /// "hh/.tmp.<hex>.<pid>.<seq>"
  [[nodiscard]] static buffer temp(const chunk_key& k, long pid, std::uint64_t seq) noexcept {
    buffer p{};
    fanout(std::to_integer<unsigned>(k.bytes[0]), p.data());
    p[2] = '/';
    std::memcpy(p.data() + 3, temp_prefix.data(), temp_prefix.size());
    char* at = p.data() + 3 + temp_prefix.size();
    hex(k, at);
    at += name_chars;
    std::snprintf(at, p.size() - static_cast<std::size_t>(at - p.data()), ".%ld.%llu", pid,
                  static_cast<unsigned long long>(seq));
    return p;
  }
  /// The key an entry file name spells, if it is one (64 lower-case hex digits).
  [[nodiscard]] static std::optional<chunk_key> parse(std::string_view name) noexcept {
    if (name.size() != name_chars) return std::nullopt;
    chunk_key k;
    for (std::size_t i = 0; i < k.bytes.size(); ++i) {
      unsigned v = 0;
      for (std::size_t j = 0; j < 2; ++j) {
        const char c = name[2 * i + j];
        unsigned d;
        if (c >= '0' && c <= '9')
          d = static_cast<unsigned>(c - '0');
        else if (c >= 'a' && c <= 'f')
          d = static_cast<unsigned>(c - 'a' + 10);
        else
          return std::nullopt;
        v = v * 16 + d;
      }
      k.bytes[i] = static_cast<std::byte>(v);
    }
    return k;
  }
};

[[nodiscard]] inline bool is_aligned(const void* p, std::size_t a) noexcept {
  return reinterpret_cast<std::uintptr_t>(p) % a == 0;
}

/// The header block `encode_chunk_header(head, ns, k, payload, chunk_record_block)` writes, for a
/// payload of `payload_bytes` whose XXH3-64 is `payload_sum`: a writer that hashes the payload
/// while its blocks are being written, and writes the header last, builds it from the sum.
inline void encode_disk_header_with_sum(std::span<std::byte> head, const namespace_digest& ns, const chunk_key& k,
                                        std::uint64_t payload_bytes, std::uint64_t payload_sum) noexcept {
  using namespace record_codec;
  (void)encode_chunk_header(head, ns, k, {}, chunk_record_block);
  put_le(head.data() + off_payload_bytes, payload_bytes, 8);
  put_le(head.data() + off_payload_sum, payload_sum, 8);
  put_le(head.data() + off_header_sum, XXH3_64bits(head.data(), off_header_sum), 8);
}

}  // namespace detail

/// @brief Chunks as files under a local directory, with a byte capacity, LRU eviction, checksums
/// and atomic, optionally durable writes.
///
/// Layout: `<directory>/hh/<key as 64 hex digits>`, `hh` being the key's first byte (up to 256
/// fan-out directories, each made with its first chunk), plus `<directory>/.lock` and, between
/// runs, the index snapshot `<directory>/.index`. A file is a chunk record (magic, version,
/// namespace digest, key, payload size, XXH3-64 of the payload, XXH3-64 of the header; see
/// `detail/chunk_record.hpp`) whose header is padded to one 4 KiB block, then the payload
/// zero-padded to whole blocks (`detail::disk_entry_bytes`).
///
/// Writes: to `hh/.tmp.<key>.<pid>.<n>` (created with O_EXCL), synced as `fsync_policy` says,
/// renamed over the entry: a file under an entry's name is always complete, and a crash leaves at
/// most a temporary file, removed by the next open. A file is the header block, the caller's
/// buffer and a tail block (the last partial block, or padding), with O_DIRECT when the
/// filesystem accepts it (probed on open) and the caller's buffer is 4 KiB aligned, buffered
/// otherwise; the payload goes straight between the caller's buffer and the file. How the bytes
/// move is `disk_tier_config::io_engine` (`io_engine()` says which `open` chose):
/// - io_uring (liburing): the payload goes as requests of `io_request_bytes`, up to
///   `io_queue_depth` in flight from the one calling thread. A put submits them (after a
///   `fallocate` of the file when direct, so the requests do not queue behind each other as
///   writes past the end of a file do), hashes the payload meanwhile and writes the header
///   block, which carries the checksum, last; a get hashes each piece as it arrives while later
///   ones are still being read. Each calling thread uses a ring of its own, made at its first
///   call and kept for the next.
/// - posix: one `pwritev`/`preadv` per file, the checksum computed before the write or after
///   the read. Also the fallback of a call for which no ring can be made.
/// All I/O goes through `detail::disk_io`.
///
/// Open: exclusive (default) or shared use of the directory, see `directory_sharing`. The index is
/// rebuilt from the fan-out directories: the snapshot the last clean close wrote supplies the size
/// and LRU place of every unchanged file (`index_snapshot`); other files are stat'ed and ordered by
/// modification time. Temporary files are removed, and so are empty and truncated ones that a
/// stat shows; with `verify_on_open` every header is read and checked too.
///
/// Reads: every `get` checks the header (magic, version, namespace, key, sizes against the file's
/// size), the padding and the payload checksum, and removes an entry that fails (counted in
/// `corrupt_removed`): the tier never returns wrong bytes.
///
/// Failures of the medium (disk full: ENOSPC, EFBIG under RLIMIT_FSIZE, EDQUOT; a read-only or
/// vanished directory; EIO) fail only the call concerned with errc::backend_failure, are counted,
/// and the tier keeps serving. A process that sets RLIMIT_FSIZE must ignore SIGXFSZ (its default
/// action kills the process; the library leaves signal dispositions alone).
///
/// Thread-safe: any number of threads may call any member at once; each call does its own I/O, so
/// requests from different threads are in flight together. Capacity is accounted in file bytes
/// (the filesystem's own block and inode overhead is not counted). Movable; a moved-from tier
/// answers every call with errc::shut_down (or nothing). A child made by `fork` opens a tier of
/// its own: the lock and the io_uring rings belong to the process that opened the tier. Linux
/// only (O_DIRECT, flock).
class disk_tier {
 public:
  static constexpr std::string_view name = "disk";
  /// Direct-I/O block: file offsets, lengths and (for O_DIRECT) buffer addresses align to it.
  static constexpr std::size_t block = detail::chunk_record_block;

  /// @brief Opens (creating if needed) the tier in `cfg.directory` and rebuilds its index.
  /// Fails with errc::invalid_config for a bad `cfg`, errc::backend_failure when the directory
  /// cannot be created or opened or another tier holds it (the message says which, and the pid of
  /// an exclusive holder), errc::unsupported for `direct_io_mode::on` on a filesystem without
  /// O_DIRECT, and for `disk_io_engine::io_uring` when the build lacks liburing or the kernel
  /// refuses a ring (`automatic` then falls back to `posix` and logs it at info level).
  [[nodiscard]] static result<disk_tier> open(const disk_tier_config& cfg) {
    if (auto v = cfg.validate(); !v) return std::unexpected(std::move(v.error()));
    auto st = std::make_unique<state>();
    st->cfg = cfg;
    if (auto r = st->open_directory(); !r) return std::unexpected(std::move(r.error()));
    if (auto r = st->choose_engine(); !r) return std::unexpected(std::move(r.error()));
    if (auto r = st->rebuild_index(); !r) return std::unexpected(std::move(r.error()));
    st->log_open();
    return disk_tier(std::move(st));
  }

  disk_tier(disk_tier&&) noexcept = default;
  disk_tier& operator=(disk_tier&&) noexcept = default;
  disk_tier(const disk_tier&) = delete;
  disk_tier& operator=(const disk_tier&) = delete;
  ~disk_tier() = default;

  /// @brief Writes `bytes` as chunk `k` (replacing it if present), durable per `cfg.fsync` on
  /// return. Evicts least recently used chunks to make room. Errors: errc::invalid_argument (empty
  /// or above `max_chunk_bytes`), errc::capacity_exhausted (larger than the capacity, or every
  /// other byte is held by writes in flight), errc::backend_failure (the write failed: disk full,
  /// unwritable; the message names the file and the cause).
  [[nodiscard]] result<void> put(const chunk_key& k, std::span<const std::byte> bytes) {
    if (!s_) return fail(errc::shut_down, "disk_tier was moved from");
    return s_->put(k, bytes);
  }

  /// @brief Reads chunk `k` into `out`, verified; returns its size. errc::not_found when absent,
  /// corrupt, truncated or foreign (a bad file is removed); errc::size_mismatch when `out` is
  /// smaller than the chunk; errc::backend_failure on an I/O error. May write anywhere in `out`.
  [[nodiscard]] result<std::size_t> get(const chunk_key& k, std::span<std::byte> out) {
    if (!s_) return fail(errc::shut_down, "disk_tier was moved from");
    return s_->get(k, out);
  }

  /// @brief How many leading `keys` the index holds (shared mode: or the directory, one stat per
  /// key the index lacks).
  [[nodiscard]] std::size_t contains(std::span<const chunk_key> keys) { return s_ ? s_->contains(keys) : 0; }

  /// @brief Deletes chunk `k` if present.
  void remove(const chunk_key& k) noexcept {
    if (s_) s_->remove(k);
  }

  [[nodiscard]] tier_stats stats() const { return s_ ? s_->snapshot() : tier_stats{}; }

  /// @brief Whether aligned requests use O_DIRECT.
  [[nodiscard]] bool direct_io() const noexcept { return s_ && s_->direct; }
  /// @brief The interface `open` chose for the files' bytes: `io_uring` or `posix`, never
  /// `automatic` (`posix` for a moved-from tier).
  [[nodiscard]] disk_io_engine io_engine() const noexcept { return s_ ? s_->engine : disk_io_engine::posix; }
  /// @brief What the index rebuild on open found.
  [[nodiscard]] disk_recovery recovery() const noexcept { return s_ ? s_->recovered : disk_recovery{}; }
  /// @brief The configuration the tier was opened with.
  [[nodiscard]] const disk_tier_config& config() const noexcept {
    static const disk_tier_config none{};
    return s_ ? s_->cfg : none;
  }
  /// @brief The file chunk `k` is (or would be) stored in.
  [[nodiscard]] std::string path_of(const chunk_key& k) const {
    return s_ ? s_->cfg.directory + "/" + detail::disk_paths::entry(k).data() : std::string{};
  }

 private:
  struct entry {
    std::uint64_t file_bytes{0};
    std::uint64_t ino{0};  // the inode this index entry names: guards removals against replaced files
  };

  struct state {
    disk_tier_config cfg;
    detail::disk_io::unique_fd dir_fd, lock_fd;
    bool direct{false};
    disk_io_engine engine{disk_io_engine::posix};
#ifdef KVORTEX_HAS_LIBURING
    std::unique_ptr<detail::disk_io::ring_pool> rings;
#endif
    bool opened{false};  // locked and indexed: the snapshot on close is ours to write
    long pid{0};
    disk_recovery recovered;

    // Lock order: a key's stripe, then the index. A key's file is renamed into place or
    // unlinked only under its stripe, and the index is updated before the stripe is released,
    // so "the index has no entry for k" under the stripe means no file of ours should exist.
    static constexpr std::size_t stripe_count = 64;
    std::array<std::mutex, stripe_count> stripes;
    std::mutex index_mu;
    std::unordered_map<chunk_key, entry, chunk_key_hash> index;
    lru_eviction lru;
    std::uint64_t held{0};      // file bytes of indexed entries
    std::uint64_t reserved{0};  // file bytes of writes in flight

    std::atomic<std::uint64_t> temp_seq{0};
    std::atomic<std::uint64_t> hits{0}, misses{0}, writes{0}, bytes_read{0}, bytes_written{0}, read_errors{0},
        write_errors{0}, rejected_writes{0}, corrupt_removed{0}, stale_removed{0}, evictions{0};
    detail::atomic_histogram read_latency, write_latency;

    using clock = std::chrono::steady_clock;

    std::mutex& stripe(const chunk_key& k) noexcept { return stripes[(chunk_key_hash{}(k) >> 17) % stripe_count]; }

    [[nodiscard]] std::string where(const char* rel) const { return cfg.directory + "/" + rel; }

    [[nodiscard]] detail::chunk_record_expect expect(const chunk_key& k) const noexcept {
      detail::chunk_record_expect e;
      e.ns = cfg.ns;
      e.key = k;
      e.max_payload_bytes = cfg.max_chunk_bytes;
      return e;
    }

    static std::uint64_t elapsed_ns(clock::time_point t0) noexcept {
      return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count());
    }

    state() = default;
    state(const state&) = delete;
    state& operator=(const state&) = delete;
    ~state() {
      if (opened && cfg.index_snapshot && cfg.sharing == directory_sharing::exclusive) write_snapshot();
    }

    // ---- index snapshot -----------------------------------------------------------------------
    // `.index`: magic, entry count, namespace digest, then per entry (least recently used first)
    // key, file bytes and inode, then XXH3-64 of everything before it. Integers little-endian.

    static constexpr std::array<std::byte, 8> snapshot_magic{std::byte{'K'}, std::byte{'V'}, std::byte{'X'},
                                                             std::byte{'I'}, std::byte{'D'}, std::byte{'X'},
                                                             std::byte{'1'}, std::byte{'\n'}};
    static constexpr std::size_t snapshot_head = 8 + 8 + 32, snapshot_entry = 32 + 8 + 8;
    struct snapshot_slot {
      std::uint64_t file_bytes, ino, order;
    };
    using snapshot_map = std::unordered_map<chunk_key, snapshot_slot, chunk_key_hash>;

    // The snapshot a clean close left, removed once read (a crash before the next close then
    // leaves none, rather than a stale one).
    snapshot_map load_snapshot() {
      using detail::record_codec::get_le;
      snapshot_map m;
      detail::disk_io::unique_fd fd(::openat(dir_fd.get(), ".index", O_RDONLY | O_CLOEXEC));
      if (!fd) return m;
      struct stat sb{};
      const bool sized = ::fstat(fd.get(), &sb) == 0 && sb.st_size >= static_cast<off_t>(snapshot_head + 8) &&
                         (static_cast<std::size_t>(sb.st_size) - snapshot_head - 8) % snapshot_entry == 0;
      std::vector<std::byte> bytes(sized ? static_cast<std::size_t>(sb.st_size) : 0);
      iovec iov{bytes.data(), bytes.size()};
      const bool read_ok = sized && detail::disk_io::transfer<false>(fd.get(), std::span(&iov, 1), 0) ==
                                        static_cast<std::int64_t>(bytes.size());
      fd.reset();
      ::unlinkat(dir_fd.get(), ".index", 0);
      const auto ignored = [&](const char* why) {
        if (detail::log_enabled(log_level::warning))
          detail::log(log_level::warning, "disk", "snapshot_ignored",
                      "disk tier: index snapshot " + where(".index") + " ignored (" + why +
                          "); every file is stat'ed instead");
        return snapshot_map{};
      };
      if (!read_ok) return ignored(sized ? "unreadable" : "wrong size");
      const std::byte* p = bytes.data();
      const std::size_t body = bytes.size() - 8;
      const std::uint64_t count = get_le(p + 8, 8);
      if (std::memcmp(p, snapshot_magic.data(), snapshot_magic.size()) != 0 ||
          count != (body - snapshot_head) / snapshot_entry || get_le(p + body, 8) != XXH3_64bits(p, body))
        return ignored("damaged");
      if (std::memcmp(p + 16, cfg.ns.data(), cfg.ns.size()) != 0) return ignored("written under another namespace");
      m.reserve(static_cast<std::size_t>(count));
      for (std::uint64_t i = 0; i < count; ++i) {
        const std::byte* e = p + snapshot_head + i * snapshot_entry;
        chunk_key k;
        std::memcpy(k.bytes.data(), e, 32);
        m.try_emplace(k, snapshot_slot{get_le(e + 32, 8), get_le(e + 40, 8), i});
      }
      return m;
    }

    void write_snapshot() noexcept {
      using detail::record_codec::put_le;
      try {
        std::vector<chunk_key> order;
        order.reserve(index.size());
        (void)lru.select_victim([&order](const chunk_key& k) {  // visits every key, oldest first
          order.push_back(k);
          return false;
        });
        std::vector<std::byte> bytes(snapshot_head + order.size() * snapshot_entry + 8);
        std::byte* p = bytes.data();
        std::memcpy(p, snapshot_magic.data(), snapshot_magic.size());
        std::size_t n = 0;
        for (const auto& k : order) {
          const auto it = index.find(k);
          if (it == index.end()) continue;
          std::byte* e = p + snapshot_head + n * snapshot_entry;
          std::memcpy(e, k.bytes.data(), 32);
          put_le(e + 32, it->second.file_bytes, 8);
          put_le(e + 40, it->second.ino, 8);
          ++n;
        }
        bytes.resize(snapshot_head + n * snapshot_entry + 8);
        p = bytes.data();
        put_le(p + 8, n, 8);
        std::memcpy(p + 16, cfg.ns.data(), cfg.ns.size());
        const std::size_t body = bytes.size() - 8;
        put_le(p + body, XXH3_64bits(p, body), 8);
        char tmp[64];
        std::snprintf(tmp, sizeof tmp, ".index.tmp.%ld", pid);
        detail::disk_io::unique_fd fd(::openat(dir_fd.get(), tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666));
        if (!fd) return;
        iovec iov{bytes.data(), bytes.size()};
        const bool ok = detail::disk_io::transfer<true>(fd.get(), std::span(&iov, 1), 0) ==
                            static_cast<std::int64_t>(bytes.size()) &&
                        (cfg.fsync == fsync_policy::never || ::fdatasync(fd.get()) == 0) && fd.reset() == 0;
        if (!ok || ::renameat(dir_fd.get(), tmp, dir_fd.get(), ".index") != 0) ::unlinkat(dir_fd.get(), tmp, 0);
      } catch (...) {  // no memory for the snapshot: the next open stats every file instead
      }
    }

    // ---- open ---------------------------------------------------------------------------------

    result<void> open_directory() {
      using detail::disk_io::errno_text;
      pid = static_cast<long>(::getpid());
      std::error_code ec;
      std::filesystem::create_directories(cfg.directory, ec);
      if (ec) return fail(errc::backend_failure, "disk tier: cannot create directory " + cfg.directory + ": " + ec.message());
      dir_fd = detail::disk_io::unique_fd(::open(cfg.directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (!dir_fd) {
        const int e = errno;
        return fail(errc::backend_failure, "disk tier: cannot open directory " + cfg.directory + ": " + errno_text(e));
      }

      lock_fd = detail::disk_io::unique_fd(::openat(dir_fd.get(), ".lock", O_RDWR | O_CREAT | O_CLOEXEC, 0666));
      if (!lock_fd) {
        const int e = errno;
        return fail(errc::backend_failure, "disk tier: cannot open lock file " + where(".lock") + ": " + errno_text(e));
      }
      const bool exclusive = cfg.sharing == directory_sharing::exclusive;
      int rc;
      do rc = ::flock(lock_fd.get(), (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB);
      while (rc != 0 && errno == EINTR);
      if (rc != 0) {
        const int e = errno;
        if (e != EWOULDBLOCK) return fail(errc::backend_failure, "disk tier: cannot lock " + where(".lock") + ": " + errno_text(e));
        std::string holder;
        char buf[32] = {};
        if (const ssize_t n = ::pread(lock_fd.get(), buf, sizeof buf - 1, 0); n > 0) holder = std::string(buf, static_cast<std::size_t>(n));
        while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
        return fail(errc::backend_failure,
                    "disk tier: directory " + cfg.directory + " is in use by another disk tier (" +
                        (holder.empty() ? std::string(exclusive ? "held shared or exclusively" : "held exclusively")
                                        : "held exclusively by pid " + holder) +
                        "; lock file " + where(".lock") + ")");
      }
      if (exclusive) {  // who holds it, for the next opener's message
        const std::string me = std::to_string(pid) + "\n";
        if (::ftruncate(lock_fd.get(), 0) == 0) (void)!::pwrite(lock_fd.get(), me.data(), me.size(), 0);
      }

      if (exclusive) remove_stale_temporaries();
      if (cfg.direct_io != direct_io_mode::off) {
        direct = probe_direct_io();
        if (!direct && cfg.direct_io == direct_io_mode::on)
          return fail(errc::unsupported, "disk tier: the filesystem of " + cfg.directory + " does not accept O_DIRECT "
                                         "(direct_io_mode::on); use automatic or off");
      }
      return {};
    }

    // Probe and snapshot temporaries a killed process left in the root.
    void remove_stale_temporaries() noexcept {
      const int fd = ::openat(dir_fd.get(), ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (fd < 0) return;
      DIR* d = ::fdopendir(fd);
      if (d == nullptr) {
        ::close(fd);
        return;
      }
      while (const dirent* de = ::readdir(d))
        if (const std::string_view nm(de->d_name); nm.starts_with(".probe.") || nm.starts_with(".index.tmp."))
          ::unlinkat(::dirfd(d), de->d_name, 0);
      ::closedir(d);
    }

    // An aligned O_DIRECT write of one block in the directory decides: tmpfs (before Linux 6.6),
    // some FUSE and overlay filesystems refuse the flag or the write.
    bool probe_direct_io() {
      char name[64];
      std::snprintf(name, sizeof name, ".probe.%ld.%llu", pid,
                    static_cast<unsigned long long>(temp_seq.fetch_add(1, std::memory_order_relaxed)));
      detail::disk_io::unique_fd fd(::openat(dir_fd.get(), name, O_WRONLY | O_CREAT | O_EXCL | O_DIRECT | O_CLOEXEC, 0666));
      if (!fd) return false;
      alignas(block) static constexpr std::array<std::byte, block> zeros{};
      const bool ok = ::pwrite(fd.get(), zeros.data(), zeros.size(), 0) == static_cast<ssize_t>(zeros.size());
      fd.reset();
      ::unlinkat(dir_fd.get(), name, 0);
      return ok;
    }

    // io_uring when asked for (or automatic) and a ring works here, else pread/pwrite.
    result<void> choose_engine() {
      engine = disk_io_engine::posix;
      if (cfg.io_engine == disk_io_engine::posix) return {};
      std::string why;
#ifdef KVORTEX_HAS_LIBURING
      rings = std::make_unique<detail::disk_io::ring_pool>(cfg.io_queue_depth);
      int e = 0;
      auto r = rings->take(e);
      if (r) e = r->probe();
      if (r && e == 0) {
        rings->give(std::move(r));
        engine = disk_io_engine::io_uring;
        return {};
      }
      r.reset();
      rings.reset();
      why = "the kernel refused an io_uring (" + detail::disk_io::errno_text(e) +
            "; seccomp or kernel.io_uring_disabled may forbid it)";
#else
      why = "this build has no liburing (KVORTEX_WITH_LIBURING)";
#endif
      if (cfg.io_engine == disk_io_engine::io_uring)
        return fail(errc::unsupported, "disk tier: io_engine io_uring for " + cfg.directory + ": " + why);
      if (detail::log_enabled(log_level::info))
        detail::log(log_level::info, "disk", "io_uring_unavailable",
                    "disk tier " + cfg.directory + ": " + why + "; using pread/pwrite");
      return {};
    }

    void log_open() const {
      if (detail::log_enabled(log_level::info))
        detail::log(log_level::info, "disk", "index_rebuilt",
                    "disk tier " + cfg.directory + ": " + std::to_string(recovered.entries) + " entries (" +
                        std::to_string(recovered.bytes) + " bytes, " + std::to_string(recovered.from_snapshot) +
                        " from the snapshot) indexed in " + std::to_string(recovered.seconds) + " s; removed " +
                        std::to_string(recovered.stale_removed) + " temporary, " +
                        std::to_string(recovered.invalid_removed) + " invalid and " +
                        std::to_string(recovered.evicted) + " over-capacity files; io_engine " +
                        std::string(to_string(engine)) + ", direct I/O " + (direct ? "on" : "off"));
      if (recovered.invalid_removed != 0 && detail::log_enabled(log_level::warning))
        detail::log(log_level::warning, "disk", "corrupt_entry_removed",
                    "disk tier " + cfg.directory + ": " + std::to_string(recovered.invalid_removed) +
                        " empty, truncated" + (cfg.verify_on_open ? ", foreign or corrupt" : "") +
                        " chunk files removed on open");
    }

    // A write that failed with errno `e` (0: not an errno), already described by `message`.
    static void log_write_failure(int e, const std::string& message) noexcept {
      const bool full = e == ENOSPC || e == EFBIG || e == EDQUOT;
      if (detail::log_enabled(log_level::error))
        detail::log(log_level::error, "disk", full ? "disk_full" : "write_failed", message);
    }

    struct found_file {
      chunk_key key;
      entry e;
      std::uint64_t snapshot_order;  // its place in the snapshot, or ~0 (then mtime orders it)
      std::int64_t mtime_ns;
    };

    result<void> rebuild_index() {
      const auto t0 = clock::now();
      const bool exclusive = cfg.sharing == directory_sharing::exclusive;
      const auto now_s = static_cast<std::int64_t>(::time(nullptr));
      std::vector<found_file> files;
      snapshot_map snap;
      if (exclusive && cfg.index_snapshot)
        snap = load_snapshot();
      else if (exclusive)
        ::unlinkat(dir_fd.get(), ".index", 0);  // would go stale while unused
      constexpr std::uint64_t unordered = ~std::uint64_t{0};
      for (unsigned b = 0; b < 256; ++b) {
        char sub[3];
        detail::disk_paths::fanout(b, sub);
        const int fd = ::openat(dir_fd.get(), sub, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0) continue;  // created with its first chunk: none yet
        DIR* d = ::fdopendir(fd);
        if (d == nullptr) {
          ::close(fd);
          continue;
        }
        const int dfd = ::dirfd(d);
        while (const dirent* de = ::readdir(d)) {
          const std::string_view nm(de->d_name);
          if (nm == "." || nm == "..") continue;
          if (nm.starts_with(detail::disk_paths::temp_prefix)) {
            struct stat sb{};
            if (!exclusive && (::fstatat(dfd, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) != 0 ||
                               now_s - static_cast<std::int64_t>(sb.st_mtim.tv_sec) < cfg.stale_temp_seconds))
              continue;  // another process may be writing it
            if (::unlinkat(dfd, de->d_name, 0) == 0) ++recovered.stale_removed;
            continue;
          }
          const auto key = detail::disk_paths::parse(nm);
          if (!key || std::to_integer<unsigned>(key->bytes[0]) != b) continue;  // not ours: leave it
          found_file f{*key, {}, unordered, 0};
          // The same inode as at the last clean close: the same file, so its size is known.
          const auto hit = de->d_type == DT_REG ? snap.find(*key) : snap.end();
          if (hit != snap.end() && hit->second.ino == static_cast<std::uint64_t>(de->d_ino)) {
            f.e = {hit->second.file_bytes, hit->second.ino};
            f.snapshot_order = hit->second.order;
          } else {
            struct stat sb{};
            if (::fstatat(dfd, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(sb.st_mode)) continue;
            f.e = {static_cast<std::uint64_t>(sb.st_size), static_cast<std::uint64_t>(sb.st_ino)};
            f.mtime_ns = static_cast<std::int64_t>(sb.st_mtim.tv_sec) * 1'000'000'000 + sb.st_mtim.tv_nsec;
          }
          if (cfg.verify_on_open && !header_valid(dfd, de->d_name, *key, f.e)) {
            if (::unlinkat(dfd, de->d_name, 0) == 0) ++recovered.invalid_removed;
            continue;
          }
          const std::uint64_t size = f.e.file_bytes;
          const bool valid =
              size >= 2 * block && size % block == 0 && size <= detail::disk_entry_bytes(cfg.max_chunk_bytes);
          if (!valid) {
            if (::unlinkat(dfd, de->d_name, 0) == 0) ++recovered.invalid_removed;
            continue;
          }
          if (f.snapshot_order != unordered) ++recovered.from_snapshot;
          files.push_back(f);
        }
        ::closedir(d);
      }
      // Snapshot entries in their recorded order, then the files written since, oldest first.
      std::sort(files.begin(), files.end(), [](const found_file& a, const found_file& b) {
        if (a.snapshot_order != b.snapshot_order) return a.snapshot_order < b.snapshot_order;
        return a.mtime_ns < b.mtime_ns;
      });
      index.reserve(files.size());
      for (const auto& f : files) {
        index.emplace(f.key, f.e);
        lru.on_insert(f.key);
        held += f.e.file_bytes;
      }
      while (held > cfg.capacity_bytes) {
        const auto v = lru.select_victim([](const chunk_key&) { return true; });
        if (!v) break;
        const auto it = index.find(*v);
        held -= it->second.file_bytes;
        index.erase(it);
        lru.on_erase(*v);
        ::unlinkat(dir_fd.get(), detail::disk_paths::entry(*v).data(), 0);
        ++recovered.evicted;
      }
      recovered.entries = index.size();
      recovered.bytes = held;
      recovered.seconds = std::chrono::duration<double>(clock::now() - t0).count();
      stale_removed.store(recovered.stale_removed, std::memory_order_relaxed);
      corrupt_removed.store(recovered.invalid_removed, std::memory_order_relaxed);
      evictions.store(recovered.evicted, std::memory_order_relaxed);
      opened = true;
      return {};
    }

    // Reads the file's header and checks it against its real size (which `e` then takes: the
    // snapshot's is only a hint).
    bool header_valid(int dfd, const char* name, const chunk_key& k, entry& e) const {
      detail::disk_io::unique_fd fd(::openat(dfd, name, O_RDONLY | O_CLOEXEC));
      struct stat sb{};
      if (!fd || ::fstat(fd.get(), &sb) != 0) return false;
      e = {static_cast<std::uint64_t>(sb.st_size), static_cast<std::uint64_t>(sb.st_ino)};
      alignas(block) std::array<std::byte, block> hdr;
      if (::pread(fd.get(), hdr.data(), hdr.size(), 0) != static_cast<ssize_t>(hdr.size())) return false;
      return detail::decode_disk_header(hdr, e.file_bytes, expect(k)).has_value();
    }

    // ---- index --------------------------------------------------------------------------------

    // Room for `bytes` more: evicts least recently used entries other than `k` (returned in
    // `victims`, to unlink) and reserves. False when the rest is held by writes in flight.
    bool reserve(const chunk_key& k, std::uint64_t bytes, std::vector<chunk_key>& victims) {
      std::lock_guard lock(index_mu);
      std::uint64_t credit = 0;  // k's current file goes when the new one lands
      if (const auto it = index.find(k); it != index.end()) credit = it->second.file_bytes;
      while (held + reserved + bytes > cfg.capacity_bytes + credit) {
        const auto v = lru.select_victim([&k](const chunk_key& c) { return !(c == k); });
        if (!v) return false;
        const auto it = index.find(*v);
        held -= it->second.file_bytes;
        index.erase(it);
        lru.on_erase(*v);
        evictions.fetch_add(1, std::memory_order_relaxed);
        victims.push_back(*v);
      }
      reserved += bytes;
      return true;
    }

    void unreserve(std::uint64_t bytes) noexcept {
      std::lock_guard lock(index_mu);
      reserved -= bytes;
    }

    // Unlinks evicted keys' files unless a write put them back meanwhile.
    void drop_files(std::span<const chunk_key> keys) noexcept {
      for (const auto& v : keys) {
        std::lock_guard s(stripe(v));
        {
          std::lock_guard lock(index_mu);
          if (index.contains(v)) continue;
        }
        ::unlinkat(dir_fd.get(), detail::disk_paths::entry(v).data(), 0);
      }
    }

    // A get found `k`'s file bad (inode `ino`) or gone (`ino` 0): forgets the entry and removes
    // the file, unless a write replaced it meanwhile (then both are the new chunk's).
    void drop_entry(const chunk_key& k, std::uint64_t ino) noexcept {
      const auto rel = detail::disk_paths::entry(k);
      std::lock_guard s(stripe(k));
      struct stat sb{};
      const bool exists = ::fstatat(dir_fd.get(), rel.data(), &sb, AT_SYMLINK_NOFOLLOW) == 0;
      if (exists && (ino == 0 || static_cast<std::uint64_t>(sb.st_ino) != ino)) return;
      if (exists) ::unlinkat(dir_fd.get(), rel.data(), 0);
      std::lock_guard lock(index_mu);
      if (const auto it = index.find(k); it != index.end()) {
        held -= it->second.file_bytes;
        index.erase(it);
        lru.on_erase(k);
      }
    }

    // Shared mode: a file another process wrote becomes an index entry.
    std::optional<entry> adopt(const chunk_key& k) {
      struct stat sb{};
      if (::fstatat(dir_fd.get(), detail::disk_paths::entry(k).data(), &sb, AT_SYMLINK_NOFOLLOW) != 0 ||
          !S_ISREG(sb.st_mode))
        return std::nullopt;
      const entry e{static_cast<std::uint64_t>(sb.st_size), static_cast<std::uint64_t>(sb.st_ino)};
      std::lock_guard lock(index_mu);
      const auto [it, inserted] = index.try_emplace(k, e);
      if (inserted) {
        held += e.file_bytes;
        lru.on_insert(k);
      }
      return it->second;
    }

    // ---- put ----------------------------------------------------------------------------------

    result<void> put(const chunk_key& k, std::span<const std::byte> bytes) {
      const auto t0 = clock::now();
      if (bytes.empty()) return fail(errc::invalid_argument, "disk tier: put of an empty chunk");
      if (bytes.size() > cfg.max_chunk_bytes) {
        rejected_writes.fetch_add(1, std::memory_order_relaxed);
        return fail(errc::invalid_argument, "disk tier: chunk of " + std::to_string(bytes.size()) +
                                                " bytes exceeds max_chunk_bytes (" + std::to_string(cfg.max_chunk_bytes) + ")");
      }
      const std::uint64_t file_bytes = detail::disk_entry_bytes(bytes.size());
      if (file_bytes > cfg.capacity_bytes) {
        rejected_writes.fetch_add(1, std::memory_order_relaxed);
        return fail(errc::capacity_exhausted, "disk tier: a chunk file of " + std::to_string(file_bytes) +
                                                  " bytes exceeds the capacity (" + std::to_string(cfg.capacity_bytes) + ")");
      }
      std::vector<chunk_key> victims;
      const bool room = reserve(k, file_bytes, victims);
      drop_files(victims);
      if (!room) {
        rejected_writes.fetch_add(1, std::memory_order_relaxed);
        return fail(errc::capacity_exhausted, "disk tier: no room for " + std::to_string(file_bytes) +
                                                  " bytes: the rest of the capacity is held by writes in flight");
      }
      auto written = write_file(k, bytes);
      if (!written) {
        unreserve(file_bytes);
        write_errors.fetch_add(1, std::memory_order_relaxed);
        return std::unexpected(std::move(written.error()));
      }
      if (auto r = install(k, written->first, file_bytes, written->second); !r) {
        write_errors.fetch_add(1, std::memory_order_relaxed);
        log_write_failure(0, r.error().message);
        return r;
      }
      writes.fetch_add(1, std::memory_order_relaxed);
      bytes_written.fetch_add(bytes.size(), std::memory_order_relaxed);
      write_latency.record(elapsed_ns(t0));
      return {};
    }

    // The temporary file of `bytes`, complete (and synced as the policy says): its name and inode.
    result<std::pair<detail::disk_paths::buffer, std::uint64_t>> write_file(const chunk_key& k,
                                                                            std::span<const std::byte> bytes) {
      using detail::disk_io::errno_text;
      const auto tmp = detail::disk_paths::temp(k, pid, temp_seq.fetch_add(1, std::memory_order_relaxed));
      // O_DIRECT moves the payload straight from the caller's buffer, which must then be aligned.
      const bool use_direct = direct && detail::is_aligned(bytes.data(), block);
      const int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | (use_direct ? O_DIRECT : 0);
      detail::disk_io::unique_fd fd(::openat(dir_fd.get(), tmp.data(), flags, 0666));
      if (!fd && errno == ENOENT) {  // the fan-out directory's first chunk (or it was removed)
        const char sub[3] = {tmp[0], tmp[1], '\0'};
        if (::mkdirat(dir_fd.get(), sub, 0777) == 0 && cfg.fsync == fsync_policy::data_and_directory)
          (void)::fsync(dir_fd.get());
        fd = detail::disk_io::unique_fd(::openat(dir_fd.get(), tmp.data(), flags, 0666));
      }
      if (!fd) {
        const int e = errno;
        std::string msg = "disk tier: cannot create " + where(tmp.data()) + ": " + errno_text(e);
        if (e == ENOSPC || e == EDQUOT) msg += " (disk full)";
        log_write_failure(e, msg);
        return fail(errc::backend_failure, std::move(msg));
      }
      const auto failed = [&](const std::string& what, int e) {
        fd.reset();
        ::unlinkat(dir_fd.get(), tmp.data(), 0);
        std::string msg = "disk tier: " + what + " " + where(tmp.data()) + " failed: " + errno_text(e);
        if (e == ENOSPC || e == EFBIG || e == EDQUOT) msg += " (disk full)";
        log_write_failure(e, msg);
        return fail(errc::backend_failure, std::move(msg));
      };

      alignas(block) std::array<std::byte, block> head;
      alignas(block) std::array<std::byte, block> tail;
      // Buffered, the caller's bytes go whole and `tail` is only the padding; direct, the last
      // partial block is copied into `tail` so every transfer is whole blocks.
      const std::size_t body = use_direct ? bytes.size() / block * block : bytes.size();
      const std::size_t rest = bytes.size() - body;
      const std::size_t tail_bytes = rest == 0 ? 0 : block;
      std::size_t pad = 0;
      if (use_direct) {
        if (rest != 0) {
          std::memcpy(tail.data(), bytes.data() + body, rest);
          std::memset(tail.data() + rest, 0, block - rest);
        }
      } else {
        pad = static_cast<std::size_t>(detail::disk_entry_bytes(bytes.size()) - block - bytes.size());
        std::memset(tail.data(), 0, pad);
      }
      const std::size_t tail_len = use_direct ? tail_bytes : pad;
      const std::uint64_t total = detail::disk_entry_bytes(bytes.size());
      std::optional<std::int64_t> moved;
#ifdef KVORTEX_HAS_LIBURING
      if (engine == disk_io_engine::io_uring) moved = write_through_ring(fd.get(), k, bytes, head, body, tail.data(), tail_len, use_direct);
#endif
      if (!moved) {  // posix, or no ring to be had for this call
        (void)detail::encode_chunk_header(head, cfg.ns, k, bytes, block);
        std::array<iovec, 3> iov{{{head.data(), head.size()},
                                  {const_cast<std::byte*>(bytes.data()), body},
                                  {tail.data(), tail_len}}};
        moved = detail::disk_io::transfer<true>(fd.get(), iov, 0);
      }
      const std::int64_t n = *moved;
      if (n < 0) return failed("writing", static_cast<int>(-n));
      if (static_cast<std::uint64_t>(n) != total) return failed("writing", EIO);
      if (cfg.fsync != fsync_policy::never && ::fdatasync(fd.get()) != 0) {
        const int e = errno;
        return failed("fdatasync of", e);
      }
      struct stat sb{};
      if (::fstat(fd.get(), &sb) != 0) {
        const int e = errno;
        return failed("fstat of", e);
      }
      if (const int e = fd.reset(); e != 0) return failed("closing", e);
      return std::pair{tmp, static_cast<std::uint64_t>(sb.st_ino)};
    }

#ifdef KVORTEX_HAS_LIBURING
    // The entry's bytes through a ring: the payload's requests (and the tail block) are submitted
    // first and the payload is hashed while they are in flight; the header block, which carries
    // the checksum, goes last (the file is a temporary until renamed, so the order is free).
    // Bytes written or -errno; nothing when no ring can be had (the caller writes with pwritev).
    std::optional<std::int64_t> write_through_ring(int fd, const chunk_key& k, std::span<const std::byte> bytes,
                                                   std::span<std::byte, block> head, std::size_t body,
                                                   std::byte* tail, std::size_t tail_len, bool use_direct) {
      int e = 0;
      auto r = rings->take(e);
      if (!r) return std::nullopt;
      const std::size_t seg = cfg.io_request_bytes;
      if (!r->begin(fd, true, (body + seg - 1) / seg + 2)) {
        rings->give(std::move(r));
        return std::nullopt;
      }
      // Direct writes past the end of a file are serialized (and waited for) by ext4 and XFS;
      // allocated first, the file takes its requests side by side. A filesystem without
      // fallocate just writes as it would have. A full disk (or RLIMIT_FSIZE) fails here.
      if (use_direct) {
        int rc;
        do rc = ::fallocate(fd, 0, 0, static_cast<off_t>(detail::disk_entry_bytes(bytes.size())));
        while (rc != 0 && errno == EINTR);
        if (rc != 0 && errno != EOPNOTSUPP && errno != ENOSYS) {
          const int fe = errno;
          rings->give(std::move(r));
          return -static_cast<std::int64_t>(fe);
        }
      }
      auto* const src = const_cast<std::byte*>(bytes.data());  // only read, by the kernel
      for (std::size_t off = 0; off < body; off += seg) r->push(src + off, std::min(seg, body - off), block + off);
      if (tail_len != 0) r->push(tail, tail_len, block + body);
      r->pump(false);
      XXH3_state_t hs;
      (void)XXH3_64bits_reset(&hs);
      for (std::size_t off = 0; off < bytes.size(); off += seg) {
        (void)XXH3_64bits_update(&hs, bytes.data() + off, std::min(seg, bytes.size() - off));
        r->pump(false);
      }
      detail::encode_disk_header_with_sum(head, cfg.ns, k, bytes.size(), XXH3_64bits_digest(&hs));
      r->push(head.data(), head.size(), 0);
      while (r->busy()) r->pump(true);
      const int err = r->error();
      rings->give(std::move(r));
      if (err != 0) return -static_cast<std::int64_t>(err);
      return static_cast<std::int64_t>(detail::disk_entry_bytes(bytes.size()));
    }
#endif

    // Renames the temporary file over `k`'s entry and indexes it.
    result<void> install(const chunk_key& k, const detail::disk_paths::buffer& tmp, std::uint64_t file_bytes,
                         std::uint64_t ino) {
      const auto rel = detail::disk_paths::entry(k);
      {
        std::lock_guard s(stripe(k));
        if (::renameat(dir_fd.get(), tmp.data(), dir_fd.get(), rel.data()) != 0) {
          const int e = errno;
          ::unlinkat(dir_fd.get(), tmp.data(), 0);
          unreserve(file_bytes);
          return fail(errc::backend_failure, "disk tier: renaming " + where(tmp.data()) + " to " + where(rel.data()) +
                                                 " failed: " + detail::disk_io::errno_text(e));
        }
        std::lock_guard lock(index_mu);
        reserved -= file_bytes;
        const auto [it, inserted] = index.try_emplace(k, entry{file_bytes, ino});
        if (inserted) {
          lru.on_insert(k);
        } else {
          held -= it->second.file_bytes;
          it->second = entry{file_bytes, ino};
          lru.on_access(k);
        }
        held += file_bytes;
      }
      if (cfg.fsync == fsync_policy::data_and_directory) {
        const char sub[3] = {rel[0], rel[1], '\0'};
        detail::disk_io::unique_fd d(::openat(dir_fd.get(), sub, O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        if (!d || ::fsync(d.get()) != 0) {
          const int e = errno;
          return fail(errc::backend_failure, "disk tier: fsync of directory " + where(sub) + " failed: " +
                                                 detail::disk_io::errno_text(e));
        }
      }
      return {};
    }

    // ---- get ----------------------------------------------------------------------------------

    result<std::size_t> get(const chunk_key& k, std::span<std::byte> out) {
      const auto t0 = clock::now();
      auto r = read(k, out);
      if (r) {
        hits.fetch_add(1, std::memory_order_relaxed);
        bytes_read.fetch_add(*r, std::memory_order_relaxed);
      } else if (r.error().code == errc::not_found) {
        misses.fetch_add(1, std::memory_order_relaxed);
      } else if (r.error().code == errc::backend_failure) {
        read_errors.fetch_add(1, std::memory_order_relaxed);
      }
      read_latency.record(elapsed_ns(t0));
      return r;
    }

    result<std::size_t> read(const chunk_key& k, std::span<std::byte> out) {
      using detail::disk_io::errno_text;
      bool known;
      {
        std::lock_guard lock(index_mu);
        known = index.contains(k);
        if (known) lru.on_access(k);
      }
      if (!known && !(cfg.sharing == directory_sharing::shared && adopt(k)))
        return fail(errc::not_found, "disk tier: chunk " + k.hex() + " is not stored");

      const auto rel = detail::disk_paths::entry(k);
      const bool use_direct = direct && detail::is_aligned(out.data(), block);
      detail::disk_io::unique_fd fd(::openat(dir_fd.get(), rel.data(), O_RDONLY | O_CLOEXEC | (use_direct ? O_DIRECT : 0)));
      if (!fd) {
        const int e = errno;
        if (e == ENOENT) {  // removed behind our back (another process, an operator)
          drop_entry(k, 0);
          return fail(errc::not_found, "disk tier: chunk " + k.hex() + " vanished from " + where(rel.data()));
        }
        return fail(errc::backend_failure, "disk tier: cannot open " + where(rel.data()) + ": " + errno_text(e));
      }
      struct stat sb{};
      if (::fstat(fd.get(), &sb) != 0) {
        const int e = errno;
        return fail(errc::backend_failure, "disk tier: fstat of " + where(rel.data()) + " failed: " + errno_text(e));
      }
      const auto ino = static_cast<std::uint64_t>(sb.st_ino);
      const auto file_bytes = static_cast<std::uint64_t>(sb.st_size);
      const auto corrupt = [&](detail::record_error why) -> result<std::size_t> {
        drop_entry(k, ino);
        corrupt_removed.fetch_add(1, std::memory_order_relaxed);
        std::string msg = "disk tier: chunk file " + where(rel.data()) + " is invalid (" +
                          std::string(detail::to_string(why)) + "); removed";
        if (detail::log_enabled(log_level::warning))
          detail::log(log_level::warning, "disk", "corrupt_entry_removed", msg);
        return fail(errc::not_found, std::move(msg));
      };
      if (file_bytes < 2 * block || file_bytes % block != 0) return corrupt(detail::record_error::truncated);

      alignas(block) std::array<std::byte, block> head;
      alignas(block) std::array<std::byte, block> tail;
      const std::uint64_t span_bytes = file_bytes - block;  // payload and padding
      if (out.size() + block <= span_bytes) {
        // `out` cannot hold the smallest payload this file could have: tell a corrupt file from
        // a caller's small buffer by the header alone.
        if (::pread(fd.get(), head.data(), head.size(), 0) != static_cast<ssize_t>(head.size()))
          return corrupt(detail::record_error::truncated);
        const auto info = detail::decode_disk_header(head, file_bytes, expect(k));
        if (!info) return corrupt(info.error());
        return fail(errc::size_mismatch, "disk tier: chunk " + k.hex() + " holds " + std::to_string(info->payload_bytes) +
                                             " bytes, the buffer " + std::to_string(out.size()));
      }
      std::size_t body = static_cast<std::size_t>(std::min<std::uint64_t>(out.size(), span_bytes));
      if (use_direct) body = body / block * block;
      const auto rest = static_cast<std::size_t>(span_bytes - body);  // < 2 blocks buffered, 0 or 1 block direct
      if (rest > block) return corrupt(detail::record_error::trailing_bytes);
      std::optional<std::int64_t> moved;
      XXH3_state_t hs;  // io_uring: the payload's hash so far, taken while later blocks were read
      std::size_t hashed = 0;
#ifdef KVORTEX_HAS_LIBURING
      if (engine == disk_io_engine::io_uring) moved = read_through_ring(fd.get(), k, file_bytes, head, out, body, tail.data(), rest, hs, hashed);
#endif
      const bool hashing = moved.has_value();
      if (!moved) {  // posix, or no ring to be had for this call
        std::array<iovec, 3> iov{{{head.data(), head.size()}, {out.data(), body}, {tail.data(), rest}}};
        moved = detail::disk_io::transfer<false>(fd.get(), iov, 0);
      }
      const std::int64_t n = *moved;
      if (n < 0) {
        std::string msg = "disk tier: reading " + where(rel.data()) + " failed: " + errno_text(static_cast<int>(-n));
        if (detail::log_enabled(log_level::error)) detail::log(log_level::error, "disk", "read_failed", msg);
        return fail(errc::backend_failure, std::move(msg));
      }
      if (static_cast<std::uint64_t>(n) != file_bytes) return corrupt(detail::record_error::truncated);

      const auto info = detail::decode_disk_header(head, file_bytes, expect(k));
      if (!info) return corrupt(info.error());
      const auto payload = static_cast<std::size_t>(info->payload_bytes);
      if (payload > out.size())
        return fail(errc::size_mismatch, "disk tier: chunk " + k.hex() + " holds " + std::to_string(payload) +
                                             " bytes, the buffer " + std::to_string(out.size()));
      // The payload is out[0, body) then tail[0, payload - body); the rest of both is padding.
      std::span<const std::byte> pad_in_out, pad_in_tail;
      if (payload > body) {
        std::memcpy(out.data() + body, tail.data(), payload - body);
        pad_in_tail = std::span<const std::byte>(tail.data() + (payload - body), rest - (payload - body));
      } else {
        pad_in_out = std::span<const std::byte>(out.data() + payload, body - payload);
        pad_in_tail = std::span<const std::byte>(tail.data(), rest);
      }
      if (!detail::record_codec::all_zero(pad_in_out)) return corrupt(detail::record_error::trailing_bytes);
      if (hashing) {  // the checks of verify_disk_payload, with the hash taken during the reads
        if (!detail::record_codec::all_zero(pad_in_tail)) return corrupt(detail::record_error::trailing_bytes);
        if (hashed != std::min(payload, body)) return corrupt(detail::record_error::truncated);  // cannot happen
        (void)XXH3_64bits_update(&hs, out.data() + hashed, payload - hashed);
        if (XXH3_64bits_digest(&hs) != info->payload_checksum) return corrupt(detail::record_error::payload_checksum);
      } else if (const auto e = detail::verify_disk_payload(*info, out.first(payload), pad_in_tail);
                 e != detail::record_error::ok) {
        return corrupt(e);
      }
      return payload;
    }

#ifdef KVORTEX_HAS_LIBURING
    // Reads the header block, `out[0, body)` and `tail[0, rest)` of the file through a ring, and,
    // once the header has come in and decodes, hashes into `hs` each piece of the payload in
    // `out` as soon as it and every piece before it have arrived (`hashed`: how many bytes of
    // `out`), while later pieces are still in flight. The caller checks the header again and
    // finishes the hash. Bytes read (fewer at an early end of file) or -errno; nothing when no
    // ring can be had (the caller reads with preadv).
    std::optional<std::int64_t> read_through_ring(int fd, const chunk_key& k, std::uint64_t file_bytes,
                                                  std::span<std::byte, block> head, std::span<std::byte> out,
                                                  std::size_t body, std::byte* tail, std::size_t rest, XXH3_state_t& hs,
                                                  std::size_t& hashed) {
      int e = 0;
      auto r = rings->take(e);
      if (!r) return std::nullopt;
      const std::size_t seg = cfg.io_request_bytes;
      const std::size_t pieces = (body + seg - 1) / seg;
      if (!r->begin(fd, false, pieces + 2)) {
        rings->give(std::move(r));
        return std::nullopt;
      }
      (void)r->push(head.data(), head.size(), 0);  // request 0; piece i is request i + 1
      for (std::size_t off = 0; off < body; off += seg) (void)r->push(out.data() + off, std::min(seg, body - off), block + off);
      if (rest != 0) (void)r->push(tail, rest, block + body);
      (void)XXH3_64bits_reset(&hs);
      hashed = 0;
      std::size_t limit = 0;  // payload bytes in `out`, known once the header decodes
      bool header_seen = false;
      std::size_t next = 0;  // the first piece not hashed
      r->pump(false);
      for (;;) {
        if (!header_seen && r->finished(0)) {
          header_seen = true;
          if (const auto info = detail::decode_disk_header(head, file_bytes, expect(k)); info)
            limit = static_cast<std::size_t>(std::min<std::uint64_t>(info->payload_bytes, body));
          else
            next = pieces;  // nothing to hash: the caller finds the header bad
        }
        while (header_seen && next < pieces && r->finished(next + 1)) {
          const std::size_t from = next * seg, to = std::min({from + seg, body, limit});
          if (from < to) (void)XXH3_64bits_update(&hs, out.data() + from, to - from);
          hashed = std::max(hashed, to);
          ++next;
        }
        if (!r->busy()) break;
        r->pump(true);
      }
      const int err = r->error();
      const bool short_read = r->eof();
      rings->give(std::move(r));
      if (err != 0) return -static_cast<std::int64_t>(err);
      if (short_read) return std::int64_t{0};
      return static_cast<std::int64_t>(file_bytes);
    }
#endif

    // ---- contains, remove, stats ----------------------------------------------------------------

    std::size_t contains(std::span<const chunk_key> keys) {
      std::size_t i = 0;
      while (i < keys.size()) {
        {
          std::lock_guard lock(index_mu);
          while (i < keys.size() && index.contains(keys[i])) ++i;
        }
        if (i == keys.size() || cfg.sharing != directory_sharing::shared || !adopt(keys[i])) break;
        ++i;
      }
      return i;
    }

    void remove(const chunk_key& k) noexcept {
      const auto rel = detail::disk_paths::entry(k);
      std::lock_guard s(stripe(k));
      {
        std::lock_guard lock(index_mu);
        if (const auto it = index.find(k); it != index.end()) {
          held -= it->second.file_bytes;
          index.erase(it);
          lru.on_erase(k);
        }
      }
      ::unlinkat(dir_fd.get(), rel.data(), 0);
    }

    tier_stats snapshot() {
      tier_stats s;
      const auto get = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
      s.hits = get(hits);
      s.misses = get(misses);
      s.writes = get(writes);
      s.bytes_read = get(bytes_read);
      s.bytes_written = get(bytes_written);
      s.read_errors = get(read_errors);
      s.write_errors = get(write_errors);
      s.rejected_writes = get(rejected_writes);
      s.corrupt_removed = get(corrupt_removed);
      s.stale_removed = get(stale_removed);
      s.evictions = get(evictions);
      {
        std::lock_guard lock(index_mu);
        s.entries = index.size();
        s.bytes_held = held;
      }
      s.capacity_bytes = cfg.capacity_bytes;
      s.read_latency = read_latency.snapshot();
      s.write_latency = write_latency.snapshot();
      return s;
    }
  };

  explicit disk_tier(std::unique_ptr<state> s) noexcept : s_(std::move(s)) {}

  std::unique_ptr<state> s_;
};

static_assert(storage_tier<disk_tier>, "disk_tier does not satisfy kvortex::storage_tier");

}  // namespace kvortex

#endif
