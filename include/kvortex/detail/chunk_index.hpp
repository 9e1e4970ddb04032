#pragma once
/// @file chunk_index.hpp
/// @brief The engine's index of chunks in host memory: entries, pins, capacity accounting and the
/// eviction policy's calls. One lock (`mutex()`) guards all of it.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex::detail {

/// Takes chunks the index evicts instead of freeing them (a write-back demotion queue). Both
/// calls come under the index's exclusive lock.
template <class Handle>
class eviction_sink {
 public:
  /// True when the sink took `h` (it releases it later, under the index lock); false: free it now.
  virtual bool adopt(const chunk_key& k, Handle h, std::size_t bytes) noexcept = 0;
  /// Frees the memory of one adopted chunk still waiting (its demotion is dropped); false if none.
  virtual bool reclaim_one() noexcept = 0;
  /// Drops one waiting demotion that pins a chunk in the index (write-through) and unpins it, so
  /// it can be evicted; false if none.
  virtual bool cancel_one() noexcept = 0;

 protected:
  ~eviction_sink() = default;
};

/// Which chunks are in host memory, their sizes, pins and readiness, and the byte budget.
/// A chunk's tier state is also here: `below` marks one a storage tier holds too (so evicting it
/// loses nothing), `demoting` one a write-through demotion has pinned.
template <class Allocator, class EvictionPolicy, class Backend>
class chunk_index {
 public:
  using handle_type = typename Backend::handle;

  struct entry {
    handle_type handle;
    std::size_t bytes;
    std::uint32_t pins;  // transfers (and demotions) using it: never evicted while > 0
    bool ready;          // written and published: lookups and retrieves may use it
    bool below;          // a storage tier holds it as well
  };
  struct reservation {
    std::size_t index;  // position in the caller's key list
    chunk_key key;
    handle_type handle;
    std::size_t bytes;
  };
  struct counters {
    std::atomic<std::uint64_t> deduplicated{0}, rejected{0}, replaced{0}, evictions{0};
  };

  chunk_index(std::size_t capacity, Allocator& a, EvictionPolicy& e, Backend& b) noexcept
      : capacity_(capacity), alloc_(a), eviction_(e), backend_(b) {}

  /// The lock over everything below; `_locked` members need it held (exclusively when they change
  /// something).
  [[nodiscard]] std::shared_mutex& mutex() const noexcept { return mu_; }
  /// Notified (under no lock) when chunks become readable or go, for callers waiting on a chunk
  /// another call is bringing in.
  [[nodiscard]] std::condition_variable_any& changed() noexcept { return changed_; }
  void set_sink(eviction_sink<handle_type>* s) noexcept { sink_ = s; }
  [[nodiscard]] const counters& stats() const noexcept { return counters_; }
  /// Sets the flag that makes reserve_all stop (shutdown); set it under the exclusive lock.
  std::atomic<bool>& stopped() noexcept { return stopped_; }

  [[nodiscard]] entry* find_locked(const chunk_key& k) noexcept {
    const auto it = map_.find(k);
    return it == map_.end() ? nullptr : &it->second;
  }
  [[nodiscard]] const entry* find_locked(const chunk_key& k) const noexcept {
    const auto it = map_.find(k);
    return it == map_.end() ? nullptr : &it->second;
  }
  /// Readable with exactly `bytes`.
  [[nodiscard]] bool usable_locked(const chunk_key& k, std::size_t bytes) const noexcept {
    const entry* e = find_locked(k);
    return e != nullptr && e->ready && e->bytes == bytes;
  }
  [[nodiscard]] std::size_t used_locked() const noexcept { return used_; }
  [[nodiscard]] std::size_t peak_locked() const noexcept { return peak_; }
  [[nodiscard]] std::size_t size_locked() const noexcept { return map_.size(); }

  /// Pins `k` (readable with `bytes`) for a transfer and tells the policy it was used.
  [[nodiscard]] entry* pin_locked(const chunk_key& k, std::size_t bytes) noexcept {
    entry* e = find_locked(k);
    if (e == nullptr || !e->ready || e->bytes != bytes) return nullptr;
    ++e->pins;
    eviction_.on_access(k);
    return e;
  }
  void unpin_locked(const chunk_key& k) noexcept {
    if (entry* e = find_locked(k)) --e->pins;
  }

  /// Makes a reserved chunk readable (unpinned, or keeping `keep_pins`) and tells the policy.
  void publish_locked(const chunk_key& k, bool below, std::uint32_t keep_pins = 0) noexcept {
    entry& e = *find_locked(k);
    e.ready = true;
    e.pins = keep_pins;
    e.below = below;
    eviction_.on_insert(k);
  }

  /// Frees a reserved (never published) chunk.
  void drop_locked(const chunk_key& k, handle_type h, std::size_t bytes) noexcept {
    backend_.release(alloc_, k, h);
    used_ -= bytes;
    map_.erase(k);
  }

  /// Reserves every key not yet present, in order; stops at the first that cannot be placed.
  /// Keys already present with the size asked for are touched and held while the rest is placed,
  /// so making room for a prompt's tail never evicts its own head. A key held with another size
  /// is replaced when readable and unpinned; otherwise it is skipped, and with `prefix` (token
  /// stores) so is every key after it, since a lookup could never reach them. Takes the lock
  /// itself and lets it go every `keys_per_hold` keys; the caller keeps the index alive meanwhile.
  result<std::vector<reservation>> reserve_all(std::span<const chunk_key> keys, std::span<const std::size_t> sizes,
                                               const char* op, bool prefix) {
    std::vector<reservation> out;
    std::vector<entry*> held;  // map nodes stay put while other entries come and go
    std::unique_lock lk(mu_);
    if (stopped_.load(std::memory_order_relaxed)) return stopped(op);
    struct release_held {
      std::vector<entry*>& v;
      ~release_held() {
        for (entry* e : v) --e->pins;
      }
    } unpin{held};
    constexpr std::size_t keys_per_hold = 64;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      if (i % keys_per_hold == 0 && i != 0) {
        lk.unlock();
        lk.lock();
        if (stopped_.load(std::memory_order_relaxed)) {
          for (const auto& r : out) drop_locked(r.key, r.handle, r.bytes);
          return stopped(op);
        }
      }
      if (const auto it = map_.find(keys[i]); it != map_.end()) {
        if (it->second.bytes == sizes[i]) {
          counters_.deduplicated.fetch_add(1, std::memory_order_relaxed);
          if (it->second.ready) {
            ++it->second.pins;
            held.push_back(&it->second);
            eviction_.on_access(it->first);
          }
          continue;
        }
        if (!it->second.ready || it->second.pins != 0) {
          if (prefix) {
            counters_.rejected.fetch_add(keys.size() - i, std::memory_order_relaxed);
            break;
          }
          counters_.rejected.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        erase_locked(it);
        counters_.replaced.fetch_add(1, std::memory_order_relaxed);
      }
      auto h = reserve_locked(keys[i], sizes[i]);
      if (!h) {
        if (h.error().code == errc::capacity_exhausted || h.error().code == errc::out_of_memory) {
          counters_.rejected.fetch_add(keys.size() - i, std::memory_order_relaxed);
          break;
        }
        for (const auto& r : out) drop_locked(r.key, r.handle, r.bytes);
        return std::unexpected(h.error());
      }
      map_.emplace(keys[i], entry{*h, sizes[i], 1, false, false});
      out.push_back({i, keys[i], *h, sizes[i]});
    }
    return out;
  }

  /// Room for one absent chunk `k`, reserved and pinned (not readable): evicts until the byte
  /// budget and the allocator both allow it.
  result<reservation> reserve_one_locked(const chunk_key& k, std::size_t bytes, std::size_t index) {
    auto h = reserve_locked(k, bytes);
    if (!h) return std::unexpected(h.error());
    map_.emplace(k, entry{*h, bytes, 1, false, false});
    return reservation{index, k, *h, bytes};
  }

  /// Frees a chunk the sink adopted (no longer in the map or the byte budget).
  void free_adopted_locked(const chunk_key& k, handle_type h) noexcept { backend_.release(alloc_, k, h); }

  /// Frees every chunk (shutdown). The eviction policy is left as it is: nothing asks it again,
  /// and untracking could allocate.
  void release_all_locked() noexcept {
    for (auto& [k, e] : map_) backend_.release(alloc_, k, e.handle);
    map_.clear();
    used_ = 0;
  }

 private:
  static std::unexpected<error> stopped(const char* op) {
    return std::unexpected(error{errc::shut_down, std::string(op) + ": the engine was shut down"});
  }

  void erase_locked(typename std::unordered_map<chunk_key, entry, chunk_key_hash>::iterator it) noexcept {
    const chunk_key k = it->first;
    backend_.release(alloc_, k, it->second.handle);
    used_ -= it->second.bytes;
    map_.erase(it);
    eviction_.on_erase(k);
  }

  // Evicts the policy's first unpinned, readable victim; hands it to the sink (write-back) when
  // no tier holds it yet.
  bool evict_one_locked() {
    const auto v = eviction_.select_victim([this](const chunk_key& k) {
      const auto it = map_.find(k);
      return it != map_.end() && it->second.ready && it->second.pins == 0;
    });
    if (!v) return false;
    const auto it = map_.find(*v);
    if (it == map_.end() || !it->second.ready || it->second.pins != 0) return false;  // a broken policy
    const entry e = it->second;
    if (sink_ != nullptr && !e.below && sink_->adopt(*v, e.handle, e.bytes)) {
      used_ -= e.bytes;
      map_.erase(it);
      eviction_.on_erase(*v);
    } else {
      erase_locked(it);
    }
    counters_.evictions.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

  result<handle_type> reserve_locked(const chunk_key& k, std::size_t bytes) {
    // A store never waits for a tier: chunks pinned only by waiting demotions are let go first.
    while (used_ + bytes > capacity_)
      if (!evict_one_locked() && !(sink_ != nullptr && sink_->cancel_one()))
        return fail(errc::capacity_exhausted, "no evictable chunk left to make room for " + std::to_string(bytes) + " bytes");
    for (;;) {
      auto h = backend_.reserve(alloc_, k, bytes);
      if (h) {
        used_ += bytes;
        peak_ = std::max(peak_, used_);
        return *h;
      }
      if (h.error().code != errc::out_of_memory) return std::unexpected(h.error());
      // Memory held by waiting write-back demotions goes first: a store never waits for a tier.
      if (sink_ != nullptr && sink_->reclaim_one()) continue;
      if (!evict_one_locked() && !(sink_ != nullptr && sink_->cancel_one())) return std::unexpected(h.error());
    }
  }

  const std::size_t capacity_;
  Allocator& alloc_;
  EvictionPolicy& eviction_;
  Backend& backend_;
  eviction_sink<handle_type>* sink_{nullptr};
  mutable std::shared_mutex mu_;
  std::condition_variable_any changed_;
  std::unordered_map<chunk_key, entry, chunk_key_hash> map_;
  std::size_t used_{0}, peak_{0};
  std::atomic<bool> stopped_{false};
  counters counters_;
};

}  // namespace kvortex::detail
