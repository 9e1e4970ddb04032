#pragma once
/// @file eviction_policy.hpp
/// @brief The `eviction_policy` concept: which stored chunk goes when room is needed.

#include <concepts>
#include <cstddef>
#include <optional>

#include "kvortex/types.hpp"

namespace kvortex {

namespace detail {
/// Stands for the engine's "may this key be evicted now?" predicate in the concept check.
struct evictable_archetype {
  bool operator()(const chunk_key&) const noexcept { return true; }
};
}  // namespace detail

/// @brief Orders the stored chunks for eviction.
///
/// The engine tracks in the policy exactly the chunks that are stored and readable; a chunk being
/// written (reserved by a store, not yet finished) is not tracked.
///
/// Required expressions, for `E& e`, `const chunk_key& k`, and a predicate
/// `pred(const chunk_key&) -> bool`:
/// - `e.on_insert(k)`: `k` became readable: a store or `save_blocks` finished writing it. A
///   store's chunks arrive in chunk order, once all of its copies completed. `k` was not tracked.
/// - `e.on_access(k)`: `k` was used, and is tracked. Called when `retrieve`/`begin_retrieve` pins
///   a hit chunk (in chunk order, at the call, not when the copy ends), when `load_blocks` reads
///   it, and when a store or `save_blocks` finds it already stored with the same size (the store
///   skips it). Not called by `lookup` or `check_blocks`: looking does not count as use.
/// - `e.on_erase(k)`: `k` is no longer stored: evicted (after `select_victim` named it), or
///   replaced by a write of another size. Called for tracked keys only; never at shutdown.
/// - `e.select_victim(pred) -> std::optional<chunk_key>`: the tracked key to evict next among those
///   for which `pred` is true, or nothing. `pred` is false for chunks that are pinned: read by a
///   retrieve or `load_blocks` still in flight (or an open layered retrieve), or part of the prefix
///   the current store found already present (so making room for a prompt's tail never evicts its
///   own head). It does not untrack the key: the engine calls `on_erase` once the chunk is gone,
///   and may call `select_victim` again right away if more room is needed. It may reorder
///   internal queues while it searches. A key it returns that is not tracked, or for which `pred`
///   is false, ends the eviction (the engine reports `errc::capacity_exhausted`), nothing else.
/// - `e.size() -> std::size_t`: tracked keys.
///
/// Semantics: not thread-safe; the engine calls every member under its exclusive index lock, so
/// members must not call back into the engine, and should not block. Every operation should be
/// O(1) amortized, `select_victim` O(1) amortized when few keys are pinned. Construction as for
/// `allocator`.
template <class E>
concept eviction_policy =
    std::move_constructible<E> && requires(E& e, const chunk_key& k, detail::evictable_archetype pred) {
      e.on_insert(k);
      e.on_access(k);
      e.on_erase(k);
      { e.select_victim(pred) } -> std::same_as<std::optional<chunk_key>>;
      { e.size() } -> std::convertible_to<std::size_t>;
    };

}  // namespace kvortex
