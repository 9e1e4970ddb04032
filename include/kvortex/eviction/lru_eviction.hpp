#pragma once
/// @file lru_eviction.hpp
/// @brief Least-recently-used eviction.

#include <cstddef>
#include <optional>
#include <unordered_map>
#include <utility>

#include "kvortex/concepts/eviction_policy.hpp"
#include "kvortex/detail/intrusive_list.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Evicts the least recently stored or accessed chunk first.
///
/// Every operation is O(1); `select_victim` walks from the least recently used end and costs one
/// step per non-evictable key it passes, which keep their place. One allocation per tracked key
/// (the map node holds the list links). Not thread-safe, as the `eviction_policy` concept allows.
class lru_eviction {
 public:
  lru_eviction() = default;
  lru_eviction(const lru_eviction&) = delete;
  lru_eviction& operator=(const lru_eviction&) = delete;
  lru_eviction(lru_eviction&&) noexcept = default;
  lru_eviction& operator=(lru_eviction&&) noexcept = default;
  ~lru_eviction() = default;

  /// @brief Tracks `k` as the most recently used key (an already tracked key is just touched).
  void on_insert(const chunk_key& k) {
    auto [it, inserted] = nodes_.try_emplace(k);
    if (inserted) {
      it->second.key = &it->first;
      order_.push_front(it->second);
    } else {
      order_.move_to_front(it->second);
    }
  }

  /// @brief Makes `k` the most recently used key; ignores untracked keys.
  void on_access(const chunk_key& k) noexcept {
    if (auto it = nodes_.find(k); it != nodes_.end()) order_.move_to_front(it->second);
  }

  /// @brief Untracks `k`; ignores untracked keys.
  void on_erase(const chunk_key& k) noexcept {
    if (auto it = nodes_.find(k); it != nodes_.end()) {
      order_.erase(it->second);
      nodes_.erase(it);
    }
  }

  /// @brief The least recently used key for which `pred` holds, or nothing. Does not untrack it.
  /// @tparam Pred callable as `bool(const chunk_key&)`
  template <class Pred>
  [[nodiscard]] std::optional<chunk_key> select_victim(Pred&& pred) {
    for (node* n = order_.back(); n != nullptr; n = order_.newer(*n)) {
      if (pred(*n->key)) return *n->key;
    }
    return std::nullopt;
  }

  [[nodiscard]] std::size_t size() const noexcept { return nodes_.size(); }
  [[nodiscard]] bool contains(const chunk_key& k) const noexcept { return nodes_.contains(k); }

 private:
  struct node : detail::list_hook {
    const chunk_key* key{nullptr};
  };

  // Map nodes never move, so the list can link them and point back at their keys.
  std::unordered_map<chunk_key, node, chunk_key_hash> nodes_;
  detail::intrusive_list<node> order_;
};

static_assert(eviction_policy<lru_eviction>, "lru_eviction does not satisfy kvortex::eviction_policy");

}  // namespace kvortex
