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
/// Required expressions, for `E& e`, `const chunk_key& k`, and a predicate
/// `pred(const chunk_key&) -> bool`:
/// - `e.on_insert(k)`: `k` was stored; it is not tracked yet.
/// - `e.on_access(k)`: `k` was hit by a lookup or a load; it is tracked.
/// - `e.on_erase(k)`: `k` left the store (evicted or dropped); it is tracked.
/// - `e.select_victim(pred) -> std::optional<chunk_key>`: the tracked key to evict next among those
///   for which `pred` is true (it is false for chunks an in-flight transfer uses), or nothing. It
///   does not untrack the key: the engine calls `on_erase` once the chunk is gone. It may reorder
///   internal queues while it searches.
/// - `e.size() -> std::size_t`: tracked keys.
///
/// Semantics: not thread-safe; the engine calls it under its index lock. Every operation should
/// be O(1) amortized, `select_victim` O(1) amortized when few keys are pinned. Construction as for
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
