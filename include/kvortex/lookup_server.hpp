#pragma once
// Answers prefix lookups for an engine over a Unix stream socket, on its own thread.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sys/stat.h>

#include "kvortex/detail/lookup_wire.hpp"
#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Where and how a `lookup_server` listens.
struct lookup_server_config {
  std::string path;                        ///< socket path (at most 107 bytes); made mode 0600
  std::size_t max_clients = 64;            ///< connections beyond this are closed at once
  std::size_t max_tokens = std::size_t{1} << 21;  ///< a query with more tokens is refused
  std::size_t max_salt_bytes = 4096;       ///< a query with a longer salt is refused
};

/// @brief Counters of a `lookup_server`, all since it started.
struct lookup_server_stats {
  std::uint64_t queries{0};           ///< queries answered (with a hit count or an error status)
  std::uint64_t failed_lookups{0};    ///< queries whose lookup returned an error
  std::uint64_t rejected_frames{0};   ///< malformed or oversized queries; their connection is closed
  std::uint64_t clients_accepted{0};  ///< connections accepted
  std::uint64_t clients_refused{0};   ///< connections closed because `max_clients` were open
};

/// @brief Serves `lookup(tokens, salt)` to other processes of the host (an inference engine's
/// scheduler asking each tensor-parallel worker's engine what it holds), so the caller's own
/// threads (and a Python caller's interpreter lock) stay out of it.
///
/// One thread polls the socket and its connections and answers each query in order with the
/// callback's result. A malformed or oversized query closes its connection (counted), a client
/// that stops reading its replies is dropped rather than waited for, and neither touches the other
/// connections. Stopping (or destroying) the server joins the thread, closes every connection and
/// removes the socket file. Move-only.
class lookup_server {
 public:
  /// @brief The lookup each query runs: hit tokens of a prompt under a salt (`engine::lookup`).
  using lookup_fn = std::function<result<std::size_t>(std::span<const token_id>, key_salt)>;

  /// @brief Binds `cfg.path` and starts serving. A stale socket file (nobody listening) is
  /// replaced; a live one fails with `errc::invalid_argument` ("in use"), and so does a path that
  /// exists and is not a socket (it is never removed).
  [[nodiscard]] static result<lookup_server> start(lookup_server_config cfg, lookup_fn fn) {
    if (!fn) return fail(errc::invalid_argument, "lookup_server: no lookup function");
    if (cfg.max_clients == 0) return fail(errc::invalid_argument, "lookup_server: max_clients must be at least 1");
    auto addr = detail::unix_address(cfg.path);
    if (!addr) return std::unexpected(addr.error());
    struct stat sb{};
    if (::lstat(cfg.path.c_str(), &sb) == 0) {
      if (!S_ISSOCK(sb.st_mode))
        return fail(errc::invalid_argument, "lookup_server: '" + cfg.path + "' exists and is not a socket");
      detail::unique_fd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
      if (probe && ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr)) == 0)
        return fail(errc::invalid_argument, "lookup_server: '" + cfg.path + "' is in use by a live server");
      (void)::unlink(cfg.path.c_str());
    }
    detail::unique_fd lfd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!lfd) return fail(errc::backend_failure, "lookup_server: socket: " + detail::errno_text(errno));
    if (::bind(lfd.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr)) != 0)
      return fail(errc::backend_failure, "lookup_server: bind '" + cfg.path + "': " + detail::errno_text(errno));
    (void)::chmod(cfg.path.c_str(), 0600);
    if (::listen(lfd.get(), 64) != 0) {
      const int e = errno;
      (void)::unlink(cfg.path.c_str());
      return fail(errc::backend_failure, "lookup_server: listen: " + detail::errno_text(e));
    }
    struct stat mine{};
    (void)::lstat(cfg.path.c_str(), &mine);
    int pipefd[2];
    if (::pipe2(pipefd, O_CLOEXEC | O_NONBLOCK) != 0) {
      const int e = errno;
      (void)::unlink(cfg.path.c_str());
      return fail(errc::backend_failure, "lookup_server: pipe: " + detail::errno_text(e));
    }
    auto s = std::make_unique<shared>();
    s->cfg = std::move(cfg);
    s->fn = std::move(fn);
    s->listen_fd = std::move(lfd);
    s->wake_read.reset(pipefd[0]);
    s->wake_write.reset(pipefd[1]);
    s->inode = mine.st_ino;
    s->device = mine.st_dev;
    lookup_server out;
    out.s_ = std::move(s);
    try {
      out.thread_ = std::thread([p = out.s_.get()] { p->run(); });
    } catch (const std::system_error& e) {
      out.s_->remove_socket();
      return fail(errc::backend_failure, std::string("lookup_server: cannot start its thread: ") + e.what());
    }
    return out;
  }

  lookup_server() = default;
  lookup_server(lookup_server&&) noexcept = default;
  lookup_server& operator=(lookup_server&& o) noexcept {
    if (this != &o) {
      stop();
      s_ = std::move(o.s_);
      thread_ = std::move(o.thread_);
    }
    return *this;
  }
  ~lookup_server() { stop(); }

  /// @brief Stops serving: no callback runs once this returns. Idempotent.
  void stop() noexcept {
    if (!s_) return;
    const char b = 1;
    (void)!::write(s_->wake_write.get(), &b, 1);
    if (thread_.joinable()) thread_.join();
    s_->remove_socket();
    s_.reset();
  }

  /// @brief Whether it is serving.
  [[nodiscard]] bool running() const noexcept { return s_ != nullptr; }

  /// @brief The socket path (empty once stopped).
  [[nodiscard]] std::string path() const { return s_ ? s_->cfg.path : std::string(); }

  /// @brief Its counters (zeros once stopped).
  [[nodiscard]] lookup_server_stats stats() const noexcept {
    lookup_server_stats out;
    if (!s_) return out;
    out.queries = s_->queries.load(std::memory_order_relaxed);
    out.failed_lookups = s_->failed.load(std::memory_order_relaxed);
    out.rejected_frames = s_->rejected.load(std::memory_order_relaxed);
    out.clients_accepted = s_->accepted.load(std::memory_order_relaxed);
    out.clients_refused = s_->refused.load(std::memory_order_relaxed);
    return out;
  }

 private:
  struct client {
    detail::unique_fd fd;
    std::vector<std::byte> in;
  };

  struct shared {
    lookup_server_config cfg;
    lookup_fn fn;
    detail::unique_fd listen_fd, wake_read, wake_write;
    ino_t inode{};
    dev_t device{};
    std::atomic<std::uint64_t> queries{0}, failed{0}, rejected{0}, accepted{0}, refused{0};

    void remove_socket() noexcept {
      // Only our own file: a later server may have replaced a socket we no longer listen on.
      struct stat sb{};
      if (::lstat(cfg.path.c_str(), &sb) == 0 && sb.st_ino == inode && sb.st_dev == device)
        (void)::unlink(cfg.path.c_str());
    }

    void run() noexcept {
      std::vector<client> clients;
      std::vector<pollfd> fds;
      for (;;) {
        fds.clear();
        fds.push_back({wake_read.get(), POLLIN, 0});
        fds.push_back({listen_fd.get(), POLLIN, 0});
        for (const auto& c : clients) fds.push_back({c.fd.get(), POLLIN, 0});
        const int r = ::poll(fds.data(), fds.size(), -1);
        if (r < 0) {
          if (errno == EINTR) continue;
          return;
        }
        if (fds[0].revents != 0) return;
        const std::size_t polled = clients.size();  // connections accepted below were not polled
        if ((fds[1].revents & POLLIN) != 0) accept_all(clients);
        std::vector<bool> drop(clients.size(), false);
        for (std::size_t i = 0; i < polled; ++i) {
          const short ev = fds[i + 2].revents;
          if (ev == 0) continue;
          drop[i] = !serve(clients[i]);
        }
        std::size_t k = 0;
        for (std::size_t i = 0; i < clients.size(); ++i)
          if (!drop[i]) clients[k++] = std::move(clients[i]);
        clients.resize(k);
      }
    }

    void accept_all(std::vector<client>& clients) noexcept {
      for (;;) {
        const int fd = ::accept4(listen_fd.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) return;
        if (clients.size() >= cfg.max_clients) {
          refused.fetch_add(1, std::memory_order_relaxed);  // counted before the peer can see it closed
          ::close(fd);
          continue;
        }
        accepted.fetch_add(1, std::memory_order_relaxed);
        try {
          clients.push_back({detail::unique_fd(fd), {}});
        } catch (...) {
          ::close(fd);
        }
      }
    }

    // Reads what arrived and answers every complete query; false drops the connection.
    bool serve(client& c) noexcept {
      try {
        std::byte buf[65536];
        for (;;) {
          const ssize_t n = ::recv(c.fd.get(), buf, sizeof buf, 0);
          if (n > 0) {
            c.in.insert(c.in.end(), buf, buf + n);
            if (!answer(c)) return false;
            continue;
          }
          if (n == 0) return false;
          if (errno == EINTR) continue;
          return errno == EAGAIN || errno == EWOULDBLOCK;
        }
      } catch (...) {
        return false;  // out of memory for the buffer: this client goes, the others stay
      }
    }

    bool answer(client& c) {
      std::size_t at = 0;
      for (;;) {
        detail::parsed_query q;
        const auto st = detail::parse_query(std::span<const std::byte>(c.in).subspan(at), cfg.max_tokens,
                                            cfg.max_salt_bytes, q);
        if (st == detail::frame_status::incomplete) break;
        if (st == detail::frame_status::malformed) {
          rejected.fetch_add(1, std::memory_order_relaxed);
          return false;
        }
        std::vector<token_id> tokens(q.count);
        std::memcpy(tokens.data(), q.tokens.data(), q.tokens.size());
        auto hit = fn(tokens, q.salt);
        queries.fetch_add(1, std::memory_order_relaxed);
        detail::lookup_reply rep{detail::lookup_reply_magic, detail::lookup_wire_version, 0, q.id, 0};
        if (hit) {
          rep.tokens = *hit;
        } else {
          failed.fetch_add(1, std::memory_order_relaxed);
          rep.status = static_cast<std::uint16_t>(hit.error().code);
        }
        // A client that does not read its replies is dropped, never waited for.
        if (!detail::send_all(c.fd.get(), std::as_bytes(std::span(&rep, 1)), 0)) return false;
        at += q.size;
      }
      c.in.erase(c.in.begin(), c.in.begin() + static_cast<std::ptrdiff_t>(at));
      return true;
    }
  };

  std::unique_ptr<shared> s_;
  std::thread thread_;
};

}  // namespace kvortex
