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
#include <vector>

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

/// @brief One storage tier below memory, as the engine that owns it sees it (`engine_stats::tiers`).
struct tier_report {
  std::string name;                     ///< the tier's `name` ("disk", "redis")
  tier_stats tier;                      ///< the tier's own counters
  std::uint64_t lookup_hit_chunks{0};   ///< chunks lookups found in this tier beyond those in memory
  std::uint64_t promoted_chunks{0};     ///< chunks read from this tier into memory
  std::uint64_t promotion_failures{0};  ///< chunks this tier reported present but could not deliver
  std::uint64_t demoted_chunks{0};      ///< chunks written to this tier from memory
  std::uint64_t demotion_failures{0};   ///< demotions this tier refused or failed
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
  // Engines with storage tiers (`tiered_backend`); empty or zero otherwise.
  std::vector<tier_report> tiers;     ///< one per storage tier, highest first
  std::uint64_t demotions_queued{0};  ///< chunks queued to go down (each goes to every tier)
  std::uint64_t demotions_dropped{0}; ///< demotions dropped: queue full, reclaimed for memory, or shut down
  std::uint64_t demotion_queue_depth{0};  ///< gauge: demotions waiting or being written
  std::uint64_t demotion_queue_bytes{0};  ///< gauge: host bytes the queued demotions hold
  std::uint64_t promotion_timeouts{0};    ///< retrieves and prefetches that stopped at `promotion_timeout`
  std::uint64_t prefetches{0};        ///< prefetch() calls that ran
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

// One family per counter, one sample per tier, labelled tier="<name>".
inline void prom_tiers(std::string& out, std::string_view prefix, const std::vector<tier_report>& tiers) {
  struct family {
    const char* name;
    const char* type;
    const char* help;
    std::uint64_t (*get)(const tier_report&);
  };
  static constexpr family families[] = {
      {"tier_hits_total", "counter", "Tier reads that returned verified bytes.", [](const tier_report& t) { return t.tier.hits; }},
      {"tier_misses_total", "counter", "Tier reads that found nothing usable.", [](const tier_report& t) { return t.tier.misses; }},
      {"tier_writes_total", "counter", "Tier writes that stored their chunk.", [](const tier_report& t) { return t.tier.writes; }},
      {"tier_read_bytes_total", "counter", "Payload bytes read from the tier.", [](const tier_report& t) { return t.tier.bytes_read; }},
      {"tier_written_bytes_total", "counter", "Payload bytes written to the tier.",
       [](const tier_report& t) { return t.tier.bytes_written; }},
      {"tier_read_errors_total", "counter", "Tier reads failed by the medium.", [](const tier_report& t) { return t.tier.read_errors; }},
      {"tier_write_errors_total", "counter", "Tier writes failed by the medium.",
       [](const tier_report& t) { return t.tier.write_errors; }},
      {"tier_rejected_writes_total", "counter", "Tier writes refused before any I/O.",
       [](const tier_report& t) { return t.tier.rejected_writes; }},
      {"tier_corrupt_removed_total", "counter", "Corrupt, truncated or foreign entries removed.",
       [](const tier_report& t) { return t.tier.corrupt_removed; }},
      {"tier_evictions_total", "counter", "Tier entries evicted to make room.", [](const tier_report& t) { return t.tier.evictions; }},
      {"tier_entries", "gauge", "Entries the tier holds.", [](const tier_report& t) { return t.tier.entries; }},
      {"tier_bytes", "gauge", "Bytes the tier's entries take.", [](const tier_report& t) { return t.tier.bytes_held; }},
      {"tier_capacity_bytes", "gauge", "The tier's configured capacity (0: its own business).",
       [](const tier_report& t) { return t.tier.capacity_bytes; }},
      {"tier_lookup_hit_chunks_total", "counter", "Chunks lookups found in the tier beyond memory.",
       [](const tier_report& t) { return t.lookup_hit_chunks; }},
      {"tier_promoted_chunks_total", "counter", "Chunks read from the tier into memory.",
       [](const tier_report& t) { return t.promoted_chunks; }},
      {"tier_promotion_failures_total", "counter", "Chunks the tier listed but could not deliver.",
       [](const tier_report& t) { return t.promotion_failures; }},
      {"tier_demoted_chunks_total", "counter", "Chunks written to the tier from memory.",
       [](const tier_report& t) { return t.demoted_chunks; }},
      {"tier_demotion_failures_total", "counter", "Demotions the tier refused or failed.",
       [](const tier_report& t) { return t.demotion_failures; }},
  };
  for (const auto& f : families) {
    const std::string full = std::string(prefix) + "_" + f.name;
    out += "# HELP " + full + " " + f.help + "\n# TYPE " + full + " " + f.type + "\n";
    for (const auto& t : tiers) out += full + "{tier=\"" + t.name + "\"} " + std::to_string(f.get(t)) + "\n";
  }
  const auto hist = [&](const char* name, const char* help, latency_histogram tier_stats::*h) {
    const std::string full = std::string(prefix) + "_" + name;
    out += "# HELP " + full + " " + help + "\n# TYPE " + full + " histogram\n";
    for (const auto& t : tiers) {
      const latency_histogram& lh = t.tier.*h;
      const std::string lbl = "tier=\"" + t.name + "\"";
      std::uint64_t cumulative = 0;
      for (std::size_t i = 0; i < latency_histogram::buckets; ++i) {
        cumulative += lh.counts[i];
        out += full + "_bucket{" + lbl + ",le=\"" + seconds_text(latency_histogram::upper_microseconds(i)) + "\"} " +
               std::to_string(cumulative) + "\n";
      }
      cumulative += lh.counts[latency_histogram::buckets];
      out += full + "_bucket{" + lbl + ",le=\"+Inf\"} " + std::to_string(cumulative) + "\n";
      char sum[64];
      std::snprintf(sum, sizeof sum, "%.9g", lh.sum_seconds);
      out += full + "_sum{" + lbl + "} " + sum + "\n";
      out += full + "_count{" + lbl + "} " + std::to_string(cumulative) + "\n";
    }
  };
  hist("tier_read_seconds", "Tier read latency.", &tier_stats::read_latency);
  hist("tier_write_seconds", "Tier write latency.", &tier_stats::write_latency);
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
  if (!s.tiers.empty()) {
    prom_metric(out, prefix, "demotions_queued_total", "counter", "Chunks queued to go to the tiers below.", s.demotions_queued);
    prom_metric(out, prefix, "demotions_dropped_total", "counter", "Demotions dropped (queue full, memory reclaimed, shut down).",
                s.demotions_dropped);
    prom_metric(out, prefix, "demotion_queue_depth", "gauge", "Demotions waiting or being written.", s.demotion_queue_depth);
    prom_metric(out, prefix, "demotion_queue_bytes", "gauge", "Host bytes held by queued demotions.", s.demotion_queue_bytes);
    prom_metric(out, prefix, "promotion_timeouts_total", "counter", "Retrieves and prefetches cut off by the promotion timeout.",
                s.promotion_timeouts);
    prom_metric(out, prefix, "prefetches_total", "counter", "prefetch() calls run.", s.prefetches);
    prom_tiers(out, prefix, s.tiers);
  }
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
