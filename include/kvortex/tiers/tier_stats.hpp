#pragma once
/// @file tier_stats.hpp
/// @brief Counters of a storage tier below host memory (disk, Redis), as `stats()` snapshots them.

#include <cstdint>

#include "kvortex/stats.hpp"

namespace kvortex {

/// @brief A snapshot of one storage tier's counters. Counters only grow; gauges are "now".
struct tier_stats {
  std::uint64_t hits{0};              ///< get() calls that returned verified bytes
  std::uint64_t misses{0};            ///< get() calls that found nothing usable (absent, corrupt, foreign)
  std::uint64_t writes{0};            ///< put() calls that stored their chunk
  std::uint64_t bytes_read{0};        ///< payload bytes returned by get()
  std::uint64_t bytes_written{0};     ///< payload bytes stored by put()
  std::uint64_t read_errors{0};       ///< get() calls failed by the medium (I/O error, connection lost)
  std::uint64_t write_errors{0};      ///< put() calls failed by the medium (disk full, unwritable, timeout)
  std::uint64_t rejected_writes{0};   ///< put() calls refused before any I/O (too large for the capacity)
  std::uint64_t corrupt_removed{0};   ///< entries found truncated, corrupt or foreign, and removed
  std::uint64_t stale_removed{0};     ///< half-written leftovers (temporary files) removed
  std::uint64_t evictions{0};         ///< entries removed to make room
  std::uint64_t entries{0};           ///< gauge: entries held
  std::uint64_t bytes_held{0};        ///< gauge: bytes the entries take, headers and padding included
  std::uint64_t capacity_bytes{0};    ///< gauge: the configured limit on bytes_held
  latency_histogram read_latency;     ///< get(): call to return, hits and misses
  latency_histogram write_latency;    ///< put(): call to return (durable per the tier's policy)

  /// @brief Every failure of the medium, reads and writes.
  [[nodiscard]] constexpr std::uint64_t errors() const noexcept { return read_errors + write_errors; }
};

}  // namespace kvortex
