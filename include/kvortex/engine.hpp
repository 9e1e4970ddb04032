#pragma once
/// @file engine.hpp
/// @brief `basic_engine`: the prefix-keyed KV chunk store, composed from five policies.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kvortex/backends/tiered_backend.hpp"
#include "kvortex/concepts.hpp"
#include "kvortex/config.hpp"
#include "kvortex/detail/chunk_index.hpp"
#include "kvortex/detail/tier_pipeline.hpp"
#include "kvortex/error.hpp"
#include "kvortex/layout.hpp"
#include "kvortex/stats.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief One bit per key, as returned by `check_blocks`.
class block_mask {
 public:
  block_mask() = default;
  explicit block_mask(std::size_t n) : words_((n + 63) / 64), size_(n) {}
  void set(std::size_t i) noexcept { words_[i / 64] |= std::uint64_t{1} << (i % 64); }
  [[nodiscard]] bool test(std::size_t i) const noexcept { return (words_[i / 64] >> (i % 64)) & 1U; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t count() const noexcept {
    std::size_t c = 0;
    for (auto w : words_) c += static_cast<std::size_t>(std::popcount(w));
    return c;
  }
  [[nodiscard]] bool all() const noexcept { return count() == size_; }
  [[nodiscard]] bool none() const noexcept { return count() == 0; }
  /// @brief Little-endian words: bit `i % 64` of word `i / 64` is key `i`.
  [[nodiscard]] std::span<const std::uint64_t> words() const noexcept { return words_; }

 private:
  std::vector<std::uint64_t> words_;
  std::size_t size_{0};
};

/// @brief Where the leading tokens of a prompt are, as `lookup_tiers` reports it.
struct tiered_lookup {
  /// @brief One storage tier's share of the hit.
  struct tier_hit {
    std::string_view tier;  ///< the tier's name ("disk", "redis")
    /// Tokens of the hit credited to this tier. Past memory the walk goes tier by tier: where a
    /// run of chunks starts, the highest tier holding its first chunk takes the whole run it
    /// holds, then the walk goes on from tier 0 where that run stops. A retrieve reads each chunk
    /// from the tier credited with it.
    std::size_t tokens{0};
  };
  std::size_t tokens{0};         ///< leading tokens stored anywhere: `lookup`'s answer
  std::size_t memory_tokens{0};  ///< of which in host memory (the first ones)
  std::vector<tier_hit> tiers;   ///< the rest, per storage tier, highest first (empty without tiers)
};

namespace detail {

struct ticket_state {
  std::mutex m;
  std::condition_variable cv;
  bool done{false};
  result<std::size_t> value{0};

  void complete(result<std::size_t> r) {
    {
      std::lock_guard lk(m);
      value = std::move(r);
      done = true;
    }
    cv.notify_all();
  }
};

/// Builds a policy: `P::create(cfg)`, else `P::create()`, else `P(cfg)`, else `P()`.
template <class P>
result<P> make_policy(const engine_config& cfg) {
  if constexpr (requires { { P::create(cfg) } -> std::same_as<result<P>>; })
    return P::create(cfg);
  else if constexpr (requires { { P::create() } -> std::same_as<result<P>>; })
    return P::create();
  else if constexpr (std::constructible_from<P, const engine_config&>)
    return result<P>(std::in_place, cfg);
  else
    return result<P>(std::in_place);
}

/// True for schedulers that can copy to and from device memory.
template <class S>
concept reaches_device_memory = requires { requires S::reaches_device_memory; };

inline void put_field(std::vector<std::byte>& out, const void* p, std::size_t n) {
  const auto len = static_cast<std::uint64_t>(n);
  const auto* lb = reinterpret_cast<const std::byte*>(&len);
  out.insert(out.end(), lb, lb + sizeof len);
  const auto* b = static_cast<const std::byte*>(p);
  out.insert(out.end(), b, b + n);
}

/// Length-prefixed serialization of everything that must separate two key spaces.
inline std::vector<std::byte> namespace_seed(const engine_config& c) {
  std::vector<std::byte> out;
  const auto str = [&](const std::string& s) { put_field(out, s.data(), s.size()); };
  const auto num = [&](std::uint64_t v) { put_field(out, &v, sizeof v); };
  str("kvortex/1");
  str(c.ns.model_id);
  str(c.ns.dtype);
  str(c.ns.layout);
  num(c.ns.tp_rank);
  num(c.ns.tp_size);
  str(c.ns.cache_salt);
  num(c.geometry.num_layers);
  num(c.geometry.kv_planes);
  num(c.geometry.kv_heads);
  num(c.geometry.head_dim);
  num(c.geometry.element_bytes);
  num(c.chunk_tokens);
  return out;
}

}  // namespace detail

/// @brief The namespace digest to give the storage tiers of an engine built from `cfg` with hasher
/// `H` (`disk_tier_config::ns`, `redis_tier_config::ns`): the root of the engine's key chains, so
/// every record a tier keeps names the model, dtype, layout, rank and salt it belongs to, and
/// a tier shared with an engine of another namespace never serves it. Fails only when `H`
/// cannot be built from `cfg`.
template <hasher H>
[[nodiscard]] result<namespace_digest> tier_namespace(const engine_config& cfg) {
  auto h = detail::make_policy<H>(cfg);
  if (!h) return std::unexpected(h.error());
  const auto seed = detail::namespace_seed(cfg);
  const chunk_key root = h->root(seed);
  namespace_digest out{};
  std::memcpy(out.data(), root.bytes.data(), out.size());
  return out;
}

namespace detail {

/// Shared by an engine and every operation it started, so an operation that outlives the engine
/// learns that it is gone instead of touching freed state. `active` counts the submissions and
/// completions touching the engine's state right now; shutdown waits for it to reach zero, then
/// marks the state gone under the same lock, so none can start after that.
struct engine_link {
  std::mutex m;
  std::condition_variable cv;
  std::size_t active{0};
  bool stopped{false};  // shutdown began: no new submissions
  bool gone{false};     // the state was torn down: nothing may touch it

  /// Enters unless the state is gone (or, for a new submission, unless shutdown began).
  [[nodiscard]] bool enter(bool submission) {
    std::lock_guard lk(m);
    if (gone || (submission && stopped)) return false;
    ++active;
    return true;
  }
  void leave() {
    std::lock_guard lk(m);
    if (--active == 0) cv.notify_all();
  }
  [[nodiscard]] bool is_stopped() {
    std::lock_guard lk(m);
    return stopped;
  }
};

using clock = std::chrono::steady_clock;
inline std::uint64_t elapsed_ns(clock::time_point t0) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count());
}

}  // namespace detail

/// @brief A handle on an asynchronous store or retrieve. Copies share the same operation.
class transfer_ticket {
 public:
  transfer_ticket() = default;
  /// @brief True once the transfer finished (successfully or not); never blocks.
  [[nodiscard]] bool ready() const {
    if (!s_) return true;
    std::lock_guard lk(s_->m);
    return s_->done;
  }
  /// @brief Blocks until the transfer finished; returns the tokens stored or retrieved.
  [[nodiscard]] result<std::size_t> wait() const {
    if (!s_) return fail(errc::invalid_argument, "wait() on an empty transfer_ticket");
    std::unique_lock lk(s_->m);
    s_->cv.wait(lk, [&] { return s_->done; });
    return s_->value;
  }

 private:
  template <allocator, hasher, eviction_policy, class B, transfer_scheduler>
  friend class basic_engine;
  explicit transfer_ticket(std::shared_ptr<detail::ticket_state> s) : s_(std::move(s)) {}
  std::shared_ptr<detail::ticket_state> s_;
};

/// @brief The KV chunk store.
///
/// Token API: `lookup`, `store`, `retrieve` address chunks by token prefix; key API:
/// `save_blocks`, `load_blocks`, `check_blocks` address them by `chunk_key`. All members are
/// thread-safe. Capacity is a hard limit; chunks an in-flight transfer uses are never evicted;
/// concurrent stores of one key write it once. The engine is movable; a moved-from engine
/// answers every call with `errc::shut_down`. Tickets and layered transfers may outlive it.
/// Destinations of retrieves and `load_blocks` are checked so that no two copies write the same
/// byte (a block named twice, layers that overlap, overlapping buffers are refused).
///
/// @tparam Allocator host memory for chunks (`allocator`)
/// @tparam Hasher chunk key chaining (`hasher`)
/// @tparam EvictionPolicy victim order (`eviction_policy`)
/// @tparam Backend where chunk bytes live (`backend<Backend, Allocator>`)
/// @tparam TransferScheduler who copies (`transfer_scheduler`)
template <allocator Allocator, hasher Hasher, eviction_policy EvictionPolicy, class Backend,
          transfer_scheduler TransferScheduler>
class basic_engine {
  static_assert(backend<Backend, Allocator>, "Backend does not satisfy kvortex::backend<Backend, Allocator>");

 public:
  using allocator_type = Allocator;
  using hasher_type = Hasher;
  using eviction_policy_type = EvictionPolicy;
  using backend_type = Backend;
  using transfer_scheduler_type = TransferScheduler;

  /// @brief Validates `cfg` and builds every policy from it (see `detail::make_policy`).
  [[nodiscard]] static result<basic_engine> create(const engine_config& cfg) {
    if (auto v = cfg.validate(); !v) return std::unexpected(v.error());
    auto b = detail::make_policy<Backend>(cfg);
    if (!b) return std::unexpected(b.error());
    return create(cfg, std::move(*b));
  }

  /// @brief Validates `cfg`, takes `b` as the backend and builds the other policies from `cfg`;
  /// the way to make an engine over a `tiered_backend` whose tiers the caller opened.
  [[nodiscard]] static result<basic_engine> create(const engine_config& cfg, Backend b) {
    if (auto v = cfg.validate(); !v) return std::unexpected(v.error());
    auto a = detail::make_policy<Allocator>(cfg);
    if (!a) return std::unexpected(a.error());
    auto h = detail::make_policy<Hasher>(cfg);
    if (!h) return std::unexpected(h.error());
    auto e = detail::make_policy<EvictionPolicy>(cfg);
    if (!e) return std::unexpected(e.error());
    auto s = detail::make_policy<TransferScheduler>(cfg);
    if (!s) return std::unexpected(s.error());
    return create(cfg, std::move(*a), std::move(*h), std::move(*e), std::move(b), std::move(*s));
  }

  /// @brief Validates `cfg` and takes the given policy instances.
  [[nodiscard]] static result<basic_engine> create(const engine_config& cfg, Allocator a, Hasher h,
                                                   EvictionPolicy e, Backend b, TransferScheduler s) {
    if (auto v = cfg.validate(); !v) return std::unexpected(v.error());
    basic_engine out;
    try {
      out.s_ = std::make_unique<state>(cfg, std::move(a), std::move(h), std::move(e), std::move(b), std::move(s));
      out.link_ = std::make_shared<detail::engine_link>();
      if constexpr (tiered) out.s_->pipeline = std::make_unique<pipeline_type>(cfg.tiering, out.s_->index, out.s_->backend);
    } catch (const std::bad_alloc&) {
      out.s_.reset();
      return fail(errc::out_of_memory, "create: cannot allocate the engine's state");
    }
    if constexpr (tiered) {
      if (auto r = out.s_->pipeline->start(); !r) {
        out.s_->pipeline.reset();
        out.s_.reset();
        return std::unexpected(r.error());
      }
    }
    return out;
  }

  basic_engine(basic_engine&&) noexcept = default;
  basic_engine& operator=(basic_engine&& o) noexcept {
    if (this != &o) {
      shutdown();
      s_ = std::move(o.s_);
      link_ = std::move(o.link_);
    }
    return *this;
  }
  ~basic_engine() { shutdown(); }

  /// @brief The configuration it was created with (a default one once moved from).
  [[nodiscard]] const engine_config& config() const noexcept {
    static const engine_config moved_from{};
    return s_ ? s_->cfg : moved_from;
  }

  /// @brief The chain of keys of `tokens`: one per full chunk, plus the trailing partial chunk when
  /// `store_partial_chunks` is set. Every token-API call takes a trailing `salt` (see `key_salt`):
  /// the chain then starts from the namespace's root chained with the salt, so salted and unsalted
  /// prompts never share a key.
  [[nodiscard]] result<std::vector<chunk_key>> chunk_keys(std::span<const token_id> tokens, key_salt salt = {}) const {
    if (!s_ || s_->index.stopped().load(std::memory_order_acquire)) return stopped_error("chunk_keys");
    if (tokens.empty()) return fail(errc::invalid_argument, "chunk_keys: empty token list");
    return keys_of(tokens, salt);
  }

  /// @brief How many leading tokens of `tokens` are stored: walks the chunk chain and stops at the
  /// first chunk that is missing or still being written. With storage tiers (`tiered_backend`)
  /// the walk goes on below where host memory stops, one batched probe per tier (one pipelined
  /// round trip to Redis for all the remaining keys), so the answer is what a `retrieve` can bring
  /// back (a chunk a tier lists but then fails to deliver ends that retrieve's hit early). Does
  /// not change eviction order. After a first-chunk hit in memory it hashes every chunk before
  /// probing, so a partial hit hashes a few chunks in vain; that is cheaper than taking the index
  /// lock once per chunk.
  [[nodiscard]] result<std::size_t> lookup(std::span<const token_id> tokens, key_salt salt = {}) const {
    auto r = lookup_impl(tokens, nullptr, salt);
    if (!r) return std::unexpected(r.error());
    return *r;
  }

  /// @brief As `lookup`, and says how many of the hit tokens each tier holds. Counts as a lookup.
  [[nodiscard]] result<tiered_lookup> lookup_tiers(std::span<const token_id> tokens, key_salt salt = {}) const {
    tiered_lookup out;
    auto r = lookup_impl(tokens, &out, salt);
    if (!r) return std::unexpected(r.error());
    return out;
  }

  /// @brief Brings the stored prefix of `tokens` up from the storage tiers into host memory ahead
  /// of its request, on a tier thread, within `tiering.promotion_timeout`. The ticket yields the
  /// leading tokens in host memory when it is done (the chunks are not pinned: a later retrieve
  /// may still find some evicted). Without storage tiers it completes at once with the leading
  /// tokens in memory. Fails with `capacity_exhausted` when too many prefetches are waiting.
  [[nodiscard]] result<transfer_ticket> prefetch(std::span<const token_id> tokens, key_salt salt = {}) {
    if (!s_ || s_->index.stopped().load(std::memory_order_acquire)) return stopped_error("prefetch");
    if (tokens.empty()) return fail(errc::invalid_argument, "prefetch: empty token list");
    auto keys = keys_of(tokens, salt);
    std::vector<std::size_t> sizes(keys.size());
    std::vector<std::size_t> ntoks(keys.size());
    for (std::size_t i = 0; i < keys.size(); ++i) {
      ntoks[i] = chunk_tokens_of(tokens, i).size();
      sizes[i] = chunk_bytes(ntoks[i]);
    }
    auto ticket = std::make_shared<detail::ticket_state>();
    state* st = s_.get();
    if constexpr (!tiered) {
      std::size_t t = 0;
      {
        std::shared_lock lk(st->index.mutex());
        for (std::size_t c = 0; c < keys.size() && st->index.usable_locked(keys[c], sizes[c]); ++c) t += ntoks[c];
      }
      ticket->complete(t);
    } else {
      const auto deadline = detail::clock::now() + st->cfg.tiering.promotion_timeout;
      auto job = [st, ticket, deadline, keys = std::move(keys), sizes = std::move(sizes), ntoks = std::move(ntoks)](bool run) mutable {
        if (!run) {
          ticket->complete(fail(errc::shut_down, "prefetch: the engine was shut down"));
          return;
        }
        st->pipeline->count_prefetch();
        std::size_t c = 0, t = 0;
        {
          std::shared_lock lk(st->index.mutex());
          for (; c < keys.size() && st->index.usable_locked(keys[c], sizes[c]); ++c) t += ntoks[c];
        }
        const auto p = st->pipeline->promote(keys, sizes, c, deadline, /*keep_pinned=*/false,
                                             [](std::span<const reservation>) {});
        for (std::size_t i = c; i < c + p.chunks; ++i) t += ntoks[i];
        ticket->complete(t);
      };
      if (auto r = st->pipeline->post(std::move(job)); !r) return std::unexpected(r.error());
    }
    return transfer_ticket(std::move(ticket));
  }

  /// @brief Waits until every demotion queued so far has been written to the storage tiers (or
  /// dropped); returns at once without tiers. For tests, checkpoints and orderly handovers.
  void flush() {
    if constexpr (tiered) {
      if (s_ && s_->pipeline) s_->pipeline->flush();
    }
  }

  class layered_transfer;

  /// @brief Copies the KV of `tokens` out of `src` into the store, chunk by chunk. Chunks already
  /// present or in flight are skipped; a chunk's key held with another size (`save_blocks` wrote
  /// it) is replaced, or, while a transfer uses that entry, ends the store there. If capacity runs
  /// out, the chunks after the first that cannot be placed are dropped (they would be unreachable);
  /// both count in `rejected_chunks`. The ticket yields the tokens newly written.
  /// Tokens beyond the last full chunk are kept only with `store_partial_chunks`.
  /// @param block_table physical block of each logical block of `src`; empty means identity.
  /// @param hints `wait_event`: copy only after it (e.g. the forward pass's last layer).
  [[nodiscard]] result<transfer_ticket> store(std::span<const token_id> tokens, const kv_layout& src,
                                              std::span<const std::int32_t> block_table = {},
                                              const transfer_hints& hints = {}, key_salt salt = {}) {
    auto op = begin_store(tokens, src, block_table, salt);
    if (!op) return std::unexpected(op.error());
    if (auto r = op->submit_all(hints); !r) return std::unexpected(r.error());
    return op->finish();
  }

  /// @brief Copies the stored leading chunks of `tokens` into `dst`. The ticket yields how many
  /// leading tokens were copied (0 on a full miss). The chunks stay pinned until it completes.
  /// @param block_table physical block of each logical block of `dst`; it must address all of `tokens`.
  ///   An entry equal to `kv_layout::skip_block` marks a block the destination already holds (e.g.
  ///   an inference engine's own prefix cache): it is not written, and the hit still counts it.
  /// @param hints `stream`: a device stream made to wait for the copies, so the host need not.
  [[nodiscard]] result<transfer_ticket> retrieve(std::span<const token_id> tokens, const kv_layout& dst,
                                                 std::span<const std::int32_t> block_table = {},
                                                 const transfer_hints& hints = {}, key_salt salt = {}) {
    // Pipelined: each chunk's copies are submitted as soon as it is in memory, so the copies of
    // chunks brought up from a tier overlap the reads of the next ones.
    auto op = begin_retrieve_impl(tokens, dst, block_table, &hints, salt);
    if (!op) return std::unexpected(op.error());
    return op->finish();
  }

  /// @brief Starts a store driven layer by layer: reserves the chunks now, then copies each layer
  /// when `submit_layer` is called (e.g. right after the forward pass wrote it). Chunks become
  /// readable once every layer is copied and `finish` is called; a transfer dropped before that is
  /// rolled back.
  [[nodiscard]] result<layered_transfer> begin_store(std::span<const token_id> tokens, const kv_layout& src,
                                                     std::span<const std::int32_t> block_table = {},
                                                     key_salt salt = {}) {
    if (!s_) return stopped_error("store");
    const auto t0 = detail::clock::now();
    if (tokens.empty()) return fail(errc::invalid_argument, "store: empty token list");
    if (auto v = check_layout(src, "store"); !v) return std::unexpected(v.error());
    const std::size_t n = usable_chunks(tokens.size(), src);
    const std::size_t covered = std::min(tokens.size(), n * s_->cfg.chunk_tokens);
    if (covered > 0)
      if (auto v = src.check_table(block_table, covered); !v) return std::unexpected(v.error());
    auto keys = keys_of(tokens, salt);
    keys.resize(n);
    std::vector<std::size_t> sizes(n);
    for (std::size_t i = 0; i < n; ++i) sizes[i] = chunk_bytes(chunk_tokens_of(tokens, i).size());
    auto op = new_operation(true, t0, &s_->store_latency);
    op->layout = src;
    op->table.assign(block_table.begin(), block_table.end());
    auto res = reserve_all(keys, sizes, "store", /*prefix=*/true);
    if (!res) return std::unexpected(res.error());
    for (const auto& r : *res) op->chunks.push_back({r, r.index * s_->cfg.chunk_tokens, chunk_tokens_of(tokens, r.index).size()});
    for (const auto& c : op->chunks) op->value += c.tokens;
    return layered_transfer(std::move(op));
  }

  /// @brief Starts a retrieve driven layer by layer: pins the stored leading chunks now (`tokens()`
  /// says how many tokens they hold), then copies each layer when `submit_layer` is called, so the
  /// forward pass can start on layer 0 while later layers are still in flight. `block_table` as
  /// for `retrieve` (`kv_layout::skip_block` entries are not written).
  [[nodiscard]] result<layered_transfer> begin_retrieve(std::span<const token_id> tokens, const kv_layout& dst,
                                                        std::span<const std::int32_t> block_table = {},
                                                        key_salt salt = {}) {
    return begin_retrieve_impl(tokens, dst, block_table, nullptr, salt);
  }

  /// @brief Stores `sizes[i]` bytes at `ptrs[i]` under `keys[i]`; synchronous. Keys already
  /// present with the same size, or being written, are skipped; a key held with another size is
  /// replaced unless a transfer is using it right then (then it is skipped). Returns how many keys
  /// were newly stored (fewer than asked when capacity ran out or a key was skipped).
  [[nodiscard]] result<std::size_t> save_blocks(std::span<const chunk_key> keys,
                                                std::span<const std::byte* const> ptrs,
                                                std::span<const std::size_t> sizes) {
    if (!s_) return stopped_error("save_blocks");
    const auto t0 = detail::clock::now();
    if (auto v = check_key_args("save_blocks", keys.size(), ptrs, sizes); !v) return std::unexpected(v.error());
    auto op = new_operation(true, t0, &s_->store_latency);
    auto res = reserve_all(keys, sizes, "save_blocks", /*prefix=*/false);
    if (!res) return std::unexpected(res.error());
    std::vector<copy_op> ops;
    for (const auto& r : *res) {
      ops.push_back({ptrs[r.index], s_->backend.data(r.handle).data(), sizes[r.index]});
      op->chunks.push_back({r, 0, 0});
    }
    op->value = op->chunks.size();
    return run_key_batch(std::move(op), std::move(ops));
  }

  /// @brief Copies the blocks stored under `keys` to `ptrs`; synchronous. Fails with `not_found`
  /// or `size_mismatch` before copying anything if any key is missing or has another size, and
  /// with `invalid_argument` if two destination ranges overlap. A rejected call changes no counter.
  [[nodiscard]] result<void> load_blocks(std::span<const chunk_key> keys, std::span<std::byte* const> ptrs,
                                         std::span<const std::size_t> sizes) {
    if (!s_) return stopped_error("load_blocks");
    const auto t0 = detail::clock::now();
    if (auto v = check_key_args("load_blocks", keys.size(), ptrs, sizes); !v) return std::unexpected(v.error());
    if (auto v = check_disjoint("load_blocks", ptrs, sizes); !v) return std::unexpected(v.error());
    auto& st = *s_;
    auto op = new_operation(false, t0, nullptr);
    {
      std::unique_lock lk(st.index.mutex());
      if (st.index.stopped().load(std::memory_order_relaxed)) return stopped_error("load_blocks");
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const auto* e = st.index.find_locked(keys[i]);
        std::optional<error> err;
        if (e == nullptr || !e->ready)
          err = error{errc::not_found, "load_blocks: key " + std::to_string(i) + " (" + keys[i].hex() + ") is not stored"};
        else if (e->bytes != sizes[i])
          err = error{errc::size_mismatch, "load_blocks: key " + std::to_string(i) + " holds " +
                                               std::to_string(e->bytes) + " bytes, destination has " +
                                               std::to_string(sizes[i])};
        if (err) return std::unexpected(std::move(*err));
      }
      // All present: only now pinned (and touched), so a rejected call changes nothing.
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const auto* pinned = st.index.pin_locked(keys[i], sizes[i]);
        op->chunks.push_back({{i, keys[i], pinned->handle, pinned->bytes}, 0, 0});
      }
    }
    st.hit_chunks.fetch_add(op->chunks.size(), std::memory_order_relaxed);
    std::vector<copy_op> ops;
    for (const auto& c : op->chunks) ops.push_back({st.backend.data(c.r.handle).data(), ptrs[c.r.index], sizes[c.r.index]});
    op->value = keys.size();
    auto r = run_key_batch(std::move(op), std::move(ops));
    if (!r) return std::unexpected(r.error());
    return {};
  }

  /// @brief Which of `keys` are stored and readable. A diagnostic: changes no counter and no
  /// eviction order.
  [[nodiscard]] result<block_mask> check_blocks(std::span<const chunk_key> keys) const {
    if (!s_) return stopped_error("check_blocks");
    if (keys.empty()) return fail(errc::invalid_argument, "check_blocks: empty key list");
    auto& st = *s_;
    if (st.index.stopped().load(std::memory_order_acquire)) return stopped_error("check_blocks");
    block_mask m(keys.size());
    {
      std::shared_lock lk(st.index.mutex());
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const auto* e = st.index.find_locked(keys[i]);
        if (e != nullptr && e->ready) m.set(i);
      }
    }
    return m;
  }

  /// @brief A snapshot of the counters. Each counter and gauge is read once; `current_bytes`,
  /// `peak_bytes` and `chunks` come from one instant, and each histogram's `count` is the sum of
  /// its buckets. Counters of different calls may be from instants a few operations apart.
  [[nodiscard]] engine_stats stats() const {
    engine_stats out;
    if (!s_) return out;
    auto& st = *s_;
    const auto ld = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
    out.lookups = ld(st.lookups);
    out.hit_chunks = ld(st.hit_chunks);
    out.miss_chunks = ld(st.miss_chunks);
    out.hit_tokens = ld(st.hit_tokens);
    out.queried_tokens = ld(st.queried_tokens);
    out.stored_chunks = ld(st.stored_chunks);
    out.deduplicated_chunks = ld(st.index.stats().deduplicated);
    out.rejected_chunks = ld(st.index.stats().rejected);
    out.replaced_chunks = ld(st.index.stats().replaced);
    out.retrieved_chunks = ld(st.retrieved_chunks);
    out.evictions = ld(st.index.stats().evictions);
    out.bytes_stored = ld(st.bytes_stored);
    out.bytes_loaded = ld(st.bytes_loaded);
    out.transfer_failures = ld(st.transfer_failures);
    out.capacity_bytes = st.cfg.capacity_bytes;
    {
      std::shared_lock lk(st.index.mutex());
      out.current_bytes = st.index.used_locked();
      out.peak_bytes = st.index.peak_locked();
      out.chunks = st.index.size_locked();
    }
    if constexpr (tiered) st.pipeline->fill(out);
    out.lookup_latency = st.lookup_latency.snapshot();
    out.store_latency = st.store_latency.snapshot();
    out.retrieve_latency = st.retrieve_latency.snapshot();
    return out;
  }

  /// @brief Makes later calls fail with `errc::shut_down`, waits for the copies already handed to
  /// the scheduler (and the completion of their transfers: their tickets are ready when this
  /// returns), then frees every chunk. Idempotent; also run by the destructor.
  ///
  /// Open layered transfers (begun, not finished) do not hold it up: they are cut off, so their
  /// later `submit_layer` and `finish` fail with `errc::shut_down`, and destroying them, or
  /// waiting on their tickets, stays safe after the engine is gone. Do not call it from inside a
  /// scheduler's completion callback.
  void shutdown() noexcept {
    if (!s_) return;
    auto& st = *s_;
    auto& ln = *link_;
    {
      std::unique_lock lk(st.index.mutex());
      if (st.index.stopped().exchange(true)) return;
    }
    st.index.changed().notify_all();  // promotions waiting on a chunk give up
    // The tier threads go first: they touch the index, and a drain writes the queued demotions.
    if constexpr (tiered) st.pipeline->stop(st.cfg.tiering.drain_on_shutdown);
    {
      std::unique_lock lk(ln.m);
      ln.stopped = true;
      ln.cv.wait(lk, [&] { return ln.active == 0; });
      // Still under ln.m: nothing can enter between the wait and the teardown.
      ln.gone = true;
      std::unique_lock ilk(st.index.mutex());
      st.index.release_all_locked();
    }
    st.scheduler.drain();
  }

  /// @brief The allocator, e.g. to query a pool; do not free chunk memory through it. Not on a
  /// moved-from engine.
  [[nodiscard]] const Allocator& get_allocator() const noexcept { return s_->alloc; }

  /// @brief The backend, e.g. to reach a `tiered_backend`'s tiers (`get_backend().tier<0>()`) for
  /// their own calls. The engine's index does not learn of chunks changed that way: a chunk
  /// removed from a tier is a miss the next time it is probed. Not on a moved-from engine.
  [[nodiscard]] Backend& get_backend() noexcept { return s_->backend; }
  [[nodiscard]] const Backend& get_backend() const noexcept { return s_->backend; }

 private:
  using handle_type = typename Backend::handle;
  using index_type = detail::chunk_index<Allocator, EvictionPolicy, Backend>;
  using reservation = typename index_type::reservation;
  static constexpr bool tiered = detail::has_storage_tiers<Backend>;
  struct no_pipeline {};
  using pipeline_type = std::conditional_t<tiered, detail::tier_pipeline<index_type, Backend>, no_pipeline>;
  struct state;

  // One store or retrieve: its chunks, its batches in flight, and how it ends.
  struct operation {
    struct chunk {
      reservation r;
      std::size_t first;   // first token of the chunk in the prompt
      std::size_t tokens;  // tokens in the chunk (0 for the key API)
    };
    operation(state* s, std::shared_ptr<detail::engine_link> l, bool storing_, detail::clock::time_point t,
              detail::atomic_histogram* h)
        : st(s), link(std::move(l)), storing(storing_), t0(t), latency(h) {}

    state* const st;  // touched only between link->enter() and link->leave()
    const std::shared_ptr<detail::engine_link> link;
    const bool storing;
    const detail::clock::time_point t0;
    detail::atomic_histogram* const latency;
    std::shared_ptr<detail::ticket_state> ticket = std::make_shared<detail::ticket_state>();
    std::vector<chunk> chunks;
    std::size_t value{0};
    kv_layout layout;
    std::vector<std::int32_t> table;

    std::mutex m;  // guards what follows
    std::deque<std::vector<copy_op>> batches;  // a deque: addresses stay put while the scheduler reads them
    std::vector<bool> layer_sent;
    std::size_t outstanding{0};
    bool sealed{false}, finalized{false};
    std::optional<error> err;
  };

 public:
  /// @brief A store or retrieve driven one layer at a time (see `begin_store`, `begin_retrieve`).
  /// Move-only; destroying it before `finish` rolls a store back and unpins a retrieve's chunks,
  /// after waiting for the copies of layers already submitted (so none lands in the cache later).
  /// It may outlive its engine: once the engine is shut down, `submit_layer`, `submit_all` and
  /// `finish` fail with `errc::shut_down`, and destroying it is safe.
  class layered_transfer {
   public:
    layered_transfer(layered_transfer&& o) noexcept : op_(std::move(o.op_)) {}
    layered_transfer& operator=(layered_transfer&& o) noexcept {
      if (this != &o) {
        abandon();
        op_ = std::move(o.op_);
      }
      return *this;
    }
    ~layered_transfer() { abandon(); }

    /// @brief Tokens this transfer moves: newly written ones for a store, hit ones for a retrieve.
    [[nodiscard]] std::size_t tokens() const noexcept { return op_ ? op_->value : 0; }

    /// @brief Copies layer `layer` of every chunk; returns once the copy is queued.
    /// @param hints `wait_event` delays a store's copy until the layer is computed; `stream` is made
    /// to wait for a retrieve's copy.
    [[nodiscard]] result<void> submit_layer(std::size_t layer, const transfer_hints& hints = {}) {
      if (!op_) return fail(errc::invalid_argument, "submit_layer: the transfer was finished or moved from");
      if (op_->link->is_stopped()) return stopped_error("submit_layer");
      const std::size_t layers = op_->layout.num_layers();
      if (layer >= layers)
        return fail(errc::invalid_argument, "submit_layer: layer " + std::to_string(layer) + " of a " +
                                                std::to_string(layers) + "-layer cache");
      {
        std::lock_guard lk(op_->m);
        if (op_->layer_sent.empty()) op_->layer_sent.assign(layers, false);
        if (op_->layer_sent[layer])
          return fail(errc::invalid_argument, "submit_layer: layer " + std::to_string(layer) + " was already submitted");
        op_->layer_sent[layer] = true;
      }
      return submit_layers(layer, 1, hints);
    }

    /// @brief Every layer in one batch.
    [[nodiscard]] result<void> submit_all(const transfer_hints& hints = {}) {
      if (!op_) return fail(errc::invalid_argument, "submit_all: the transfer was finished or moved from");
      if (op_->link->is_stopped()) return stopped_error("submit_all");
      {
        std::lock_guard lk(op_->m);
        if (!op_->layer_sent.empty()) return fail(errc::invalid_argument, "submit_all: layers were already submitted");
        op_->layer_sent.assign(op_->layout.num_layers(), true);
      }
      return submit_layers(0, op_->layout.num_layers(), hints);
    }

    /// @brief Ends the transfer; the ticket completes when every submitted copy has. A transfer
    /// that holds chunks but had a layer never submitted fails with `invalid_argument`: a store is
    /// rolled back, a retrieve's chunks are unpinned (the layers it did copy stay copied). After
    /// the engine's shutdown, fails with `shut_down` (a store is rolled back). When it fails, it
    /// returns only once the copies already submitted have completed.
    [[nodiscard]] result<transfer_ticket> finish() {
      if (!op_) return fail(errc::invalid_argument, "finish: the transfer was finished or moved from");
      auto op = std::move(op_);
      std::optional<error> missing;
      if (op->link->is_stopped()) {
        missing = error{errc::shut_down, "finish: the engine was shut down"};
      } else if (!op->chunks.empty()) {
        std::lock_guard lk(op->m);
        const auto sent = static_cast<std::size_t>(std::count(op->layer_sent.begin(), op->layer_sent.end(), true));
        if (sent != op->layout.num_layers())
          missing = error{errc::invalid_argument,
                          "finish: only " + std::to_string(sent) + " of " + std::to_string(op->layout.num_layers()) +
                              " layers were submitted; the " +
                              (op->storing ? "store was rolled back" : "retrieve is incomplete")};
      }
      transfer_ticket t(op->ticket);
      seal(op, missing);
      if (missing) {
        // No ticket goes back, so nothing else could wait for copies already submitted: they
        // must not write into the caller's cache after this returns.
        (void)t.wait();
        return std::unexpected(std::move(*missing));
      }
      return t;
    }

   private:
    friend class basic_engine;
    explicit layered_transfer(std::shared_ptr<operation> op) : op_(std::move(op)) {}

    result<void> submit_layers(std::size_t first, std::size_t count, const transfer_hints& hints) {
      return submit_range(op_, 0, op_->chunks.size(), first, count, hints);
    }

    // Rolls back and waits for the copies already submitted, so none writes into the caller's
    // cache once the transfer is gone.
    void abandon() noexcept {
      if (!op_) return;
      seal(op_, error{errc::invalid_argument, "the layered transfer was dropped before finish()"});
      (void)transfer_ticket(op_->ticket).wait();
      op_.reset();
    }

    std::shared_ptr<operation> op_;
  };

 private:

  struct state {
    state(const engine_config& c, Allocator&& a, Hasher&& h, EvictionPolicy&& e, Backend&& b,
          TransferScheduler&& s)
        : cfg(c), alloc(std::move(a)), hasher(std::move(h)), eviction(std::move(e)), backend(std::move(b)),
          scheduler(std::move(s)), index(cfg.capacity_bytes, alloc, eviction, backend) {
      const auto seed = detail::namespace_seed(cfg);
      root = hasher.root(seed);
    }

    engine_config cfg;
    Allocator alloc;
    Hasher hasher;
    EvictionPolicy eviction;
    Backend backend;
    TransferScheduler scheduler;
    chunk_key root;

    // Which chunks are in memory; its stopped() flag is set under its lock, first thing shutdown does.
    index_type index;
    // Tiered backends: moves chunks between memory and the tiers (made and started by create).
    // Declared after the index it points into, so it is destroyed first.
    std::unique_ptr<pipeline_type> pipeline;

    mutable std::atomic<std::uint64_t> lookups{0}, hit_chunks{0}, miss_chunks{0}, hit_tokens{0}, queried_tokens{0};
    std::atomic<std::uint64_t> stored_chunks{0}, retrieved_chunks{0}, bytes_stored{0}, bytes_loaded{0},
        transfer_failures{0};
    mutable detail::atomic_histogram lookup_latency;
    detail::atomic_histogram store_latency, retrieve_latency;
  };

  basic_engine() = default;

  static std::unexpected<error> stopped_error(const char* op) {
    return std::unexpected(error{errc::shut_down, std::string(op) + ": the engine was shut down"});
  }

  [[nodiscard]] std::shared_ptr<operation> new_operation(bool storing, detail::clock::time_point t0,
                                                         detail::atomic_histogram* latency) const {
    return std::make_shared<operation>(s_.get(), link_, storing, t0, latency);
  }

  // Pins the leading chunks in memory, then (with tiers) brings the next ones up. With `pipelined`
  // every layer of each chunk is submitted as soon as the chunk is in memory.
  result<layered_transfer> begin_retrieve_impl(std::span<const token_id> tokens, const kv_layout& dst,
                                               std::span<const std::int32_t> block_table,
                                               const transfer_hints* pipelined, key_salt salt) {
    if (!s_) return stopped_error("retrieve");
    const auto t0 = detail::clock::now();
    if (tokens.empty()) return fail(errc::invalid_argument, "retrieve: empty token list");
    if (auto v = check_layout(dst, "retrieve"); !v) return std::unexpected(v.error());
    // Two copies writing the same bytes would race (and the last one would win at random).
    if (auto v = dst.check_destination(); !v) return fail(v.error().code, "retrieve: " + v.error().message);
    if (auto v = dst.check_table(block_table, tokens.size(), /*distinct=*/true, /*skips=*/true); !v)
      return fail(v.error().code, "retrieve: " + v.error().message);
    auto keys = keys_of(tokens, salt);
    keys.resize(usable_chunks(tokens.size(), dst));
    auto& st = *s_;
    auto op = new_operation(false, t0, &st.retrieve_latency);
    op->layout = dst;
    op->table.assign(block_table.begin(), block_table.end());
    {
      std::unique_lock lk(st.index.mutex());
      if (st.index.stopped().load(std::memory_order_relaxed)) return stopped_error("retrieve");
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const std::size_t ntok = chunk_tokens_of(tokens, i).size();
        auto* e = st.index.pin_locked(keys[i], chunk_bytes(ntok));
        if (e == nullptr) break;
        op->chunks.push_back({{i, keys[i], e->handle, e->bytes}, i * st.cfg.chunk_tokens, ntok});
        op->value += ntok;
      }
    }
    layered_transfer out(op);
    if (pipelined) {
      std::lock_guard lk(op->m);
      op->layer_sent.assign(dst.num_layers(), true);
    }
    const auto submit_new = [&](std::size_t from) -> result<void> {
      if (!pipelined || from == op->chunks.size()) return {};
      return submit_range(op, from, op->chunks.size(), 0, dst.num_layers(), *pipelined);
    };
    if (auto r = submit_new(0); !r) return std::unexpected(r.error());
    if constexpr (tiered) {
      if (op->chunks.size() < keys.size()) {
        std::vector<std::size_t> sizes(keys.size());
        for (std::size_t i = 0; i < keys.size(); ++i) sizes[i] = chunk_bytes(chunk_tokens_of(tokens, i).size());
        // Entered on the link: shutdown must wait for a promotion reading into reserved memory.
        if (!link_->enter(/*submission=*/true)) return stopped_error("retrieve");
        struct leave_link {
          detail::engine_link& l;
          ~leave_link() { l.leave(); }
        } left{*link_};
        std::optional<error> err;
        (void)st.pipeline->promote(keys, sizes, op->chunks.size(), t0 + st.cfg.tiering.promotion_timeout,
                                   /*keep_pinned=*/true, [&](std::span<const reservation> got) {
                                     const std::size_t from = op->chunks.size();
                                     for (const auto& r : got) {
                                       const std::size_t ntok = chunk_tokens_of(tokens, r.index).size();
                                       op->chunks.push_back({r, r.index * st.cfg.chunk_tokens, ntok});
                                       op->value += ntok;
                                     }
                                     if (auto sr = submit_new(from); !sr && !err) err = sr.error();
                                   });
        if (err) return std::unexpected(std::move(*err));
      }
    }
    st.hit_chunks.fetch_add(op->chunks.size(), std::memory_order_relaxed);
    st.miss_chunks.fetch_add(keys.size() - op->chunks.size(), std::memory_order_relaxed);
    return out;
  }

  result<std::size_t> lookup_impl(std::span<const token_id> tokens, tiered_lookup* detail_out, key_salt salt) const {
    if (!s_) return stopped_error("lookup");
    if (tokens.empty()) return fail(errc::invalid_argument, "lookup: empty token list");
    const auto t0 = detail::clock::now();
    auto& st = *s_;
    if (st.index.stopped().load(std::memory_order_acquire)) return stopped_error("lookup");
    const chunk_key root = root_of(salt);
    const std::size_t n = chunk_count(tokens.size());
    // The first chunk alone, then the rest in one batch under one lock: a miss costs one hash,
    // a hit pays the lock once instead of once per chunk.
    thread_local std::vector<chunk_key> keys;
    keys.resize(n);
    std::size_t hit = 0, hit_tokens = 0, hashed = 0;
    const auto walk = [&](std::size_t end) {
      for (std::size_t i = hashed; i < end; ++i) keys[i] = st.hasher.chain(i == 0 ? root : keys[i - 1], chunk_tokens_of(tokens, i));
      hashed = std::max(hashed, end);
      std::shared_lock lk(st.index.mutex());
      for (; hit < end; ++hit) {
        const std::size_t ntok = chunk_tokens_of(tokens, hit).size();
        if (!st.index.usable_locked(keys[hit], chunk_bytes(ntok))) return false;
        hit_tokens += ntok;
      }
      return true;
    };
    if (n > 0 && walk(1)) walk(n);
    const std::size_t memory_tokens = hit_tokens;
    if (detail_out) {
      detail_out->memory_tokens = memory_tokens;
      detail_out->tiers.clear();
    }
    std::size_t below = 0;
    if constexpr (tiered) {
      if (hit < n) {
        for (std::size_t i = hashed; i < n; ++i) keys[i] = st.hasher.chain(i == 0 ? root : keys[i - 1], chunk_tokens_of(tokens, i));
        thread_local std::vector<std::uint8_t> source;
        std::array<std::size_t, Backend::tier_count> found{};
        below = st.pipeline->probe(std::span<const chunk_key>(keys.data(), n), hit, source, found, /*count_lookup=*/true);
        std::array<std::size_t, Backend::tier_count> tier_tokens{};
        for (std::size_t i = hit; i < hit + below; ++i) {
          const std::size_t ntok = chunk_tokens_of(tokens, i).size();
          tier_tokens[source[i]] += ntok;
          hit_tokens += ntok;
        }
        if (detail_out)
          for (std::size_t j = 0; j < Backend::tier_count; ++j)
            detail_out->tiers.push_back({st.backend.tier_name(j), tier_tokens[j]});
      } else if (detail_out) {
        for (std::size_t j = 0; j < Backend::tier_count; ++j) detail_out->tiers.push_back({st.backend.tier_name(j), 0});
      }
    }
    if (detail_out) detail_out->tokens = hit_tokens;
    st.lookups.fetch_add(1, std::memory_order_relaxed);
    st.hit_chunks.fetch_add(hit + below, std::memory_order_relaxed);
    st.miss_chunks.fetch_add(n - hit - below, std::memory_order_relaxed);
    st.hit_tokens.fetch_add(hit_tokens, std::memory_order_relaxed);
    st.queried_tokens.fetch_add(tokens.size(), std::memory_order_relaxed);
    st.lookup_latency.record(detail::elapsed_ns(t0));
    return hit_tokens;
  }

  // The salt becomes a pseudo-chunk of more than `chunk_tokens` tokens (a length no real chunk
  // has), so no salted root equals the key of a real first chunk.
  [[nodiscard]] chunk_key root_of(key_salt salt) const {
    if (salt.empty()) return s_->root;
    const std::size_t words = 1 + (salt.size() + sizeof(token_id) - 1) / sizeof(token_id);
    std::vector<token_id> pseudo(std::max(words, s_->cfg.chunk_tokens + 1), 0);
    pseudo[0] = static_cast<token_id>(static_cast<std::uint32_t>(salt.size()));
    std::memcpy(pseudo.data() + 1, salt.data(), salt.size());
    return s_->hasher.chain(s_->root, pseudo);
  }

  [[nodiscard]] std::vector<chunk_key> keys_of(std::span<const token_id> tokens, key_salt salt) const {
    std::vector<chunk_key> keys;
    keys.reserve(chunk_count(tokens.size()));
    chunk_key k = root_of(salt);
    for (std::size_t i = 0, n = chunk_count(tokens.size()); i < n; ++i) {
      k = s_->hasher.chain(k, chunk_tokens_of(tokens, i));
      keys.push_back(k);
    }
    return keys;
  }

  // Destination ranges of one batch must not overlap: split across threads, two copies would
  // write the same bytes.
  [[nodiscard]] static result<void> check_disjoint(const char* op, std::span<std::byte* const> ptrs,
                                                   std::span<const std::size_t> sizes) {
    std::vector<std::size_t> order(ptrs.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    const auto addr = [&](std::size_t i) { return reinterpret_cast<std::uintptr_t>(ptrs[i]); };
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return addr(a) < addr(b); });
    for (std::size_t j = 1; j < order.size(); ++j) {
      const std::size_t a = order[j - 1], b = order[j];
      if (addr(b) - addr(a) < sizes[a])
        return fail(errc::invalid_argument, std::string(op) + ": destination " + std::to_string(b) +
                                                " overlaps destination " + std::to_string(a));
    }
    return {};
  }

  [[nodiscard]] std::size_t chunk_count(std::size_t tokens) const noexcept {
    const std::size_t c = s_->cfg.chunk_tokens;
    return tokens / c + (s_->cfg.store_partial_chunks && tokens % c != 0 ? 1 : 0);
  }

  [[nodiscard]] std::span<const token_id> chunk_tokens_of(std::span<const token_id> tokens, std::size_t i) const {
    const std::size_t c = s_->cfg.chunk_tokens;
    return tokens.subspan(i * c, std::min(c, tokens.size() - i * c));
  }
  [[nodiscard]] std::size_t chunk_bytes(std::size_t ntok) const noexcept {
    return ntok * s_->cfg.geometry.token_bytes();
  }

  [[nodiscard]] result<void> check_layout(const kv_layout& l, const char* op) const {
    const std::string o(op);
    if (l.location() == memory_location::device && !detail::reaches_device_memory<TransferScheduler>)
      return fail(errc::unsupported, o + ": this engine's transfer scheduler cannot reach device memory");
    const auto& g = s_->cfg.geometry;
    if (l.num_layers() == 0) return fail(errc::invalid_layout, o + ": empty layout");
    if (!(l.geometry() == g))
      return fail(errc::size_mismatch,
                  o + ": layout geometry (" + std::to_string(l.geometry().num_layers) + " layers x " +
                      std::to_string(l.geometry().kv_planes) + " planes x " + std::to_string(l.geometry().kv_heads) +
                      " heads x " + std::to_string(l.geometry().head_dim) + " x " +
                      std::to_string(l.geometry().element_bytes) + " B) differs from the engine's (" +
                      std::to_string(g.num_layers) + " x " + std::to_string(g.kv_planes) + " x " +
                      std::to_string(g.kv_heads) + " x " + std::to_string(g.head_dim) + " x " +
                      std::to_string(g.element_bytes) + " B)");
    return {};
  }

  template <class Ptr>
  [[nodiscard]] result<void> check_key_args(const char* op, std::size_t nkeys, std::span<Ptr> ptrs,
                                            std::span<const std::size_t> sizes) const {
    const std::string o(op);
    if (nkeys == 0) return fail(errc::invalid_argument, o + ": empty key list");
    if (ptrs.size() != nkeys || sizes.size() != nkeys)
      return fail(errc::size_mismatch, o + ": " + std::to_string(nkeys) + " keys, " + std::to_string(ptrs.size()) +
                                           " pointers and " + std::to_string(sizes.size()) + " sizes");
    for (std::size_t i = 0; i < nkeys; ++i) {
      if (ptrs[i] == nullptr) return fail(errc::invalid_argument, o + ": pointer " + std::to_string(i) + " is null");
      if (sizes[i] == 0) return fail(errc::invalid_argument, o + ": size " + std::to_string(i) + " is zero");
      if (sizes[i] > s_->cfg.capacity_bytes)
        return fail(errc::size_mismatch, o + ": size " + std::to_string(i) + " (" + std::to_string(sizes[i]) +
                                             ") exceeds the capacity (" + std::to_string(s_->cfg.capacity_bytes) + ")");
    }
    return {};
  }

  // Reserves the chunks of a store (see chunk_index::reserve_all). Entered on the link: the
  // index lock is let go every few keys (so a huge save_blocks cannot stall lookups), and
  // shutdown must not free what is held across those gaps.
  result<std::vector<reservation>> reserve_all(std::span<const chunk_key> keys, std::span<const std::size_t> sizes,
                                               const char* op, bool prefix) {
    if (!link_->enter(/*submission=*/true)) return stopped_error(op);
    struct leave_link {
      detail::engine_link& l;
      ~leave_link() { l.leave(); }
    } left{*link_};
    return s_->index.reserve_all(keys, sizes, op, prefix);
  }

  // Chunks of a prompt this layout can carry: layouts of opaque pages take whole blocks only.
  [[nodiscard]] std::size_t usable_chunks(std::size_t tokens, const kv_layout& l) const noexcept {
    const std::size_t n = chunk_count(tokens);
    if (n == 0 || !l.whole_blocks_only()) return n;
    const std::size_t last = tokens - (n - 1) * s_->cfg.chunk_tokens;
    return std::min(last, s_->cfg.chunk_tokens) % l.block_tokens() == 0 ? n : n - 1;
  }

  // Copies layers [first, first + count) of chunks [from, to) of `op`.
  static result<void> submit_range(const std::shared_ptr<operation>& opp, std::size_t from, std::size_t to,
                                   std::size_t first, std::size_t count, const transfer_hints& hints) {
    auto& op = *opp;
    if (from >= to) return {};
    if (!op.link->enter(/*submission=*/true)) return stopped_error("submit_layer");
    struct leave_on_exit {
      detail::engine_link& l;
      ~leave_on_exit() { l.leave(); }
    } guard{*op.link};
    state* const st = op.st;
    transfer_hints h = hints;
    h.direction = op.storing ? transfer_direction::to_store : transfer_direction::from_store;
    h.cache_location = op.layout.location();
    // Hand over a batch every `transfer_batch_bytes`, so the copies of the first chunks run while
    // the ops of later ones are built.
    const std::size_t layers = op.layout.num_layers();
    const std::size_t limit = st->cfg.transfer_batch_bytes;
    std::vector<copy_op> ops;
    std::size_t batch_bytes = 0;
    for (std::size_t i = from; i < to; ++i) {
      const auto& c = op.chunks[i];
      if (ops.empty()) {
        std::size_t n = 0;  // chunks this batch will hold, to size it once
        for (std::size_t b = 0, j = i; j < to && (limit == 0 || b < limit); ++j, ++n) b += op.chunks[j].r.bytes / layers * count;
        ops.reserve(n * op.layout.max_copies(c.tokens, first, count));
      }
      op.layout.append_copies(ops, op.table, c.first, c.tokens, st->backend.data(c.r.handle).data(), op.storing, first,
                              count);
      batch_bytes += c.r.bytes / layers * count;
      if ((limit != 0 && batch_bytes >= limit) || i + 1 == to) {
        submit_batch(opp, std::move(ops), h);
        ops = {};
        batch_bytes = 0;
      }
    }
    return {};
  }

  // Hands one batch to the scheduler. Called inside a submission (link entered), so the state
  // stays up; the batch holds its own entry until its completion has run.
  static void submit_batch(const std::shared_ptr<operation>& op, std::vector<copy_op> ops,
                           const transfer_hints& hints) {
    std::span<const copy_op> view;
    {
      std::lock_guard lk(op->m);
      view = op->batches.emplace_back(std::move(ops));
      ++op->outstanding;
    }
    const bool entered = op->link->enter(/*submission=*/false);  // cannot fail: the caller holds an entry
    (void)entered;
    auto& sched = op->st->scheduler;
    auto done = [op](result<void> r) { batch_done(op, std::move(r)); };
    if constexpr (requires { sched.submit(view, hints, transfer_callback(done)); })
      sched.submit(view, hints, transfer_callback(std::move(done)));
    else
      sched.submit(view, transfer_callback(std::move(done)));
  }

  static void batch_done(const std::shared_ptr<operation>& op, result<void> r) {
    bool last = false;
    {
      std::lock_guard lk(op->m);
      if (!r && !op->err) op->err = r.error();
      --op->outstanding;
      last = op->sealed && op->outstanding == 0 && !op->finalized;
      if (last) op->finalized = true;
    }
    if (last) finalize(*op);
    op->link->leave();  // the last touch of the state: shutdown may free it from here on
  }

  // No more batches will come; finalize now if none is in flight.
  static void seal(const std::shared_ptr<operation>& op, std::optional<error> e) {
    bool now = false;
    {
      std::lock_guard lk(op->m);
      if (op->sealed) return;
      if (e && !op->err) op->err = std::move(e);
      op->sealed = true;
      now = op->outstanding == 0 && !op->finalized;
      if (now) op->finalized = true;
    }
    if (!now) return;
    if (op->link->enter(/*submission=*/false)) {
      finalize(*op);
      op->link->leave();
    } else {
      // The engine is gone and took every chunk with it: only the ticket is left to complete.
      op->ticket->complete(fail(errc::shut_down, "the engine was shut down before the transfer finished"));
    }
  }

  // Publishes or rolls back a store, or unpins a retrieve; completes the ticket. Runs entered,
  // so the state stays up while the index lock is let go between groups of chunks.
  static constexpr std::size_t publish_per_hold = 64;
  static void finalize(operation& op) {
    state& st = *op.st;
    std::optional<error> err = op.err;
    std::uint64_t bytes = 0, chunks = 0;
    if (op.storing && !op.chunks.empty()) {
      std::vector<result<void>> commits;
      commits.reserve(op.chunks.size());
      for (const auto& c : op.chunks) commits.push_back(err ? result<void>{} : st.backend.commit(c.r.key, c.r.handle));
      {
        std::unique_lock lk(st.index.mutex());
        for (std::size_t i = 0; i < op.chunks.size(); ++i) {
          if (i % publish_per_hold == 0 && i != 0) {  // a huge save_blocks must not stall lookups
            lk.unlock();
            lk.lock();
          }
          const auto& c = op.chunks[i].r;
          if (err || !commits[i]) {
            if (!err) err = commits[i].error();
            st.index.drop_locked(c.key, c.handle, c.bytes);
            continue;
          }
          st.index.publish_locked(c.key, /*below=*/false);
          if constexpr (tiered) {
            // Write-through: queued (and pinned) now; the store does not wait for it.
            if (st.cfg.tiering.write == write_policy::write_through)
              st.pipeline->enqueue_locked(c.key, *st.index.find_locked(c.key));
          }
          bytes += c.bytes;
          ++chunks;
        }
      }
      st.index.changed().notify_all();  // promotions waiting for one of these chunks
      if constexpr (tiered) st.pipeline->report_drops();
    } else if (!op.chunks.empty()) {
      std::unique_lock lk(st.index.mutex());
      for (std::size_t i = 0; i < op.chunks.size(); ++i) {
        if (i % publish_per_hold == 0 && i != 0) {
          lk.unlock();
          lk.lock();
        }
        st.index.unpin_locked(op.chunks[i].r.key);
        bytes += op.chunks[i].r.bytes;
        ++chunks;
      }
    }
    if (op.storing) {
      st.stored_chunks.fetch_add(chunks, std::memory_order_relaxed);
      st.bytes_stored.fetch_add(bytes, std::memory_order_relaxed);
    } else if (!err) {
      st.retrieved_chunks.fetch_add(chunks, std::memory_order_relaxed);
      st.bytes_loaded.fetch_add(bytes, std::memory_order_relaxed);
    }
    if (err && !op.chunks.empty()) st.transfer_failures.fetch_add(1, std::memory_order_relaxed);
    if (op.latency) op.latency->record(detail::elapsed_ns(op.t0));
    if (err)
      op.ticket->complete(std::unexpected(std::move(*err)));
    else
      op.ticket->complete(op.value);
  }

  // One batch for the key API, waited for here.
  result<std::size_t> run_key_batch(std::shared_ptr<operation> op, std::vector<copy_op> ops) {
    transfer_ticket t(op->ticket);
    std::optional<error> err;
    if (!op->chunks.empty()) {
      if (op->link->enter(/*submission=*/true)) {
        submit_batch(op, std::move(ops), transfer_hints{});
        op->link->leave();
      } else {
        err = error{errc::shut_down, "the engine was shut down"};
      }
    }
    seal(op, std::move(err));
    return t.wait();
  }

  std::unique_ptr<state> s_;
  std::shared_ptr<detail::engine_link> link_;
};

}  // namespace kvortex
