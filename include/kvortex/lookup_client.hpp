#pragma once
// Asks one or more `lookup_server`s how many leading tokens of a prompt they hold, and takes the
// minimum: what every one of them can serve.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <limits>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvortex/detail/lookup_wire.hpp"
#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief The servers a `lookup_client` asks, and how it treats them.
struct lookup_client_config {
  std::vector<std::string> paths;  ///< one socket per server (e.g. one per tensor-parallel rank)
  /// How long a server that could not be reached (or went away) is left alone before the next
  /// query tries to connect again; in between it answers 0 at once.
  std::chrono::milliseconds reconnect_backoff{200};
  /// How long sending one query to one server may wait for room in its socket.
  std::chrono::milliseconds send_timeout{20};
};

/// @brief Counters of a `lookup_client`.
struct lookup_client_stats {
  std::uint64_t queries{0};         ///< queries sent (to all servers)
  std::uint64_t answers{0};         ///< replies received
  std::uint64_t unreachable{0};     ///< per-server answers taken as 0: not connected, gone, or an error status
  std::uint64_t reconnects{0};      ///< connections (re)established
};

/// @brief Fans a lookup out to several `lookup_server`s and reduces the answers to their minimum.
///
/// `send` writes the query to every server and returns at once; `poll` collects replies, waiting
/// at most the time it is given, and yields the minimum once every server answered. A server that
/// is not reachable, disconnects, or answers with an error counts as 0 tokens, so the result never
/// claims more than every server can serve; a lost server is retried after `reconnect_backoff`.
/// Not thread-safe: one thread (a scheduler's) drives it.
class lookup_client {
 public:
  /// @brief Makes a client for `cfg.paths` (connections are made by the first `send`). Fails with
  /// `errc::invalid_argument` for no paths or a path that is not a valid socket address.
  [[nodiscard]] static result<lookup_client> create(lookup_client_config cfg) {
    if (cfg.paths.empty()) return fail(errc::invalid_argument, "lookup_client: no server paths");
    lookup_client c;
    for (const auto& p : cfg.paths) {
      auto a = detail::unix_address(p);
      if (!a) return fail(errc::invalid_argument, "lookup_client: " + a.error().message);
      auto& s = c.servers_.emplace_back();
      s.path = p;
      s.addr = *a;
    }
    c.cfg_ = std::move(cfg);
    return c;
  }

  /// @brief Sends a query for `tokens` under `salt` to every server; returns its id for `poll`.
  /// Fails with `errc::invalid_argument` for an empty prompt.
  [[nodiscard]] result<std::uint64_t> send(std::span<const token_id> tokens, key_salt salt = {}) {
    if (tokens.empty()) return fail(errc::invalid_argument, "lookup_client: empty token list");
    if (tokens.size() > std::numeric_limits<std::uint32_t>::max() || salt.size() > std::numeric_limits<std::uint32_t>::max())
      return fail(errc::invalid_argument, "lookup_client: query too large");
    const std::uint64_t id = next_id_++;
    detail::lookup_query_header h{detail::lookup_query_magic, detail::lookup_wire_version, 0, id,
                                  static_cast<std::uint32_t>(salt.size()), static_cast<std::uint32_t>(tokens.size())};
    frame_.resize(sizeof h + salt.size() + tokens.size_bytes());
    std::memcpy(frame_.data(), &h, sizeof h);
    if (!salt.empty()) std::memcpy(frame_.data() + sizeof h, salt.data(), salt.size());
    std::memcpy(frame_.data() + sizeof h + salt.size(), tokens.data(), tokens.size_bytes());
    pending q;
    q.answers.assign(servers_.size(), std::nullopt);
    for (std::size_t i = 0; i < servers_.size(); ++i) {
      auto& s = servers_[i];
      if (!s.fd && !connect(s)) {
        q.answers[i] = 0;
        ++stats_.unreachable;
        continue;
      }
      if (!detail::send_all(s.fd.get(), frame_, static_cast<int>(cfg_.send_timeout.count()))) {
        lose(s, i);
        q.answers[i] = 0;
        ++stats_.unreachable;
        continue;
      }
      s.waiting.push_back(id);
    }
    ++stats_.queries;
    queries_.emplace(id, std::move(q));
    return id;
  }

  /// @brief Collects replies for up to `wait`; yields the minimum hit over all servers once every
  /// one answered for `id` (the query is then forgotten), or nullopt while some are pending. Fails
  /// with `errc::not_found` for an id that is unknown or already answered.
  [[nodiscard]] result<std::optional<std::size_t>> poll(std::uint64_t id, std::chrono::microseconds wait = {}) {
    auto it = queries_.find(id);
    if (it == queries_.end()) return fail(errc::not_found, "lookup_client: no pending query " + std::to_string(id));
    const auto deadline = std::chrono::steady_clock::now() + wait;
    read_ready(std::chrono::nanoseconds::zero());
    for (;;) {
      if (auto v = complete(it)) return *v;
      const auto left = deadline - std::chrono::steady_clock::now();
      if (left <= std::chrono::steady_clock::duration::zero()) return std::optional<std::size_t>{};
      read_ready(std::chrono::duration_cast<std::chrono::nanoseconds>(left));
    }
  }

  /// @brief Forgets a pending query (its late replies are discarded).
  void cancel(std::uint64_t id) { queries_.erase(id); }

  /// @brief Queries sent and not yet answered or cancelled.
  [[nodiscard]] std::size_t pending_queries() const noexcept { return queries_.size(); }

  /// @brief Its counters.
  [[nodiscard]] const lookup_client_stats& stats() const noexcept { return stats_; }

 private:
  struct server {
    std::string path;
    sockaddr_un addr{};
    detail::unique_fd fd;
    std::vector<std::byte> in;
    std::deque<std::uint64_t> waiting;  // ids sent, in order: a server answers in order
    std::chrono::steady_clock::time_point retry_at{};
  };
  struct pending {
    std::vector<std::optional<std::size_t>> answers;
  };

  bool connect(server& s) {
    const auto now = std::chrono::steady_clock::now();
    if (now < s.retry_at) return false;
    detail::unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd || ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&s.addr), sizeof(s.addr)) != 0) {
      s.retry_at = now + cfg_.reconnect_backoff;
      return false;
    }
    detail::set_nonblocking(fd.get());
    s.fd = std::move(fd);
    s.in.clear();
    s.waiting.clear();
    ++stats_.reconnects;
    return true;
  }

  // Drops a connection: whatever it still owed answers 0.
  void lose(server& s, std::size_t i) {
    for (const auto id : s.waiting)
      if (auto it = queries_.find(id); it != queries_.end() && !it->second.answers[i]) {
        it->second.answers[i] = 0;
        ++stats_.unreachable;
      }
    s.waiting.clear();
    s.fd.reset();
    s.in.clear();
    s.retry_at = std::chrono::steady_clock::now() + cfg_.reconnect_backoff;
  }

  // Waits up to `timeout` (to the microsecond: ppoll, not poll's milliseconds) for replies.
  void read_ready(std::chrono::nanoseconds timeout) {
    std::vector<pollfd> fds;
    std::vector<std::size_t> which;
    for (std::size_t i = 0; i < servers_.size(); ++i)
      if (servers_[i].fd && !servers_[i].waiting.empty()) {
        fds.push_back({servers_[i].fd.get(), POLLIN, 0});
        which.push_back(i);
      }
    if (fds.empty()) return;
    timespec ts{static_cast<time_t>(timeout.count() / 1'000'000'000), static_cast<long>(timeout.count() % 1'000'000'000)};
    if (::ppoll(fds.data(), fds.size(), &ts, nullptr) <= 0) return;
    for (std::size_t k = 0; k < fds.size(); ++k)
      if (fds[k].revents != 0) drain(which[k]);
  }

  void drain(std::size_t i) {
    auto& s = servers_[i];
    std::byte buf[4096];
    for (;;) {
      const ssize_t n = ::recv(s.fd.get(), buf, sizeof buf, 0);
      if (n > 0) {
        s.in.insert(s.in.end(), buf, buf + n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      lose(s, i);  // closed or failed
      return;
    }
    std::size_t at = 0;
    while (auto parsed = detail::parse_reply(std::span<const std::byte>(s.in).subspan(at))) {
      const auto& r = parsed->reply;
      at += sizeof r;
      if (!parsed->ok || s.waiting.empty() || s.waiting.front() != r.id) {
        lose(s, i);  // out of step: nothing it says can be matched any more
        return;
      }
      s.waiting.pop_front();
      ++stats_.answers;
      if (auto it = queries_.find(r.id); it != queries_.end()) {
        if (r.status != 0) ++stats_.unreachable;
        it->second.answers[i] = r.status == 0 ? static_cast<std::size_t>(r.tokens) : 0;
      }
    }
    s.in.erase(s.in.begin(), s.in.begin() + static_cast<std::ptrdiff_t>(at));
  }

  std::optional<std::optional<std::size_t>> complete(std::unordered_map<std::uint64_t, pending>::iterator it) {
    std::size_t m = std::numeric_limits<std::size_t>::max();
    for (const auto& a : it->second.answers) {
      if (!a) return std::nullopt;
      m = std::min(m, *a);
    }
    queries_.erase(it);
    return std::optional<std::size_t>{m};
  }

  lookup_client_config cfg_;
  std::vector<server> servers_;
  std::unordered_map<std::uint64_t, pending> queries_;
  std::vector<std::byte> frame_;
  std::uint64_t next_id_{1};
  lookup_client_stats stats_;
};

}  // namespace kvortex
