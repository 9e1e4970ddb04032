#pragma once
/// @file redis_tier.hpp
/// @brief A storage tier in Redis, shared by every inference node that points at it: one server,
/// several independent servers (sharded by key), or a Redis Cluster. Values are the same
/// self-checking chunk records the disk tier writes. Linux; needs hiredis (Debian:
/// libhiredis-dev; CMake: KVORTEX_WITH_HIREDIS) and xxHash.

#if !__has_include(<hiredis/read.h>) || !__has_include(<xxhash.h>)
#error "kvortex/tiers/redis_tier.hpp needs hiredis and xxHash (Debian: apt-get install libhiredis-dev libxxhash-dev; CMake: KVORTEX_WITH_HIREDIS)"
#else

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kvortex/concepts/storage_tier.hpp"
#include "kvortex/detail/chunk_record.hpp"
#include "kvortex/detail/redis_connection.hpp"
#include "kvortex/detail/redis_protocol.hpp"
#include "kvortex/error.hpp"
#include "kvortex/logging.hpp"
#include "kvortex/stats.hpp"
#include "kvortex/tiers/redis_tier_config.hpp"
#include "kvortex/tiers/tier_stats.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

static_assert(detail::redis_record_header_bytes == detail::chunk_record_fixed_bytes,
              "redis_tier_config's record header size disagrees with the chunk record's");

/// @brief Counters of the tier's links to Redis (beside its `tier_stats`).
struct redis_link_stats {
  std::uint64_t exchanges{0};         ///< pipelined batches sent (one per server per round of a call)
  std::uint64_t connects{0};          ///< connections opened (handshake answered)
  std::uint64_t connect_failures{0};  ///< connection attempts refused, unreachable or failing AUTH/SELECT
  std::uint64_t reconnects{0};        ///< a server marked down answered again
  std::uint64_t timeouts{0};          ///< exchanges cut off by `command_timeout` (or `connect_timeout` in open)
  std::uint64_t disconnects{0};       ///< established connections lost (reset, closed, protocol error)
  std::uint64_t fast_failures{0};     ///< operations failed at once: their server was backing off
  std::uint64_t moved{0};             ///< MOVED redirects followed
  std::uint64_t ask{0};               ///< ASK redirects followed
  std::uint64_t slot_refreshes{0};    ///< slot maps loaded
  std::uint64_t servers{0};           ///< gauge: servers known (configured, seeds and discovered)
  std::uint64_t servers_down{0};      ///< gauge: servers backing off now
};

/// @brief Chunks in Redis. Key names are binary: `<key_prefix>{<16 hex digits of the key>}` then
/// the 32-byte namespace digest and the 32-byte chunk key (`detail::redis_key_name`); the hash
/// tag spreads chunks evenly over a cluster's slots. A prompt's chunks are deliberately not
/// tagged into one slot: `get`/`put` see only a chunk's key, and spreading balances the masters;
/// a batch (a prompt's lookup) goes to all its masters at once instead. A value is a chunk record (128-byte header:
/// magic, version, namespace, key, payload size, XXH3 checksums; then the payload), checked on
/// every read: a value that is foreign, corrupt, truncated, of another key or not a string is a
/// miss, counted in `corrupt_removed`, and deleted.
///
/// Every call is bounded by `command_timeout`: each batch is pipelined to every server it
/// involves at once (one round trip, servers in parallel), over non-blocking sockets polled
/// against one deadline. A server that fails (refused, reset, no answer in time, AUTH refused)
/// costs the keys it holds (misses: `read_errors`, dropped writes: `write_errors`) and is backed
/// off; once the backoff elapses the next call that needs it reconnects, so the tier recovers on
/// its own when Redis returns. A write reported failed may still land (Redis may have read it
/// before the deadline); it is whole or absent, never partial. `open` never waits past
/// `connect_timeout`, also when nothing listens or a server never answers.
///
/// Thread-safe: any number of threads may call any member at once; each call uses its own
/// connections. Redis' `maxmemory` policy is the capacity policy: `stats()`'s gauges (entries,
/// bytes_held, capacity_bytes) stay 0, and `evictions` counts nothing. A Redis `OOM` refusal
/// (maxmemory with `noeviction`) fails a put with errc::capacity_exhausted. Movable; a moved-from
/// tier answers every call with errc::shut_down (or nothing).
class redis_tier {
 public:
  static constexpr std::string_view name = "redis";

  /// @brief Connects to the configured servers (in parallel; a cluster's slot map from the first
  /// seed that answers), within `connect_timeout`. Fails with errc::invalid_config for a bad
  /// `cfg` or a cluster-mode tier whose seeds are not in cluster mode, and, with
  /// `require_connection`, errc::backend_failure when no server answered (the message says why).
  [[nodiscard]] static result<redis_tier> open(const redis_tier_config& cfg) {
    if (auto v = cfg.validate(); !v) return std::unexpected(std::move(v.error()));
    try {
      auto st = std::make_unique<state>(cfg);
      if (auto r = st->start(); !r) return std::unexpected(std::move(r.error()));
      return redis_tier(std::move(st));
    } catch (const std::bad_alloc&) {
      return fail(errc::out_of_memory, "redis tier: out of memory while opening");
    } catch (...) {
      return fail(errc::internal, "redis tier: unexpected exception while opening");
    }
  }

  redis_tier(redis_tier&&) noexcept = default;
  redis_tier& operator=(redis_tier&&) noexcept = default;
  redis_tier(const redis_tier&) = delete;
  redis_tier& operator=(const redis_tier&) = delete;
  ~redis_tier() = default;

  /// @brief Stores `bytes` as chunk `k` (SET, with PX `ttl` when set). Errors:
  /// errc::invalid_argument (empty, or above `max_chunk_bytes`), errc::capacity_exhausted (Redis
  /// refused with OOM), errc::backend_failure (server down, slow, or refusing; the message says which).
  [[nodiscard]] result<void> put(const chunk_key& k, std::span<const std::byte> bytes) {
    const std::span<const std::byte> one[1] = {bytes};
    auto r = put_many(std::span(&k, 1), one);
    return std::move(r.front());
  }

  /// @brief Reads chunk `k` into `out`, verified; returns its size. errc::not_found when absent
  /// (never stored, expired, evicted) or invalid (then deleted); errc::size_mismatch when `out`
  /// is smaller than the chunk; errc::backend_failure when its server is down or slow. May write
  /// anywhere in `out` on failure.
  [[nodiscard]] result<std::size_t> get(const chunk_key& k, std::span<std::byte> out) {
    const std::span<std::byte> one[1] = {out};
    auto r = get_many(std::span(&k, 1), one);
    return std::move(r.front());
  }

  /// @brief Stores `values[i]` as chunk `keys[i]` for every i, in one pipelined round trip per
  /// server involved (all servers at once); one result per key, as `put` describes.
  [[nodiscard]] std::vector<result<void>> put_many(std::span<const chunk_key> keys,
                                                   std::span<const std::span<const std::byte>> values) {
    if (!s_) return std::vector<result<void>>(keys.size(), fail(errc::shut_down, "redis_tier was moved from"));
    return s_->guard<std::vector<result<void>>>(keys.size(), [&] { return s_->put_many(keys, values); });
  }

  /// @brief Reads chunk `keys[i]` into `outs[i]` for every i, pipelined like `put_many`; one
  /// result per key, as `get` describes.
  [[nodiscard]] std::vector<result<std::size_t>> get_many(std::span<const chunk_key> keys,
                                                          std::span<const std::span<std::byte>> outs) {
    if (!s_) return std::vector<result<std::size_t>>(keys.size(), fail(errc::shut_down, "redis_tier was moved from"));
    return s_->guard<std::vector<result<std::size_t>>>(keys.size(), [&] { return s_->get_many(keys, outs); });
  }

  /// @brief How many leading `keys` Redis holds: one pipelined EXISTS per key, all servers at
  /// once, one round trip. Keys on a server that is down or slow count as absent.
  [[nodiscard]] std::size_t contains(std::span<const chunk_key> keys) {
    if (!s_) return 0;
    try {
      return s_->contains(keys);
    } catch (...) {
      return 0;
    }
  }

  /// @brief Deletes chunk `k` (UNLINK), best effort within `command_timeout`.
  void remove(const chunk_key& k) noexcept {
    if (!s_) return;
    try {
      s_->remove(std::span(&k, 1));
    } catch (...) {
    }
  }

  /// @brief Every server in use (standalone: all; cluster: every master of the slot map) answers
  /// PING within `command_timeout`; else the first failure.
  [[nodiscard]] result<void> ping() {
    if (!s_) return fail(errc::shut_down, "redis_tier was moved from");
    try {
      return s_->ping();
    } catch (const std::bad_alloc&) {
      return fail(errc::out_of_memory, "redis tier: out of memory");
    } catch (...) {
      return fail(errc::internal, "redis tier: unexpected exception");
    }
  }

  [[nodiscard]] tier_stats stats() const { return s_ ? s_->snapshot() : tier_stats{}; }
  [[nodiscard]] redis_link_stats link_stats() const { return s_ ? s_->link_snapshot() : redis_link_stats{}; }

  /// @brief The Redis key chunk `k` is stored under.
  [[nodiscard]] std::string key_of(const chunk_key& k) const {
    return s_ ? detail::redis_key_name(s_->cfg.key_prefix, s_->cfg.ns, k) : std::string{};
  }
  /// @brief The server a call for chunk `k` goes to first (cluster: per the current slot map;
  /// nullopt while the map lacks its slot).
  [[nodiscard]] std::optional<redis_endpoint> server_of(const chunk_key& k) const { return s_ ? s_->server_of(k) : std::nullopt; }
  /// @brief The configuration the tier was opened with.
  [[nodiscard]] const redis_tier_config& config() const noexcept {
    static const redis_tier_config none{};
    return s_ ? s_->cfg : none;
  }

 private:
  using clock = detail::redis_clock;
  static constexpr std::uint16_t no_node = 0xFFFF;
  static constexpr std::size_t max_nodes = 4096;
  // A reply above Redis' default bulk limit (proto-max-bulk-len, 512 MB) fails its connection:
  // bounds what a broken server can make us buffer. Not max_chunk_bytes: a peer with a larger
  // limit may store larger chunks, which are then misses here, not a lost connection.
  static constexpr std::size_t max_reply_bytes = (std::size_t{512} << 20) + (std::size_t{1} << 20);

  struct node {
    redis_endpoint ep;
    std::string label;  // "host:port"
    std::uint16_t id{0};
    std::mutex mu;
    std::vector<detail::socket_address> addrs;  // under mu: re-resolved by a probe when empty
    std::vector<std::unique_ptr<detail::redis_connection>> idle;
    std::uint64_t generation{0};  // bumped when the node fails: older connections are not pooled
    bool down{false};
    bool probing{false};
    unsigned failures{0};
    clock::time_point retry_at{};
    std::string last_error;
  };

  struct state;

  // A connection taken from a node for one exchange; given back by state::release, or, if a
  // call unwinds (bad_alloc), by the destructor, as a failed connection.
  struct lease {
    state* owner{nullptr};
    node* n{nullptr};
    std::unique_ptr<detail::redis_connection> c;
    std::uint64_t generation{0};
    bool fresh{false};    // opened for this call: its handshake is part of the exchange
    bool probe{false};    // the one attempt at a node that was down
    bool discard{false};  // not needed after all: drop it without counting a failure

    lease() = default;
    lease(state* o, node* nd, std::unique_ptr<detail::redis_connection> conn, std::uint64_t gen, bool f, bool p) noexcept
        : owner(o), n(nd), c(std::move(conn)), generation(gen), fresh(f), probe(p) {}
    lease(lease&& o) noexcept
        : owner(o.owner), n(o.n), c(std::move(o.c)), generation(o.generation), fresh(o.fresh), probe(o.probe), discard(o.discard) {}
    lease& operator=(lease&& o) noexcept {
      if (this != &o) {
        abandon();
        owner = o.owner;
        n = o.n;
        c = std::move(o.c);
        generation = o.generation;
        fresh = o.fresh;
        probe = o.probe;
        discard = o.discard;
      }
      return *this;
    }
    ~lease() { abandon(); }
    void abandon() noexcept;
  };

  enum class op_kind : std::uint8_t { get, put, exists, del, ping, slots };

  struct op {
    op_kind kind{op_kind::get};
    const chunk_key* key{nullptr};
    std::string rkey;
    std::uint16_t slot{0};
    std::span<const std::byte> in;
    std::span<std::byte> out;
    std::array<std::byte, detail::chunk_record_fixed_bytes> header{};
    detail::chunk_record_expect expect{};
    node* target{nullptr};
    bool asking{false};       // send ASKING first (an ASK redirect, one time)
    bool asking_sent{false};
    unsigned redirects{0};
    bool done{false};
    std::optional<error> err;  // set when done and failed
    std::size_t bytes{0};      // get: payload size
    bool exists{false};
    bool corrupt{false};
    std::unique_ptr<detail::resp_reply> reply;  // slots: the CLUSTER SLOTS reply
  };

  struct exchange {
    node* n{nullptr};
    std::vector<op*> ops;
    lease l;
    bool live{false};
    detail::resp_request req;
  };

  struct state {
    redis_tier_config cfg;
    detail::redis_handshake hs;
    std::size_t max_reply;

    mutable std::shared_mutex route_mu;
    std::vector<std::unique_ptr<node>> nodes;  // standalone: cfg.servers in order
    std::unordered_map<std::string, std::uint16_t> node_ids;
    std::array<std::uint16_t, detail::redis_cluster_slots> slot_owner;
    bool have_map{false};

    std::mutex refresh_mu;
    clock::time_point last_refresh{};
    std::atomic<bool> refresh_wanted{false};

    std::atomic<std::uint64_t> jitter_state;
    std::atomic<std::uint64_t> hits{0}, misses{0}, writes{0}, bytes_read{0}, bytes_written{0}, read_errors{0},
        write_errors{0}, rejected_writes{0}, corrupt_removed{0};
    std::atomic<std::uint64_t> exchanges{0}, connects{0}, connect_failures{0}, reconnects{0}, timeouts{0},
        disconnects{0}, fast_failures{0}, moved{0}, ask{0}, slot_refreshes{0};
    detail::atomic_histogram read_latency, write_latency;

    explicit state(const redis_tier_config& c)
        : cfg(c),
          max_reply(max_reply_bytes),
          jitter_state(static_cast<std::uint64_t>(clock::now().time_since_epoch().count()) ^ reinterpret_cast<std::uintptr_t>(this)) {
      hs.username = cfg.username;
      hs.password = cfg.password;
      hs.database = cfg.database;
      slot_owner.fill(no_node);
    }

    [[nodiscard]] bool cluster() const noexcept { return cfg.mode == redis_mode::cluster; }

    // Logs through kvortex/logging.hpp; `message` runs only when the level is wanted. Called
    // with no lock of the tier held.
    template <class F>
    static void note(log_level level, std::string_view event, F&& message) noexcept {
      if (!kvortex::detail::log_enabled(level)) return;
      try {
        kvortex::detail::log(level, "redis", event, message());
      } catch (...) {  // no memory for the message: the record is lost
      }
    }

    template <class R, class F>
    R guard(std::size_t n, F&& f) noexcept {
      try {
        return f();
      } catch (const std::bad_alloc&) {
        try {
          return R(n, fail(errc::out_of_memory, "redis tier: out of memory"));
        } catch (...) {
          return R{};
        }
      } catch (...) {
        try {
          return R(n, fail(errc::internal, "redis tier: unexpected exception"));
        } catch (...) {
          return R{};
        }
      }
    }

    // ---- nodes ---------------------------------------------------------------------------------

    // The node of `ep`, created (and resolved) the first time; null when too many are known.
    node* node_for(const redis_endpoint& ep) {
      const std::string label = ep.text();
      {
        std::shared_lock lk(route_mu);
        if (const auto it = node_ids.find(label); it != node_ids.end()) return nodes[it->second].get();
      }
      auto addrs = detail::resolve(ep);  // outside the lock: a name lookup may take a while
      std::unique_lock lk(route_mu);
      if (const auto it = node_ids.find(label); it != node_ids.end()) return nodes[it->second].get();
      if (nodes.size() >= max_nodes) return nullptr;
      auto n = std::make_unique<node>();
      n->ep = ep;
      n->label = label;
      n->id = static_cast<std::uint16_t>(nodes.size());
      if (addrs) n->addrs = std::move(*addrs);
      else n->last_error = addrs.error().message;
      node* raw = n.get();
      node_ids.emplace(label, n->id);
      nodes.push_back(std::move(n));
      return raw;
    }

    std::chrono::milliseconds backoff(unsigned failures) noexcept {
      auto d = cfg.reconnect_backoff_min;
      for (unsigned i = 1; i < failures && d < cfg.reconnect_backoff_max; ++i) d *= 2;
      d = std::min(d, cfg.reconnect_backoff_max);
      // +-25% jitter, so clients that lost a server together do not return together.
      std::uint64_t x = jitter_state.fetch_add(0x9E3779B97F4A7C15ull, std::memory_order_relaxed);
      x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
      x ^= x >> 31;
      const double f = 0.75 + 0.5 * static_cast<double>(x >> 11) / static_cast<double>(std::uint64_t{1} << 53);
      return std::chrono::milliseconds(std::max<std::int64_t>(1, static_cast<std::int64_t>(static_cast<double>(d.count()) * f)));
    }

    void mark_down_locked(node& n, const std::string& why) noexcept {
      n.failures = n.down ? n.failures + 1 : 1;
      n.down = true;
      n.retry_at = clock::now() + backoff(n.failures);
      try {
        n.last_error = why;
      } catch (...) {
        n.last_error.clear();
      }
      ++n.generation;
      n.idle.clear();
      if (cluster()) refresh_wanted.store(true, std::memory_order_relaxed);
    }

    // A connection to `n`: an idle one, else a new one (connecting; its handshake goes out with
    // the first request). Fails at once while `n` backs off.
    result<lease> acquire(node& n) {
      std::unique_lock lk(n.mu);
      while (!n.idle.empty()) {
        auto c = std::move(n.idle.back());
        n.idle.pop_back();
        if (c->idle_healthy()) return lease(this, &n, std::move(c), n.generation, false, false);
      }
      const auto now = clock::now();
      if (n.down && (now < n.retry_at || n.probing)) {
        const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(n.retry_at - now).count();
        return fail(errc::backend_failure, "redis " + n.label + " is down (" + n.last_error + "); next attempt in " +
                                               std::to_string(std::max<long long>(0, wait)) + " ms");
      }
      const bool probe = n.down;
      if (probe) n.probing = true;
      const std::uint64_t gen = n.generation;
      std::vector<detail::socket_address> addrs = n.addrs;
      lk.unlock();
      const auto undo = [&] {
        if (!probe) return;
        std::lock_guard relock(n.mu);
        n.probing = false;
      };
      if (addrs.empty()) {  // the name did not resolve before: try again, once per backoff
        auto r = detail::resolve(n.ep);
        std::lock_guard relock(n.mu);
        if (!r) {
          n.probing = false;
          mark_down_locked(n, r.error().message);
          connect_failures.fetch_add(1, std::memory_order_relaxed);
          return std::unexpected(std::move(r.error()));  // a name that never resolved: never up, nothing lost
        }
        n.addrs = *r;
        addrs = std::move(*r);
      }
      try {
        auto c = std::make_unique<detail::redis_connection>(std::move(addrs), n.label, hs, cfg.connect_timeout, max_reply);
        return lease(this, &n, std::move(c), gen, true, probe);
      } catch (...) {
        undo();
        throw;
      }
    }

    void release(lease& l) noexcept {
      if (!l.c) return;
      node& n = *l.n;
      const bool healthy = !l.c->failed();
      enum class news : std::uint8_t { none, restored, lost, timed_out } what = news::none;
      unsigned failed_attempts = 0;
      {
        std::lock_guard lk(n.mu);
        if (l.probe) n.probing = false;
        if (l.discard) {
          l.c.reset();
          return;
        }
        if (healthy) {
          if (l.fresh) connects.fetch_add(1, std::memory_order_relaxed);
          if (n.down && l.fresh) {
            failed_attempts = n.failures;
            n.down = false;
            n.failures = 0;
            reconnects.fetch_add(1, std::memory_order_relaxed);
            what = news::restored;
          }
          if (!n.down && l.generation == n.generation && n.idle.size() < cfg.connections_per_server) {
            try {
              n.idle.push_back(std::move(l.c));
            } catch (...) {  // no room to keep it: close it
            }
          }
        } else {
          const bool was_up = !n.down;
          if (l.c->timed_out())
            timeouts.fetch_add(1, std::memory_order_relaxed);
          else if (l.fresh && !l.c->established())
            connect_failures.fetch_add(1, std::memory_order_relaxed);
          else
            disconnects.fetch_add(1, std::memory_order_relaxed);
          if (l.generation == n.generation) {
            mark_down_locked(n, l.c->failure());
            // A timeout is reported each time (rate-limited); a lost server once, when it goes down.
            if (l.c->timed_out()) what = news::timed_out;
            else if (was_up) what = news::lost;
          }
        }
      }
      // Logged outside the node's lock, which every call to this server needs.
      switch (what) {
        case news::none: break;
        case news::restored:
          note(log_level::info, "connection_restored", [&] {
            return n.label + ": connection restored after " + std::to_string(failed_attempts) + " failed attempt" +
                   (failed_attempts == 1 ? "" : "s");
          });
          break;
        case news::lost:
          note(log_level::warning, "connection_lost", [&] {
            return n.label + ": " + l.c->failure() + "; its keys are misses and its writes dropped until it answers again";
          });
          break;
        case news::timed_out:
          note(log_level::warning, "command_timeout", [&] {
            return n.label + ": " + l.c->failure() + "; backing off";
          });
          break;
      }
      l.c.reset();
    }

    // ---- routing -------------------------------------------------------------------------------

    node* route_locked(const op& o) const {
      if (o.target != nullptr) return o.target;
      if (!cluster()) return nodes[detail::shard_of(*o.key, cfg.servers.size())].get();
      const std::uint16_t id = slot_owner[o.slot];
      return id == no_node ? nullptr : nodes[id].get();
    }

    std::optional<redis_endpoint> server_of(const chunk_key& k) const {
      op o;
      o.key = &k;
      o.slot = detail::key_hash_slot(detail::redis_key_name(cfg.key_prefix, cfg.ns, k));
      std::shared_lock lk(route_mu);
      const node* n = route_locked(o);
      if (n == nullptr) return std::nullopt;
      return n->ep;
    }

    void apply_slot_map(const std::vector<detail::slot_range>& ranges) {
      std::array<std::uint16_t, detail::redis_cluster_slots> owner;
      owner.fill(no_node);
      for (const auto& r : ranges) {
        node* n = node_for(r.master);
        if (n == nullptr) continue;
        std::fill(owner.begin() + r.first, owner.begin() + r.last + 1, n->id);
      }
      std::size_t moved_slots = 0, masters = 0;
      bool first = false;
      {
        std::unique_lock lk(route_mu);
        first = !have_map;
        for (std::size_t i = 0; i < owner.size(); ++i) moved_slots += owner[i] != slot_owner[i] ? 1 : 0;
        std::vector<bool> seen(nodes.size(), false);
        for (const std::uint16_t id : owner)
          if (id != no_node && !seen[id]) seen[id] = true, ++masters;
        slot_owner = owner;
        have_map = true;
      }
      slot_refreshes.fetch_add(1, std::memory_order_relaxed);
      // The first map is routine; a later one that moves slots follows a failover or a reshard.
      if (first || moved_slots != 0) {
        note(first ? log_level::debug : log_level::info, first ? "slot_map_loaded" : "slot_map_reloaded", [&] {
          return "redis cluster: slot map " + std::string(first ? "loaded" : "reloaded") + ": " + std::to_string(masters) +
                 " master" + (masters == 1 ? "" : "s") + (first ? "" : ", " + std::to_string(moved_slots) + " slots moved");
        });
      }
    }

    // Loads the slot map from up to `fanout` servers at once (the first valid answer wins).
    // Returns an error naming why no map came; sets `not_cluster` when a server answered that it
    // is not in cluster mode.
    result<void> refresh_slots(clock::time_point deadline, std::chrono::milliseconds budget, std::size_t fanout,
                               bool& not_cluster) {
      // Masters of the current map first, then the rest (seeds, replicas that became masters).
      std::vector<node*> candidates;
      {
        std::shared_lock lk(route_mu);
        std::vector<bool> master(nodes.size(), false);
        for (const std::uint16_t id : slot_owner)
          if (id != no_node) master[id] = true;
        for (const auto& n : nodes)
          if (master[n->id]) candidates.push_back(n.get());
        for (const auto& n : nodes)
          if (!master[n->id]) candidates.push_back(n.get());
      }
      std::vector<op> ops(candidates.size());
      std::string why = "no server to ask";
      std::size_t started = 0;
      std::vector<op*> batch;
      for (std::size_t i = 0; i < candidates.size() && started < fanout; ++i) {
        ops[i].kind = op_kind::slots;
        ops[i].target = candidates[i];
        batch.push_back(&ops[i]);
        ++started;
      }
      run_round(batch, deadline, budget, /*first_answer_wins=*/true);
      for (std::size_t i = 0; i < batch.size(); ++i) {
        op& o = *batch[i];
        if (o.err) {
          why = o.err->message;
          continue;
        }
        if (!o.reply) continue;
        if (o.reply->type == detail::resp_reply::kind::error && o.reply->text.find("cluster support disabled") != std::string::npos) {
          not_cluster = true;
          why = candidates[i]->label + " is not in cluster mode (" + o.reply->text + ")";
          continue;
        }
        auto ranges = detail::parse_cluster_slots(*o.reply, candidates[i]->ep.host);
        if (!ranges) {
          why = candidates[i]->label + ": " + ranges.error().message;
          continue;
        }
        if (ranges->empty()) {
          why = candidates[i]->label + " serves no slots yet";
          continue;
        }
        apply_slot_map(*ranges);
        return {};
      }
      return fail(errc::backend_failure, "redis cluster: no slot map: " + why);
    }

    void maybe_refresh(clock::time_point deadline) {
      if (!cluster()) return;
      bool mapped;
      {
        std::shared_lock lk(route_mu);
        mapped = have_map;
      }
      if (mapped && !refresh_wanted.load(std::memory_order_relaxed)) return;
      std::unique_lock lk(refresh_mu, std::try_to_lock);
      if (!lk.owns_lock()) return;  // another call is refreshing; use the map we have
      const auto now = clock::now();
      if (now - last_refresh < cfg.slot_refresh_interval) return;
      last_refresh = now;
      refresh_wanted.store(false, std::memory_order_relaxed);
      bool not_cluster = false;
      if (!refresh_slots(deadline, cfg.command_timeout, 3, not_cluster)) refresh_wanted.store(true, std::memory_order_relaxed);
    }

    // ---- exchanges -----------------------------------------------------------------------------

    static void finish(op& o, errc c, std::string msg) {
      o.done = true;
      o.err = error{c, std::move(msg)};
    }
    static void succeed(op& o) {
      o.done = true;
      o.err.reset();
    }

    void add_command(detail::resp_request& req, op& o, std::vector<detail::reply_sink>& sinks) {
      o.asking_sent = o.asking;
      if (o.asking) {
        req.command(1);
        req.arg("ASKING");
        sinks.push_back({});
      }
      switch (o.kind) {
        case op_kind::get:
          req.command(2);
          req.arg("GET");
          req.arg(o.rkey);
          sinks.push_back({&o.expect, o.out});
          return;
        case op_kind::put:
          req.command(cfg.ttl.count() > 0 ? 5 : 3);
          req.arg("SET");
          req.arg(o.rkey);
          req.arg_record(o.header, o.in);
          if (cfg.ttl.count() > 0) {
            req.arg("PX");
            req.arg(static_cast<std::uint64_t>(cfg.ttl.count()));
          }
          break;
        case op_kind::exists:
          req.command(2);
          req.arg("EXISTS");
          req.arg(o.rkey);
          break;
        case op_kind::del:
          req.command(2);
          req.arg("UNLINK");
          req.arg(o.rkey);
          break;
        case op_kind::ping:
          req.command(1);
          req.arg("PING");
          break;
        case op_kind::slots:
          req.command(2);
          req.arg("CLUSTER");
          req.arg("SLOTS");
          break;
      }
      sinks.push_back({});
    }

    void on_reply(op& o, node& from, std::unique_ptr<detail::resp_reply> rp) {
      using kind = detail::resp_reply::kind;
      const detail::resp_reply& r = *rp;
      if (o.kind == op_kind::slots) {
        o.reply = std::move(rp);
        succeed(o);
        return;
      }
      if (r.type == kind::error) {
        if (r.is_error("MOVED") || r.is_error("ASK")) {
          const auto rd = detail::parse_redirect(r.text, from.ep.host);
          if (!cluster())
            return finish(o, errc::backend_failure, "redis " + from.label + " answered \"" + r.text +
                                                        "\": it is a cluster node; configure redis_mode::cluster");
          if (!rd) return finish(o, errc::backend_failure, "redis " + from.label + ": malformed redirect \"" + r.text + "\"");
          if (++o.redirects > cfg.max_redirects)
            return finish(o, errc::backend_failure, "redis cluster: more than " + std::to_string(cfg.max_redirects) +
                                                        " redirects for one key (last: " + r.text + ")");
          node* to = node_for(rd->target);
          if (to == nullptr) return finish(o, errc::backend_failure, "redis cluster: too many servers to follow " + r.text);
          if (rd->ask) {
            ask.fetch_add(1, std::memory_order_relaxed);
          } else {
            moved.fetch_add(1, std::memory_order_relaxed);
            std::unique_lock lk(route_mu);
            slot_owner[rd->slot] = to->id;
            refresh_wanted.store(true, std::memory_order_relaxed);
          }
          o.target = to;
          o.asking = rd->ask;
          return;  // pending: sent again next round
        }
        if (o.kind == op_kind::get && r.is_error("WRONGTYPE")) {
          o.corrupt = true;
          return finish(o, errc::not_found, "redis: the value of chunk " + o.key->hex() + " is not a string; deleted");
        }
        if (o.kind == op_kind::put && r.is_error("OOM"))
          return finish(o, errc::capacity_exhausted, "redis " + from.label + " is full: " + r.text);
        if (r.is_error("CLUSTERDOWN")) refresh_wanted.store(true, std::memory_order_relaxed);
        return finish(o, errc::backend_failure, "redis " + from.label + ": " + r.text);
      }
      switch (o.kind) {
        case op_kind::get:
          if (r.type == kind::nil) return finish(o, errc::not_found, "redis: chunk " + o.key->hex() + " is not stored");
          if (r.type == kind::value) {
            if (r.value_error == detail::record_error::ok) {
              o.bytes = static_cast<std::size_t>(r.integer);
              return succeed(o);
            }
            if (r.value_error == detail::record_error::buffer_too_small)
              return finish(o, errc::size_mismatch, "redis: chunk " + o.key->hex() + " is larger than the buffer (" +
                                                        std::to_string(o.out.size()) + " bytes)");
            if (r.value_error == detail::record_error::wrong_size)  // valid, but above our max_chunk_bytes: a peer's, kept
              return finish(o, errc::not_found, "redis: chunk " + o.key->hex() + " is larger than max_chunk_bytes (" +
                                                    std::to_string(cfg.max_chunk_bytes) + ")");
            o.corrupt = true;
            return finish(o, errc::not_found, "redis: the value of chunk " + o.key->hex() + " is invalid (" +
                                                  std::string(detail::to_string(r.value_error)) + "); deleted");
          }
          return finish(o, errc::backend_failure, "redis " + from.label + ": unexpected reply to GET");
        case op_kind::put:
          if (r.is_status("OK")) return succeed(o);
          return finish(o, errc::backend_failure, "redis " + from.label + ": unexpected reply to SET");
        case op_kind::exists:
          if (r.type != kind::integer) return finish(o, errc::backend_failure, "redis " + from.label + ": unexpected reply to EXISTS");
          o.exists = r.integer > 0;
          return succeed(o);
        case op_kind::del:
          return succeed(o);
        case op_kind::ping:
          if (r.is_status("PONG")) return succeed(o);
          return finish(o, errc::backend_failure, "redis " + from.label + ": unexpected reply to PING");
        case op_kind::slots:
          break;
      }
    }

    // A CLUSTER SLOTS exchange that brought a map worth using.
    static bool has_slot_map(const detail::redis_connection& c) {
      return c.finished() && c.replies().size() == 1 && c.replies()[0]->type == detail::resp_reply::kind::array &&
             !c.replies()[0]->elements.empty();
    }

    // Sends every op in `batch` (each with a target) to its server, all servers at once, and
    // takes the replies; an op redirected stays pending with its new target. With
    // `first_answer_wins`, returns once one server has sent a slot map; the others' ops fail as
    // not needed, their connections dropped without counting a failure.
    void run_round(std::vector<op*>& batch, clock::time_point deadline, std::chrono::milliseconds budget,
                   bool first_answer_wins = false) {
      std::vector<exchange> xs;
      xs.reserve(batch.size());
      for (op* o : batch) {
        auto it = std::find_if(xs.begin(), xs.end(), [&](const exchange& x) { return x.n == o->target; });
        if (it == xs.end()) {
          xs.emplace_back();
          xs.back().n = o->target;
          it = xs.end() - 1;
        }
        it->ops.push_back(o);
      }
      // `xs` does not grow from here on: each exchange's request stays where its connection saw it.
      std::vector<detail::redis_connection*> conns;
      conns.reserve(xs.size());
      for (exchange& x : xs) {
        auto l = acquire(*x.n);
        if (!l) {
          fast_failures.fetch_add(x.ops.size(), std::memory_order_relaxed);
          // A cluster master that stays down may have been replaced: look again (rate-limited).
          if (cluster()) refresh_wanted.store(true, std::memory_order_relaxed);
          for (op* o : x.ops) finish(*o, l.error().code, l.error().message);
          continue;
        }
        x.l = std::move(*l);
        std::vector<detail::reply_sink> sinks;
        sinks.reserve(x.ops.size());
        for (op* o : x.ops) add_command(x.req, *o, sinks);
        x.l.c->begin(x.req, std::move(sinks));
        x.live = true;
        conns.push_back(x.l.c.get());
        exchanges.fetch_add(1, std::memory_order_relaxed);
      }
      if (first_answer_wins) {
        detail::drive(conns, deadline, budget, [&] {
          return std::any_of(conns.begin(), conns.end(), [](const detail::redis_connection* c) { return has_slot_map(*c); });
        });
      } else {
        detail::drive(conns, deadline, budget);
      }
      for (exchange& x : xs) {
        if (!x.live) continue;
        if (!x.l.c->finished() && !x.l.c->failed()) {  // abandoned: another server answered first
          x.l.discard = true;
          x.l.c->abandon();
          for (op* o : x.ops) finish(*o, errc::backend_failure, "redis " + x.n->label + ": not needed (another server answered)");
          release(x.l);
          continue;
        }
        auto& replies = x.l.c->replies();
        std::size_t at = 0;
        const std::string why = x.l.c->failed() ? "redis: " + x.l.c->failure() : std::string{};
        for (op* o : x.ops) {
          const bool asked = o->asking_sent;
          o->asking = false;
          if (asked) {
            if (at >= replies.size()) {
              finish(*o, errc::backend_failure, why);
              continue;
            }
            const auto& a = *replies[at++];
            if (!a.is_status("OK")) {
              if (at < replies.size()) ++at;  // the command's own reply
              finish(*o, errc::backend_failure, "redis " + x.n->label + ": ASKING failed: " + a.text);
              continue;
            }
          }
          if (at >= replies.size()) {
            finish(*o, errc::backend_failure, why.empty() ? "redis " + x.n->label + ": no reply" : why);
            continue;
          }
          on_reply(*o, *x.n, std::move(replies[at++]));
        }
        release(x.l);
      }
    }

    // Runs `ops` to completion: routes, sends, follows redirects, all within `deadline`.
    void execute(std::vector<op>& ops, clock::time_point deadline) {
      maybe_refresh(deadline);
      std::vector<op*> batch;
      for (;;) {
        batch.clear();
        {
          std::shared_lock lk(route_mu);
          for (op& o : ops) {
            if (o.done) continue;
            o.target = route_locked(o);
            if (o.target == nullptr) {
              finish(o, errc::backend_failure, "redis cluster: no master known for slot " + std::to_string(o.slot) +
                                                   (have_map ? " (the slot map lacks it)" : " (no slot map yet)"));
              refresh_wanted.store(true, std::memory_order_relaxed);
              continue;
            }
            batch.push_back(&o);
          }
        }
        if (batch.empty()) return;
        if (clock::now() >= deadline) {
          for (op* o : batch)
            finish(*o, errc::backend_failure, "redis: no answer within " + std::to_string(cfg.command_timeout.count()) +
                                                  " ms (redirects used the time)");
          return;
        }
        run_round(batch, deadline, cfg.command_timeout);
      }
    }

    op make_op(op_kind kind, const chunk_key& k) const {
      op o;
      o.kind = kind;
      o.key = &k;
      o.rkey = detail::redis_key_name(cfg.key_prefix, cfg.ns, k);
      o.slot = detail::key_hash_slot(o.rkey);
      return o;
    }

    // Deletes the keys of ops found corrupt, within what is left of the call's time.
    void drop_corrupt(const std::vector<op>& ops, clock::time_point deadline) {
      std::vector<op> dels;
      for (const op& o : ops)
        if (o.corrupt) {
          corrupt_removed.fetch_add(1, std::memory_order_relaxed);
          note(log_level::warning, "corrupt_entry_removed", [&] { return o.err ? o.err->message : "chunk " + o.key->hex() + ": invalid value; deleted"; });
          dels.push_back(make_op(op_kind::del, *o.key));
        }
      if (!dels.empty()) execute(dels, deadline);
    }

    // ---- the calls -----------------------------------------------------------------------------

    std::vector<result<void>> put_many(std::span<const chunk_key> keys, std::span<const std::span<const std::byte>> values) {
      const auto t0 = clock::now();
      const auto deadline = t0 + cfg.command_timeout;
      std::vector<result<void>> out(keys.size());
      if (values.size() != keys.size()) {
        for (auto& r : out) r = fail(errc::invalid_argument, "redis tier: put_many got " + std::to_string(keys.size()) +
                                                                 " keys and " + std::to_string(values.size()) + " values");
        return out;
      }
      std::vector<op> ops;
      std::vector<std::size_t> index;
      ops.reserve(keys.size());
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const auto v = values[i];
        if (v.empty()) {
          out[i] = fail(errc::invalid_argument, "redis tier: put of an empty chunk");
          continue;
        }
        if (v.size() > cfg.max_chunk_bytes) {
          rejected_writes.fetch_add(1, std::memory_order_relaxed);
          out[i] = fail(errc::invalid_argument, "redis tier: chunk of " + std::to_string(v.size()) +
                                                    " bytes exceeds max_chunk_bytes (" + std::to_string(cfg.max_chunk_bytes) + ")");
          continue;
        }
        op o = make_op(op_kind::put, keys[i]);
        o.in = v;
        (void)detail::encode_chunk_header(o.header, cfg.ns, keys[i], v);
        ops.push_back(std::move(o));
        index.push_back(i);
      }
      execute(ops, deadline);
      const auto ns = static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count());
      for (std::size_t j = 0; j < ops.size(); ++j) {
        op& o = ops[j];
        if (!o.err) {
          writes.fetch_add(1, std::memory_order_relaxed);
          bytes_written.fetch_add(o.in.size(), std::memory_order_relaxed);
          out[index[j]] = {};
        } else {
          write_errors.fetch_add(1, std::memory_order_relaxed);
          out[index[j]] = std::unexpected(std::move(*o.err));
        }
        write_latency.record(ns);
      }
      return out;
    }

    std::vector<result<std::size_t>> get_many(std::span<const chunk_key> keys, std::span<const std::span<std::byte>> outs) {
      const auto t0 = clock::now();
      const auto deadline = t0 + cfg.command_timeout;
      std::vector<result<std::size_t>> out(keys.size());
      if (outs.size() != keys.size()) {
        for (auto& r : out) r = fail(errc::invalid_argument, "redis tier: get_many got " + std::to_string(keys.size()) +
                                                                 " keys and " + std::to_string(outs.size()) + " buffers");
        return out;
      }
      std::vector<op> ops;
      ops.reserve(keys.size());
      for (std::size_t i = 0; i < keys.size(); ++i) {
        op o = make_op(op_kind::get, keys[i]);
        o.out = outs[i];
        o.expect.ns = cfg.ns;
        o.expect.key = keys[i];
        o.expect.max_payload_bytes = cfg.max_chunk_bytes;
        ops.push_back(std::move(o));
      }
      execute(ops, deadline);
      const auto ns = static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count());
      for (std::size_t i = 0; i < ops.size(); ++i) {
        op& o = ops[i];
        if (!o.err) {
          hits.fetch_add(1, std::memory_order_relaxed);
          bytes_read.fetch_add(o.bytes, std::memory_order_relaxed);
          out[i] = o.bytes;
        } else {
          if (o.err->code == errc::not_found) misses.fetch_add(1, std::memory_order_relaxed);
          else if (o.err->code == errc::backend_failure) read_errors.fetch_add(1, std::memory_order_relaxed);
          out[i] = std::unexpected(*o.err);
        }
        read_latency.record(ns);
      }
      drop_corrupt(ops, deadline);
      return out;
    }

    std::size_t contains(std::span<const chunk_key> keys) {
      if (keys.empty()) return 0;
      std::vector<op> ops;
      ops.reserve(keys.size());
      for (const auto& k : keys) ops.push_back(make_op(op_kind::exists, k));
      execute(ops, clock::now() + cfg.command_timeout);
      std::size_t n = 0;
      while (n < ops.size() && !ops[n].err && ops[n].exists) ++n;
      return n;
    }

    void remove(std::span<const chunk_key> keys) {
      std::vector<op> ops;
      for (const auto& k : keys) ops.push_back(make_op(op_kind::del, k));
      execute(ops, clock::now() + cfg.command_timeout);
    }

    result<void> ping() {
      const auto deadline = clock::now() + cfg.command_timeout;
      maybe_refresh(deadline);
      std::vector<node*> targets;
      {
        std::shared_lock lk(route_mu);
        if (!cluster()) {
          for (const auto& n : nodes) targets.push_back(n.get());
        } else {
          if (!have_map) return fail(errc::backend_failure, "redis cluster: no slot map yet");
          for (const std::uint16_t id : slot_owner)
            if (id != no_node && std::find(targets.begin(), targets.end(), nodes[id].get()) == targets.end())
              targets.push_back(nodes[id].get());
        }
      }
      std::vector<op> ops(targets.size());
      std::vector<op*> batch;
      for (std::size_t i = 0; i < targets.size(); ++i) {
        ops[i].kind = op_kind::ping;
        ops[i].target = targets[i];
        batch.push_back(&ops[i]);
      }
      run_round(batch, deadline, cfg.command_timeout);
      for (op& o : ops)
        if (o.err) return std::unexpected(*o.err);
      return {};
    }

    // ---- open ----------------------------------------------------------------------------------

    result<void> start() {
      for (const auto& ep : cfg.servers)
        if (node_for(ep) == nullptr) return fail(errc::invalid_config, "redis_tier_config.servers: too many servers");
      const auto deadline = clock::now() + cfg.connect_timeout;
      if (cluster()) {
        bool not_cluster = false;
        std::unique_lock lk(refresh_mu);
        last_refresh = clock::now();
        auto r = refresh_slots(deadline, cfg.connect_timeout, cfg.servers.size(), not_cluster);
        if (not_cluster) return fail(errc::invalid_config, "redis tier: mode is cluster but " + r.error().message);
        if (!r) {
          refresh_wanted.store(true, std::memory_order_relaxed);
          last_refresh = {};
          if (cfg.require_connection) return r;
        }
        return {};
      }
      std::vector<op> ops(nodes.size());
      std::vector<op*> batch;
      for (std::size_t i = 0; i < nodes.size(); ++i) {
        ops[i].kind = op_kind::ping;
        ops[i].target = nodes[i].get();
        batch.push_back(&ops[i]);
      }
      run_round(batch, deadline, cfg.connect_timeout);
      std::string why;
      for (const op& o : ops) {
        if (!o.err) return {};
        if (!why.empty()) why += "; ";
        why += o.err->message;
      }
      if (cfg.require_connection) return fail(errc::backend_failure, "redis tier: no server answered: " + why);
      return {};
    }

    // ---- stats ---------------------------------------------------------------------------------

    tier_stats snapshot() const {
      tier_stats s;
      const auto get = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
      s.hits = get(hits);
      s.misses = get(misses);
      s.writes = get(writes);
      s.bytes_read = get(bytes_read);
      s.bytes_written = get(bytes_written);
      s.read_errors = get(read_errors);
      s.write_errors = get(write_errors);
      s.rejected_writes = get(rejected_writes);
      s.corrupt_removed = get(corrupt_removed);
      s.read_latency = read_latency.snapshot();
      s.write_latency = write_latency.snapshot();
      return s;
    }

    redis_link_stats link_snapshot() const {
      redis_link_stats s;
      const auto get = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
      s.exchanges = get(exchanges);
      s.connects = get(connects);
      s.connect_failures = get(connect_failures);
      s.reconnects = get(reconnects);
      s.timeouts = get(timeouts);
      s.disconnects = get(disconnects);
      s.fast_failures = get(fast_failures);
      s.moved = get(moved);
      s.ask = get(ask);
      s.slot_refreshes = get(slot_refreshes);
      std::vector<node*> all;
      {
        std::shared_lock lk(route_mu);
        for (const auto& n : nodes) all.push_back(n.get());
      }
      s.servers = all.size();
      for (node* n : all) {
        std::lock_guard lk(n->mu);
        if (n->down) ++s.servers_down;
      }
      return s;
    }
  };

  explicit redis_tier(std::unique_ptr<state> s) noexcept : s_(std::move(s)) {}

  std::unique_ptr<state> s_;
};

inline void redis_tier::lease::abandon() noexcept {
  if (!c || owner == nullptr) return;
  c->abandon();
  owner->release(*this);
}

static_assert(storage_tier<redis_tier>, "redis_tier does not satisfy kvortex::storage_tier");

}  // namespace kvortex

#endif
