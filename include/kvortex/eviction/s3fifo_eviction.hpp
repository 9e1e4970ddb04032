#pragma once
/// @file s3fifo_eviction.hpp
/// @brief S3-FIFO eviction (Yang et al., "FIFO queues are all you need for cache eviction", SOSP'23).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <unordered_map>
#include <utility>

#include "kvortex/concepts/eviction_policy.hpp"
#include "kvortex/detail/intrusive_list.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Scan-resistant eviction with three FIFO queues: a small queue S for new keys, a main
/// queue M for keys that proved useful, and a ghost queue G remembering keys recently evicted
/// from S.
///
/// - A new key enters S, or M directly when G remembers it.
/// - A hit raises the key's frequency counter, saturating at 3; nothing moves.
/// - Eviction takes from S while S holds at least 10% of the tracked keys, else from M. The tail
///   of S moves to M when its counter exceeds 1, otherwise it is the victim (and enters G once
///   the engine erases it). The tail of M with a non-zero counter is decremented and reinserted at
///   M's head; with zero it is the victim.
///
/// So a one-time scan of many keys passes through S and leaves the keys in M alone.
/// The paper sizes G like M; the policy does not know the cache's capacity in keys, so G is
/// bounded by 90% of the largest number of keys tracked so far.
///
/// `select_victim` does not untrack its answer; keys rejected by the predicate are rotated to the
/// head of their queue without touching their counter. It takes at most 11 steps per tracked key
/// (one per S key and max_freq + 2 laps of M, twice) and returns nothing only when every tracked
/// key is rejected; with few rejected keys it is O(1) amortized.
/// Not thread-safe, as the `eviction_policy` concept allows.
class s3fifo_eviction {
 public:
  /// @brief Counter ceiling (the paper uses two bits).
  static constexpr std::uint8_t max_freq = 3;
  /// @brief S's share of the tracked keys, in percent.
  static constexpr std::size_t small_percent = 10;

  s3fifo_eviction() = default;
  s3fifo_eviction(const s3fifo_eviction&) = delete;
  s3fifo_eviction& operator=(const s3fifo_eviction&) = delete;
  s3fifo_eviction(s3fifo_eviction&&) noexcept = default;
  s3fifo_eviction& operator=(s3fifo_eviction&&) noexcept = default;
  ~s3fifo_eviction() = default;

  /// @brief Tracks `k`: in M if the ghost queue remembers it, else in S. A tracked key is accessed.
  void on_insert(const chunk_key& k) {
    auto [it, inserted] = entries_.try_emplace(k);
    entry& e = it->second;
    if (!inserted) {
      bump(e);
      return;
    }
    e.key = &it->first;
    if (auto g = ghosts_.find(k); g != ghosts_.end()) {
      ghost_order_.erase(g->second);
      ghosts_.erase(g);
      e.in_main = true;
      main_.push_front(e);
    } else {
      small_.push_front(e);
    }
    peak_ = std::max(peak_, entries_.size());
  }

  /// @brief Counts a hit on `k`; ignores untracked keys.
  void on_access(const chunk_key& k) noexcept {
    if (auto it = entries_.find(k); it != entries_.end()) bump(it->second);
  }

  /// @brief Untracks `k`; a key leaving S is remembered in the ghost queue. Ignores untracked keys.
  void on_erase(const chunk_key& k) {
    auto it = entries_.find(k);
    if (it == entries_.end()) return;
    const bool from_small = !it->second.in_main;
    (from_small ? small_ : main_).erase(it->second);
    entries_.erase(it);
    if (from_small) remember(k);
  }

  /// @brief The next key to evict among those for which `pred` holds, or nothing. May promote
  /// keys from S to M and age keys in M on the way; does not untrack the answer.
  /// @tparam Pred callable as `bool(const chunk_key&)`
  template <class Pred>
  [[nodiscard]] std::optional<chunk_key> select_victim(Pred&& pred) {
    const bool small_first =
        !small_.empty() && (small_.size() * 100 >= entries_.size() * small_percent || main_.empty());
    if (small_first) {
      if (auto v = scan_small(pred)) return v;
      return scan_main(pred);
    }
    if (auto v = scan_main(pred)) return v;
    if (auto v = scan_small(pred)) return v;
    // Keys promoted by scan_small arrived after scan_main gave up.
    return scan_main(pred);
  }

  [[nodiscard]] std::size_t size() const noexcept { return entries_.size(); }
  [[nodiscard]] bool contains(const chunk_key& k) const noexcept { return entries_.contains(k); }
  /// @brief Keys in the small queue S.
  [[nodiscard]] std::size_t small_size() const noexcept { return small_.size(); }
  /// @brief Keys in the main queue M.
  [[nodiscard]] std::size_t main_size() const noexcept { return main_.size(); }
  /// @brief Keys remembered by the ghost queue G.
  [[nodiscard]] std::size_t ghost_size() const noexcept { return ghosts_.size(); }
  /// @brief Whether `k` is tracked in M.
  [[nodiscard]] bool in_main(const chunk_key& k) const noexcept {
    auto it = entries_.find(k);
    return it != entries_.end() && it->second.in_main;
  }

 private:
  struct entry : detail::list_hook {
    const chunk_key* key{nullptr};
    std::uint8_t freq{0};
    bool in_main{false};
  };
  struct ghost : detail::list_hook {
    const chunk_key* key{nullptr};
  };

  static void bump(entry& e) noexcept {
    if (e.freq < max_freq) ++e.freq;
  }

  void remember(const chunk_key& k) {
    auto [it, inserted] = ghosts_.try_emplace(k);
    if (!inserted) return;
    it->second.key = &it->first;
    ghost_order_.push_front(it->second);
    const std::size_t cap = std::max<std::size_t>(1, peak_ * (100 - small_percent) / 100);
    while (ghosts_.size() > cap) {
      ghost* old = ghost_order_.back();
      ghost_order_.erase(*old);
      ghosts_.erase(*old->key);
    }
  }

  // One pass over S: each key is rejected (rotated), promoted or chosen.
  template <class Pred>
  std::optional<chunk_key> scan_small(Pred& pred) {
    for (std::size_t n = small_.size(); n > 0; --n) {
      entry* t = small_.back();
      if (!pred(*t->key)) {
        small_.move_to_front(*t);
      } else if (t->freq > 1) {
        small_.erase(*t);
        t->in_main = true;
        main_.push_front(*t);
      } else {
        return *t->key;
      }
    }
    return std::nullopt;
  }

  // Each lap over M decrements every evictable counter, so max_freq + 1 laps find a zero.
  template <class Pred>
  std::optional<chunk_key> scan_main(Pred& pred) {
    for (std::size_t n = main_.size() * (max_freq + 1u) + main_.size(); n > 0; --n) {
      entry* t = main_.back();
      if (!pred(*t->key)) {
        main_.move_to_front(*t);
      } else if (t->freq > 0) {
        --t->freq;
        main_.move_to_front(*t);
      } else {
        return *t->key;
      }
    }
    return std::nullopt;
  }

  std::unordered_map<chunk_key, entry, chunk_key_hash> entries_;
  std::unordered_map<chunk_key, ghost, chunk_key_hash> ghosts_;
  detail::intrusive_list<entry> small_;
  detail::intrusive_list<entry> main_;
  detail::intrusive_list<ghost> ghost_order_;
  std::size_t peak_{0};
};

static_assert(eviction_policy<s3fifo_eviction>, "s3fifo_eviction does not satisfy kvortex::eviction_policy");

}  // namespace kvortex
