#pragma once
/// @file redis_tier_config.hpp
/// @brief How a `redis_tier` is set up: its servers, mode, credentials, namespace, expiry,
/// timeouts and limits. Standard library only (no hiredis, no xxHash), so configuration code can
/// use it without the tier itself.

#include <charconv>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

namespace detail {
// The fixed header of a stored chunk record (detail::chunk_record_fixed_bytes, which needs
// xxHash; redis_tier.hpp checks that the two agree).
inline constexpr std::size_t redis_record_header_bytes = 128;
}  // namespace detail

/// @brief One Redis server: a host and a TCP port. Address literals (IPv4, IPv6) need no lookup;
/// a name is resolved (getaddrinfo) once, when the tier first meets the server, and that lookup
/// is not bounded by the tier's timeouts: prefer addresses, or names /etc/hosts answers.
struct redis_endpoint {
  std::string host;
  std::uint16_t port{6379};

  /// @brief "host:port", "[v6]:port"; a bare host means port 6379. The host holds only
  /// letters, digits and `.-_:%`; the port is 1..65535.
  [[nodiscard]] static result<redis_endpoint> parse(std::string_view text) {
    redis_endpoint ep;
    std::string_view host = text, port;
    if (text.starts_with('[')) {
      const auto close = text.find(']');
      if (close == std::string_view::npos) return fail(errc::invalid_argument, "redis endpoint \"" + std::string(text) + "\": unclosed '['");
      host = text.substr(1, close - 1);
      const auto rest = text.substr(close + 1);
      if (!rest.empty()) {
        if (rest.front() != ':') return fail(errc::invalid_argument, "redis endpoint \"" + std::string(text) + "\": expected ':' after ']'");
        port = rest.substr(1);
        if (port.empty()) return fail(errc::invalid_argument, "redis endpoint \"" + std::string(text) + "\": empty port");
      }
    } else if (const auto colon = text.rfind(':'); colon != std::string_view::npos) {
      if (text.find(':') != colon)  // several colons: an IPv6 literal without a port
        host = text;
      else {
        host = text.substr(0, colon);
        port = text.substr(colon + 1);
        if (port.empty()) return fail(errc::invalid_argument, "redis endpoint \"" + std::string(text) + "\": empty port");
      }
    }
    if (host.empty()) return fail(errc::invalid_argument, "redis endpoint \"" + std::string(text) + "\": empty host");
    // Names and address literals only: no spaces, commas, brackets or control bytes, which would
    // not survive a list of endpoints ("host:port,host:port") or a log line.
    for (const char ch : host) {
      const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
                      ch == '-' || ch == '_' || ch == ':' || ch == '%';
      if (!ok) return fail(errc::invalid_argument, "redis endpoint \"" + std::string(text) + "\": the host may hold only letters, digits and . - _ : %");
    }
    ep.host = std::string(host);
    if (!port.empty()) {
      unsigned v = 0;
      const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), v);
      if (ec != std::errc{} || end != port.data() + port.size() || v == 0 || v > 65535)
        return fail(errc::invalid_argument, "redis endpoint \"" + std::string(text) + "\": port must be 1..65535");
      ep.port = static_cast<std::uint16_t>(v);
    }
    return ep;
  }

  /// @brief "host:port" ("[host]:port" for IPv6 literals).
  [[nodiscard]] std::string text() const {
    const bool v6 = host.find(':') != std::string::npos;
    return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
  }
  friend bool operator==(const redis_endpoint&, const redis_endpoint&) = default;
};

/// @brief How the configured servers are used.
enum class redis_mode : std::uint8_t {
  /// Independent servers; each key lives on one, chosen by `detail::shard_of` (jump consistent
  /// hashing of the key) over the list in its order. Every tier sharing the chunks must list the
  /// same servers in the same order. A server that is down makes its keys misses; they are not
  /// moved to the others (which would split them between tiers that disagree on who is up).
  standalone,
  /// A Redis Cluster; the servers are seeds. The tier loads the slot map (CLUSTER SLOTS), sends
  /// each key to its slot's master, follows MOVED (and updates the map) and ASK, and reloads the
  /// map after a redirect, a lost master or CLUSTERDOWN.
  cluster,
};

/// @brief How a `redis_tier` is set up. `validate()` is called by `redis_tier::open`.
struct redis_tier_config {
  std::vector<redis_endpoint> servers;  ///< standalone: the shards, in order; cluster: seed nodes
  redis_mode mode{redis_mode::standalone};
  std::string username;  ///< ACL user (AUTH user password); empty: the default user
  std::string password;  ///< AUTH password; empty with no username: no AUTH
  unsigned database{0};  ///< SELECT'ed on connect; standalone only (a cluster has only database 0)
  namespace_digest ns{}; ///< written into every value and every key name: other namespaces never meet
  std::string key_prefix{"kvx:"};  ///< start of every key name (no '{' or '}'), e.g. for ACL key patterns
  /// Expiry of stored chunks (SET ... PX); 0: none. Eviction is otherwise Redis' own business:
  /// run it with `maxmemory` and an `allkeys-*` policy; an evicted chunk is a miss.
  std::chrono::milliseconds ttl{0};
  /// Bounds `open` (connecting, AUTH, the first slot map) and every later connection attempt
  /// (TCP connect, AUTH, SELECT and a PING answered), within the call that makes it.
  std::chrono::milliseconds connect_timeout{250};
  /// Bounds every call (put, get, contains, remove, their batches, ping) from entry to return,
  /// connecting and redirects included. A server that does not answer in time costs its keys a
  /// miss or a dropped write, and is then left alone for the backoff below.
  std::chrono::milliseconds command_timeout{250};
  /// After a failure a server is not tried again for this long, doubling per further failure up
  /// to the maximum (with +-25% jitter); calls meanwhile fail at once. One success resets it.
  std::chrono::milliseconds reconnect_backoff_min{50};
  std::chrono::milliseconds reconnect_backoff_max{2000};
  /// Least time between two slot map reloads (cluster).
  std::chrono::milliseconds slot_refresh_interval{100};
  /// Idle connections kept per server. A call that finds none idle opens another (closed again
  /// when returned beyond this number), so calls never wait for each other's connections.
  unsigned connections_per_server{4};
  unsigned max_redirects{5};  ///< MOVED/ASK hops one key may take in one call
  /// Largest payload stored or accepted back (Redis' own limit, proto-max-bulk-len, is 512 MB).
  std::uint64_t max_chunk_bytes{std::uint64_t{64} << 20};
  /// `open` fails with errc::backend_failure when no server answers within `connect_timeout`.
  /// Off (default): the tier opens anyway, serves misses, and connects when Redis comes up.
  bool require_connection{false};

  /// @brief Checks every field; the error names the first bad one.
  [[nodiscard]] result<void> validate() const {
    const auto bad = [](std::string what) { return fail(errc::invalid_config, "redis_tier_config." + std::move(what)); };
    if (servers.empty()) return bad("servers is empty");
    for (std::size_t i = 0; i < servers.size(); ++i) {
      if (servers[i].host.empty()) return bad("servers[" + std::to_string(i) + "].host is empty");
      if (servers[i].port == 0) return bad("servers[" + std::to_string(i) + "].port is 0");
      if (mode == redis_mode::standalone)
        for (std::size_t j = 0; j < i; ++j)
          if (servers[j] == servers[i])
            return bad("servers[" + std::to_string(i) + "] repeats servers[" + std::to_string(j) + "] (" + servers[i].text() + ")");
    }
    if (mode != redis_mode::standalone && mode != redis_mode::cluster) return bad("mode is not a redis_mode value");
    if (mode == redis_mode::cluster && database != 0) return bad("database must be 0 in cluster mode (got " + std::to_string(database) + ")");
    if (key_prefix.find_first_of("{}") != std::string::npos) return bad("key_prefix must not contain '{' or '}' (they would change the hash slot)");
    if (key_prefix.size() > 256) return bad("key_prefix is longer than 256 bytes");
    const auto ms = [](std::chrono::milliseconds d) { return std::to_string(d.count()) + " ms"; };
    constexpr std::chrono::milliseconds hour{3600 * 1000};
    if (ttl.count() < 0) return bad("ttl is negative (" + ms(ttl) + ")");
    if (connect_timeout.count() <= 0 || connect_timeout > hour) return bad("connect_timeout must be in (0, 1 h], got " + ms(connect_timeout));
    if (command_timeout.count() <= 0 || command_timeout > hour) return bad("command_timeout must be in (0, 1 h], got " + ms(command_timeout));
    if (reconnect_backoff_min.count() <= 0 || reconnect_backoff_min > hour)
      return bad("reconnect_backoff_min must be in (0, 1 h], got " + ms(reconnect_backoff_min));
    if (reconnect_backoff_max < reconnect_backoff_min || reconnect_backoff_max > hour)
      return bad("reconnect_backoff_max must be in [reconnect_backoff_min, 1 h], got " + ms(reconnect_backoff_max));
    if (slot_refresh_interval.count() < 0 || slot_refresh_interval > hour)
      return bad("slot_refresh_interval must be in [0, 1 h], got " + ms(slot_refresh_interval));
    if (connections_per_server == 0 || connections_per_server > 1024)
      return bad("connections_per_server must be in [1, 1024], got " + std::to_string(connections_per_server));
    if (max_redirects == 0 || max_redirects > 16) return bad("max_redirects must be in [1, 16], got " + std::to_string(max_redirects));
    constexpr std::uint64_t bulk_limit = (std::uint64_t{512} << 20) - detail::redis_record_header_bytes;
    if (max_chunk_bytes == 0 || max_chunk_bytes > bulk_limit)
      return bad("max_chunk_bytes must be in [1, " + std::to_string(bulk_limit) + "], got " + std::to_string(max_chunk_bytes));
    return {};
  }
};

}  // namespace kvortex
