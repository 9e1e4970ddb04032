#pragma once
/// @file disk_tier_config.hpp
/// @brief How a `disk_tier` is set up: its directory, capacity, durability, I/O and sharing
/// choices. Standard library only (no xxHash, no POSIX headers), so configuration code can use it
/// without the tier itself.

#include <cstdint>
#include <string>
#include <string_view>

#include "kvortex/detail/chunk_record_format.hpp"
#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief When a disk write is forced to stable storage before `put` returns. A process crash
/// (SIGKILL included) loses no acknowledged chunk under any policy, since the kernel keeps what
/// was written; the policies differ on power loss or a kernel crash.
enum class fsync_policy : std::uint8_t {
  never,               ///< no fsync: after power loss recent chunks may be missing (never wrong: checksums)
  data,                ///< fdatasync the file before it is renamed into place: its bytes are durable,
                       ///< its directory entry may still be lost with power
  data_and_directory,  ///< also fsync the directory after the rename: an acknowledged chunk survives power loss
};

/// @brief Whether chunk files are read and written with O_DIRECT (bypassing the page cache).
enum class direct_io_mode : std::uint8_t {
  automatic,  ///< O_DIRECT if a probe write in the directory succeeds, else buffered
  on,         ///< O_DIRECT or `open` fails with errc::unsupported
  off,        ///< buffered I/O through the page cache
};

/// @brief Which system interface moves a chunk file's bytes.
enum class disk_io_engine : std::uint8_t {
  /// io_uring when the build has liburing (KVORTEX_HAS_LIBURING) and the kernel lets `open` set
  /// up a ring (seccomp or `kernel.io_uring_disabled` may refuse it), else `posix`.
  automatic,
  /// io_uring, or `open` fails with errc::unsupported.
  io_uring,
  /// `pwritev`/`preadv` from the calling thread, one request at a time.
  posix,
};

/// @brief Stable lower-case name, e.g. "io_uring".
[[nodiscard]] constexpr std::string_view to_string(disk_io_engine e) noexcept {
  switch (e) {
    case disk_io_engine::automatic: return "automatic";
    case disk_io_engine::io_uring: return "io_uring";
    case disk_io_engine::posix: return "posix";
  }
  return "unknown";
}

/// @brief How several tiers (processes) may use one directory.
enum class directory_sharing : std::uint8_t {
  /// One tier per directory: `open` takes an exclusive flock on `<directory>/.lock` and fails
  /// while another tier, in any process, holds it. The tier removes leftovers freely.
  exclusive,
  /// Any number of shared tiers per directory (never together with an exclusive one). Each keeps
  /// its own index and capacity view; a key missing from its index is looked up on disk (one
  /// stat), so chunks another process wrote are found. Renames make every file whole, so a reader
  /// sees an old or a new chunk, never a mix; one process's eviction or removal can delete a
  /// chunk another just wrote (a later miss there, never wrong bytes). Temporary files are
  /// removed on open only when older than `stale_temp_seconds`.
  shared,
};

/// @brief How a `disk_tier` is set up. `validate()` is called by `disk_tier::open`.
struct disk_tier_config {
  std::string directory;              ///< root of the chunk files; created (with parents) if missing
  std::uint64_t capacity_bytes{0};    ///< limit on the bytes of the chunk files (headers, padding included)
  namespace_digest ns{};              ///< written into every file; files of another namespace are misses
  fsync_policy fsync{fsync_policy::never};
  direct_io_mode direct_io{direct_io_mode::automatic};
  directory_sharing sharing{directory_sharing::exclusive};
  /// Read and check every file's header while rebuilding the index on open (foreign, truncated
  /// and mislabelled files are then removed at once rather than at their first `get`). Costs one
  /// small read per file.
  bool verify_on_open{false};
  /// Exclusive mode: on close, write `<directory>/.index` (every entry's key, size and inode, in
  /// eviction order); on open, take the size and LRU place of every file whose inode is unchanged
  /// from it instead of a stat each (the snapshot is removed once read, so a crash leaves none).
  /// Files replaced or added since are stat'ed as without it; a damaged snapshot is ignored. A
  /// file changed in place outside the tier (truncated, overwritten) keeps its inode, so it is
  /// found at its first `get`, like any corrupt file, not on open (`verify_on_open` finds it on
  /// open either way).
  bool index_snapshot{true};
  std::uint64_t max_chunk_bytes{std::uint64_t{1} << 32};  ///< larger payloads are refused
  std::uint32_t stale_temp_seconds{3600};  ///< shared mode: age after which a temporary file is a leftover
  /// Interface for the chunk files' bytes; `disk_tier::io_engine()` tells which one `open` chose.
  disk_io_engine io_engine{disk_io_engine::automatic};
  /// io_uring: a chunk's bytes are split into requests of at most this many bytes (a multiple of
  /// 4096, in [4096, 64 MiB]), so one `put` or `get` keeps several in flight.
  std::uint32_t io_request_bytes{1u << 20};
  /// io_uring: the most requests one `put` or `get` keeps in flight, in [1, 64].
  std::uint32_t io_queue_depth{4};

  /// @brief Checks every field; the error names the first bad one.
  [[nodiscard]] result<void> validate() const {
    if (directory.empty()) return fail(errc::invalid_config, "disk_tier_config.directory is empty");
    if (capacity_bytes < 2 * detail::chunk_record_block)
      return fail(errc::invalid_config, "disk_tier_config.capacity_bytes (" + std::to_string(capacity_bytes) +
                                            ") is below one minimal chunk file (" +
                                            std::to_string(2 * detail::chunk_record_block) + " bytes)");
    if (max_chunk_bytes == 0 || max_chunk_bytes > (std::uint64_t{1} << 40))
      return fail(errc::invalid_config, "disk_tier_config.max_chunk_bytes must be in [1, 2^40], got " +
                                            std::to_string(max_chunk_bytes));
    if (fsync != fsync_policy::never && fsync != fsync_policy::data && fsync != fsync_policy::data_and_directory)
      return fail(errc::invalid_config, "disk_tier_config.fsync is not a fsync_policy value");
    if (direct_io != direct_io_mode::automatic && direct_io != direct_io_mode::on && direct_io != direct_io_mode::off)
      return fail(errc::invalid_config, "disk_tier_config.direct_io is not a direct_io_mode value");
    if (sharing != directory_sharing::exclusive && sharing != directory_sharing::shared)
      return fail(errc::invalid_config, "disk_tier_config.sharing is not a directory_sharing value");
    if (io_engine != disk_io_engine::automatic && io_engine != disk_io_engine::io_uring &&
        io_engine != disk_io_engine::posix)
      return fail(errc::invalid_config, "disk_tier_config.io_engine is not a disk_io_engine value");
    if (io_request_bytes < detail::chunk_record_block || io_request_bytes > (64u << 20) ||
        io_request_bytes % detail::chunk_record_block != 0)
      return fail(errc::invalid_config, "disk_tier_config.io_request_bytes must be a multiple of " +
                                            std::to_string(detail::chunk_record_block) + " in [" +
                                            std::to_string(detail::chunk_record_block) + ", 67108864], got " +
                                            std::to_string(io_request_bytes));
    if (io_queue_depth == 0 || io_queue_depth > 64)
      return fail(errc::invalid_config, "disk_tier_config.io_queue_depth must be in [1, 64], got " +
                                            std::to_string(io_queue_depth));
    return {};
  }
};

}  // namespace kvortex
