#pragma once
/// @file stats.hpp
/// @brief Engine counters, latency histograms and their Prometheus text rendering.

#include <array>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "kvortex/error.hpp"

namespace kvortex {

/// @brief Latency histogram with power-of-two microsecond buckets: bucket i < `buckets` counts
/// operations that took more than 2^(i-1) us and at most 2^i us (bucket 0: at most 1 us), so the
/// last finite bound is 2^23 us = 8.388608 s; `counts[buckets]` counts slower ones (+Inf).
/// In a snapshot `count` always equals the sum of `counts`.
struct latency_histogram {
  static constexpr std::size_t buckets = 24;  // 1 us .. 8.388608 s, then +Inf
  std::array<std::uint64_t, buckets + 1> counts{};
  std::uint64_t count{0};
  double sum_seconds{0};

  /// @brief Upper bound of bucket i in microseconds (exact).
  [[nodiscard]] static constexpr std::uint64_t upper_microseconds(std::size_t i) noexcept { return std::uint64_t{1} << i; }
  /// @brief Upper bound of bucket i in seconds.
  [[nodiscard]] static constexpr double upper_seconds(std::size_t i) noexcept {
    return static_cast<double>(upper_microseconds(i)) * 1e-6;
  }
};

/// @brief A snapshot of an engine's counters. Chunks are counted once each.
struct engine_stats {
  std::uint64_t lookups{0};           ///< lookup() calls
  std::uint64_t hit_chunks{0};        ///< chunks found by lookup, retrieve and load_blocks
  std::uint64_t miss_chunks{0};       ///< chunks lookup and retrieve asked for and did not find
  std::uint64_t hit_tokens{0};        ///< tokens found by lookup()
  std::uint64_t queried_tokens{0};    ///< tokens asked about by lookup()
  std::uint64_t stored_chunks{0};     ///< chunks written
  std::uint64_t deduplicated_chunks{0};  ///< stores skipped because the chunk was present or in flight
  std::uint64_t rejected_chunks{0};   ///< stores dropped: nothing evictable, or the key was held in use with another size
  std::uint64_t replaced_chunks{0};   ///< entries of another size overwritten by a store or save_blocks
  std::uint64_t retrieved_chunks{0};  ///< chunks copied back out
  std::uint64_t evictions{0};         ///< chunks evicted to make room
  std::uint64_t bytes_stored{0};      ///< bytes written into the store
  std::uint64_t bytes_loaded{0};      ///< bytes copied back out
  std::uint64_t transfer_failures{0}; ///< transfers holding chunks that ended in error: a failed copy or commit, a layered transfer dropped or finished with layers missing
  std::uint64_t current_bytes{0};     ///< bytes held now, reserved chunks included
  std::uint64_t peak_bytes{0};        ///< most bytes ever held
  std::uint64_t capacity_bytes{0};    ///< the configured hard limit
  std::uint64_t chunks{0};            ///< chunks held now
  latency_histogram lookup_latency;   ///< lookup() wall time
  latency_histogram store_latency;    ///< store(), save_blocks() and layered stores (also dropped ones): call to completion
  latency_histogram retrieve_latency; ///< retrieve() and layered retrieves: call to completion (not load_blocks)
};

namespace detail {

/// Lock-free histogram the engine records into; `snapshot` copies it out.
struct atomic_histogram {
  std::array<std::atomic<std::uint64_t>, latency_histogram::buckets + 1> counts{};
  std::atomic<std::uint64_t> sum_ns{0};

  void record(std::uint64_t ns) noexcept {
    const std::uint64_t us = (ns + 999) / 1000;
    const std::size_t b = us <= 1 ? 0 : static_cast<std::size_t>(std::bit_width(us - 1));
    counts[b < latency_histogram::buckets ? b : latency_histogram::buckets].fetch_add(1, std::memory_order_relaxed);
    sum_ns.fetch_add(ns, std::memory_order_relaxed);
  }
  // The count is the sum of the buckets read, so +Inf always equals _count, whatever records
  // run meanwhile (a separate counter read at another instant would not).
  [[nodiscard]] latency_histogram snapshot() const noexcept {
    latency_histogram h;
    for (std::size_t i = 0; i < counts.size(); ++i) {
      h.counts[i] = counts[i].load(std::memory_order_relaxed);
      h.count += h.counts[i];
    }
    h.sum_seconds = static_cast<double>(sum_ns.load(std::memory_order_relaxed)) * 1e-9;
    return h;
  }
};

/// Exact decimal seconds of a whole number of microseconds: "4.194304", "0.000001", "1".
inline std::string seconds_text(std::uint64_t us) {
  std::string s = std::to_string(us / 1000000);
  std::uint64_t frac = us % 1000000;
  if (frac == 0) return s;
  char digits[8];
  std::snprintf(digits, sizeof digits, "%06llu", static_cast<unsigned long long>(frac));
  std::string f(digits);
  while (!f.empty() && f.back() == '0') f.pop_back();
  return s + "." + f;
}

/// A Prometheus metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
[[nodiscard]] constexpr bool valid_metric_name(std::string_view n) noexcept {
  if (n.empty()) return false;
  for (std::size_t i = 0; i < n.size(); ++i) {
    const char c = n[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!alpha && (i == 0 || c < '0' || c > '9')) return false;
  }
  return true;
}

inline void prom_metric(std::string& out, std::string_view prefix, std::string_view name, std::string_view type,
                        std::string_view help, std::uint64_t value) {
  const std::string full = std::string(prefix) + "_" + std::string(name);
  out += "# HELP " + full + " " + std::string(help) + "\n# TYPE " + full + " " + std::string(type) + "\n";
  out += full + " " + std::to_string(value) + "\n";
}

inline void prom_histogram(std::string& out, std::string_view prefix, std::string_view name,
                           std::string_view help, const latency_histogram& h) {
  const std::string full = std::string(prefix) + "_" + std::string(name);
  out += "# HELP " + full + " " + std::string(help) + "\n# TYPE " + full + " histogram\n";
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < latency_histogram::buckets; ++i) {
    cumulative += h.counts[i];
    out += full + "_bucket{le=\"" + seconds_text(latency_histogram::upper_microseconds(i)) + "\"} " +
           std::to_string(cumulative) + "\n";
  }
  cumulative += h.counts[latency_histogram::buckets];
  out += full + "_bucket{le=\"+Inf\"} " + std::to_string(cumulative) + "\n";
  char sum[64];
  std::snprintf(sum, sizeof sum, "%.9g", h.sum_seconds);
  out += full + "_sum " + sum + "\n";
  out += full + "_count " + std::to_string(cumulative) + "\n";  // equal to +Inf by construction
}

inline std::string render_prometheus(const engine_stats& s, std::string_view prefix) {
  std::string out;
  using detail::prom_metric;
  prom_metric(out, prefix, "lookups_total", "counter", "lookup() calls.", s.lookups);
  prom_metric(out, prefix, "hit_chunks_total", "counter", "Chunks found.", s.hit_chunks);
  prom_metric(out, prefix, "miss_chunks_total", "counter", "Chunks asked for and not found.", s.miss_chunks);
  prom_metric(out, prefix, "hit_tokens_total", "counter", "Tokens found by lookup().", s.hit_tokens);
  prom_metric(out, prefix, "queried_tokens_total", "counter", "Tokens asked about by lookup().", s.queried_tokens);
  prom_metric(out, prefix, "stored_chunks_total", "counter", "Chunks written.", s.stored_chunks);
  prom_metric(out, prefix, "deduplicated_chunks_total", "counter", "Stores skipped: chunk already present.",
              s.deduplicated_chunks);
  prom_metric(out, prefix, "rejected_chunks_total", "counter", "Stores dropped: nothing evictable or key in use.",
              s.rejected_chunks);
  prom_metric(out, prefix, "replaced_chunks_total", "counter", "Entries of another size overwritten.",
              s.replaced_chunks);
  prom_metric(out, prefix, "retrieved_chunks_total", "counter", "Chunks copied back out.", s.retrieved_chunks);
  prom_metric(out, prefix, "evictions_total", "counter", "Chunks evicted to make room.", s.evictions);
  prom_metric(out, prefix, "stored_bytes_total", "counter", "Bytes written into the store.", s.bytes_stored);
  prom_metric(out, prefix, "loaded_bytes_total", "counter", "Bytes copied back out.", s.bytes_loaded);
  prom_metric(out, prefix, "transfer_failures_total", "counter", "Transfers that ended in error.", s.transfer_failures);
  prom_metric(out, prefix, "bytes", "gauge", "Bytes held now.", s.current_bytes);
  prom_metric(out, prefix, "peak_bytes", "gauge", "Most bytes ever held.", s.peak_bytes);
  prom_metric(out, prefix, "capacity_bytes", "gauge", "Configured capacity.", s.capacity_bytes);
  prom_metric(out, prefix, "chunks", "gauge", "Chunks held now.", s.chunks);
  detail::prom_histogram(out, prefix, "lookup_seconds", "lookup() latency.", s.lookup_latency);
  detail::prom_histogram(out, prefix, "store_seconds", "store() latency to completion.", s.store_latency);
  detail::prom_histogram(out, prefix, "retrieve_seconds", "retrieve() latency to completion.", s.retrieve_latency);
  return out;
}
}  // namespace detail

/// @brief Renders a snapshot in the Prometheus text exposition format (version 0.0.4), every
/// metric named `kvortex_*` (e.g. `kvortex_hit_tokens_total`).
[[nodiscard]] inline std::string to_prometheus(const engine_stats& s) { return detail::render_prometheus(s, "kvortex"); }

/// @brief As above with another metric name prefix, e.g. "llm_kv" gives `llm_kv_hit_tokens_total`.
/// Fails with `errc::invalid_argument` when `prefix` is not a valid Prometheus metric name
/// (`[a-zA-Z_:][a-zA-Z0-9_:]*`), since the text would not parse.
[[nodiscard]] inline result<std::string> to_prometheus(const engine_stats& s, std::string_view prefix) {
  if (!detail::valid_metric_name(prefix))
    return fail(errc::invalid_argument, "to_prometheus: prefix \"" + std::string(prefix) +
                                            "\" is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)");
  return detail::render_prometheus(s, prefix);
}

}  // namespace kvortex
