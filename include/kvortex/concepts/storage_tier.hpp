#pragma once
/// @file storage_tier.hpp
/// @brief The `storage_tier` concept: a store below host memory (local disk, Redis) that chunks
/// are demoted to and promoted from.

#include <concepts>
#include <cstddef>
#include <span>
#include <string_view>

#include "kvortex/error.hpp"
#include "kvortex/tiers/tier_stats.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Keeps chunk bytes outside host memory, with its own index, capacity, eviction and
/// persistence. The memory tier (`backend`) stays what transfers read and write; a storage tier
/// only copies whole chunks between its medium and host buffers. In a `tiered_backend`:
/// - `put` is called by the engine's tier threads (demotions), never by a store, so its latency
///   never sits on a store; each demoted chunk is put to every tier;
/// - `contains` is called by `lookup` (in the caller's thread, once per tier per lookup) and at
///   the start of a promotion;
/// - `get` (or `get_many` when the tier has one: `t.get_many(keys, outs) ->
///   std::vector<result<std::size_t>>`, one pipelined batch) by `retrieve` in the caller's thread
///   and by `prefetch` on a tier thread, into host memory the engine reserved for the chunk;
/// - `remove` never by the engine (callers reach it through `get_backend().tier<I>()`);
/// - `stats` by `engine.stats()`.
/// None of them is called under the engine's index lock.
///
/// Required, for `T& t`, `const T& ct`, `const chunk_key& k`, `std::span<const std::byte> in`,
/// `std::span<std::byte> out`, `std::span<const chunk_key> keys`:
/// - `T::name`: a `std::string_view` naming the tier in stats and logs ("disk", "redis").
/// - `t.put(k, in) -> result<void>`: stores `in` as chunk `k`, replacing a chunk stored under `k`.
///   When it returns success the chunk is durable as far as the tier's policy promises (e.g. the
///   disk tier's fsync policy) and later `get`s, in this or (for persistent tiers) a later
///   process, return exactly `in`. It may evict other chunks to make room. Failures: the tier is
///   full of nothing it may evict or `in` exceeds its capacity (`errc::capacity_exhausted`), the
///   medium failed (`errc::backend_failure`: disk full, unwritable, connection lost; counted in
///   `write_errors`), bad arguments (`errc::invalid_argument`). A failed put leaves the previous
///   state of `k` or none, never a partial chunk, and the tier keeps serving.
/// - `t.get(k, out) -> result<std::size_t>`: copies chunk `k` into `out[0, n)` and returns `n`,
///   after verifying the bytes (checksum, namespace, key, size). Absent, corrupt, truncated or
///   foreign entries are `errc::not_found` (a corrupt one is also removed and counted): a tier
///   never returns wrong bytes. `out` smaller than the chunk: `errc::size_mismatch`. A medium
///   failure: `errc::backend_failure`. On failure `out`'s contents are unspecified.
/// - `t.contains(keys) -> std::size_t`: how many leading `keys` are present (stops at the first
///   absent one), in one batched probe (one lock, one round trip). A key reported present may
///   still be a miss for `get` (evicted meanwhile, found corrupt when read): callers end a hit at
///   the first chunk `get` cannot deliver.
/// - `t.remove(k)`: drops chunk `k` if present. `noexcept`.
/// - `ct.stats() -> tier_stats`: a snapshot of the counters.
///
/// Semantics: every operation is safe to call from several threads at once, also for the same
/// key (the last completed `put` of a key wins; a concurrent `get` returns either version, whole).
/// The tier owns its medium's resources (files, locks, connections) and releases them when
/// destroyed; the buffers passed in are only borrowed for the call. Tiers are created by a
/// fallible factory (e.g. `disk_tier::open(cfg) -> result<disk_tier>`) and must be
/// move-constructible so the engine can own them.
template <class T>
concept storage_tier =
    std::move_constructible<T> &&
    requires(T& t, const T& ct, const chunk_key& k, std::span<const std::byte> in, std::span<std::byte> out,
             std::span<const chunk_key> keys) {
      { T::name } -> std::convertible_to<std::string_view>;
      { t.put(k, in) } -> std::same_as<result<void>>;
      { t.get(k, out) } -> std::same_as<result<std::size_t>>;
      { t.contains(keys) } -> std::same_as<std::size_t>;
      { t.remove(k) } noexcept;
      { ct.stats() } -> std::same_as<tier_stats>;
    };

}  // namespace kvortex
