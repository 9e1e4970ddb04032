#pragma once
/// @file tiered_backend.hpp
/// @brief `tiered_backend`: a memory backend with storage tiers (disk, Redis) below it.

#include <array>
#include <cstddef>
#include <span>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "kvortex/concepts/backend.hpp"
#include "kvortex/concepts/storage_tier.hpp"
#include "kvortex/error.hpp"
#include "kvortex/stats.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief The memory tier `Memory` (what transfers read and write, e.g. `cpu_backend`) with the
/// storage tiers `Tiers...` below it, highest first (e.g. `tiered_backend<cpu_backend, disk_tier,
/// redis_tier>`). To the engine's transfers it is `Memory`: `reserve`, `data`, `commit` and
/// `release` forward to it. An engine whose backend is a `tiered_backend` also moves chunks
/// between host memory and the tiers on its own threads (`engine_config::tiering`): stores flow
/// down in the background (every tier below gets each demoted chunk), lookups and retrieves go
/// on below where memory stops, and a chunk brought up is read from the highest tier holding it.
///
/// The tiers are opened by the caller (`disk_tier::open`, `redis_tier::open`) and moved in; the
/// engine is then made with `basic_engine::create(cfg, std::move(backend))`.
template <class Memory, storage_tier... Tiers>
class tiered_backend {
  static_assert(sizeof...(Tiers) > 0, "tiered_backend needs at least one storage tier");
  static_assert(backend<Memory>, "Memory does not satisfy kvortex::backend");

 public:
  using handle = typename Memory::handle;
  using memory_type = Memory;

  /// @brief How many storage tiers sit below memory.
  static constexpr std::size_t tier_count = sizeof...(Tiers);

  explicit tiered_backend(Memory memory, Tiers... tiers)
      : memory_(std::move(memory)), tiers_(std::move(tiers)...) {}

  template <class A>
  [[nodiscard]] result<handle> reserve(A& a, const chunk_key& k, std::size_t n) {
    return memory_.reserve(a, k, n);
  }
  [[nodiscard]] std::span<std::byte> data(handle h) const noexcept { return memory_.data(h); }
  [[nodiscard]] result<void> commit(const chunk_key& k, handle h) { return memory_.commit(k, h); }
  template <class A>
  void release(A& a, const chunk_key& k, handle h) noexcept {
    memory_.release(a, k, h);
  }

  /// @brief The memory tier.
  [[nodiscard]] Memory& memory() noexcept { return memory_; }
  /// @brief Storage tier `I` (0 is the highest, right below memory).
  template <std::size_t I>
  [[nodiscard]] auto& tier() noexcept {
    return std::get<I>(tiers_);
  }
  template <std::size_t I>
  [[nodiscard]] const auto& tier() const noexcept {
    return std::get<I>(tiers_);
  }

  /// @brief Name of tier `j` (`T::name`).
  [[nodiscard]] std::string_view tier_name(std::size_t j) const noexcept {
    static constexpr std::array<std::string_view, tier_count> names{std::string_view(Tiers::name)...};
    return names[j];
  }
  /// @brief `put` on tier `j`.
  [[nodiscard]] result<void> tier_put(std::size_t j, const chunk_key& k, std::span<const std::byte> in) {
    return visit(j, [&](auto& t) { return t.put(k, in); });
  }
  /// @brief Reads `keys[i]` into `outs[i]` from tier `j`: one pipelined batch when the tier has
  /// `get_many` (as `redis_tier` does), else one `get` per key.
  [[nodiscard]] std::vector<result<std::size_t>> tier_get_many(std::size_t j, std::span<const chunk_key> keys,
                                                               std::span<const std::span<std::byte>> outs) {
    return visit(j, [&](auto& t) -> std::vector<result<std::size_t>> {
      if constexpr (requires { { t.get_many(keys, outs) } -> std::same_as<std::vector<result<std::size_t>>>; }) {
        return t.get_many(keys, outs);
      } else {
        std::vector<result<std::size_t>> out;
        out.reserve(keys.size());
        for (std::size_t i = 0; i < keys.size(); ++i) out.push_back(t.get(keys[i], outs[i]));
        return out;
      }
    });
  }
  /// @brief `contains` on tier `j`: how many leading `keys` it holds.
  [[nodiscard]] std::size_t tier_contains(std::size_t j, std::span<const chunk_key> keys) {
    return visit(j, [&](auto& t) { return t.contains(keys); });
  }
  /// @brief `remove` on tier `j`.
  void tier_remove(std::size_t j, const chunk_key& k) noexcept {
    visit(j, [&](auto& t) {
      t.remove(k);
      return 0;
    });
  }
  /// @brief `stats` of tier `j`.
  [[nodiscard]] tier_stats tier_stats_of(std::size_t j) const {
    tier_stats out;
    std::size_t i = 0;
    std::apply([&](const auto&... t) { ((i++ == j ? (void)(out = t.stats()) : (void)0), ...); }, tiers_);
    return out;
  }

 private:
  // Calls f on tier j; j < tier_count.
  template <class F>
  decltype(auto) visit(std::size_t j, F&& f) {
    return visit_at<0>(j, f);
  }
  template <std::size_t I, class F>
  decltype(auto) visit_at(std::size_t j, F& f) {
    if constexpr (I + 1 == tier_count) {
      return f(std::get<I>(tiers_));
    } else {
      if (j == I) return f(std::get<I>(tiers_));
      return visit_at<I + 1>(j, f);
    }
  }

  Memory memory_;
  std::tuple<Tiers...> tiers_;
};

namespace detail {
/// True for backends with storage tiers below memory (`tiered_backend`).
template <class B>
concept has_storage_tiers = requires(B& b, const B& cb, std::size_t j, const chunk_key& k,
                                     std::span<const std::byte> in, std::span<const chunk_key> keys,
                                     std::span<const std::span<std::byte>> outs) {
  { B::tier_count } -> std::convertible_to<std::size_t>;
  { cb.tier_name(j) } -> std::convertible_to<std::string_view>;
  { b.tier_put(j, k, in) } -> std::same_as<result<void>>;
  { b.tier_get_many(j, keys, outs) } -> std::same_as<std::vector<result<std::size_t>>>;
  { b.tier_contains(j, keys) } -> std::same_as<std::size_t>;
  { cb.tier_stats_of(j) } -> std::same_as<tier_stats>;
};
}  // namespace detail

}  // namespace kvortex
