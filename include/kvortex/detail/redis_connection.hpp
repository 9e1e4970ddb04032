#pragma once
/// @file redis_connection.hpp
/// @brief One connection to a Redis server, driven without blocking: a non-blocking socket
/// (connect, handshake and pipelined requests in flight together), replies parsed by hiredis'
/// reader, and `drive`, which advances any number of connections at once until each has all its
/// replies or an absolute deadline passes. Nothing here waits past the deadline it is given.
/// Linux/POSIX sockets; needs hiredis (Debian: libhiredis-dev) and xxHash.

#if !__has_include(<hiredis/read.h>)
#error "kvortex/detail/redis_connection.hpp needs hiredis (Debian: apt-get install libhiredis-dev; CMake: KVORTEX_WITH_HIREDIS)"
#else

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <hiredis/read.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvortex/detail/chunk_record.hpp"
#include "kvortex/detail/redis_protocol.hpp"
#include "kvortex/error.hpp"

namespace kvortex::detail {

using redis_clock = std::chrono::steady_clock;

[[nodiscard]] inline std::string redis_errno_text(int e) { return std::error_code(e, std::generic_category()).message(); }

// ---------------------------------------------------------------------------------------------
// Reply objects: hiredis' reader calls these to build a reply; they build `resp_reply` trees.
// A top-level bulk string meant for a GET is checked and copied into the caller's buffer right
// there, from the reader's own buffer, instead of becoming a string.
// ---------------------------------------------------------------------------------------------

/// @brief Where the reply being parsed goes: a GET's destination, or nothing special.
struct reply_sink {
  const chunk_record_expect* expect{nullptr};  ///< non-null: a chunk value is expected
  std::span<std::byte> out;
};

/// @brief Implemented by whoever owns a reader: the sink of the next top-level reply.
struct reply_sink_source {
  [[nodiscard]] virtual const reply_sink* next_sink() const noexcept = 0;

 protected:
  ~reply_sink_source() = default;
};

namespace resp_objects {

template <class F>
struct second_param;
template <class R, class A, class B>
struct second_param<R (*)(A, B)> {
  using type = B;
};

// The node a read task fills: a new root, or its slot in the parent array.
inline resp_reply* node_for(const redisReadTask* task) {
  if (task->parent == nullptr) return new resp_reply;
  auto* parent = static_cast<resp_reply*>(task->parent->obj);
  if (parent == nullptr || task->idx < 0 || static_cast<std::size_t>(task->idx) >= parent->elements.size()) return nullptr;
  return &parent->elements[static_cast<std::size_t>(task->idx)];
}

inline void* create_string(const redisReadTask* task, char* str, std::size_t len) noexcept {
  try {
    if (task->parent == nullptr && task->type == REDIS_REPLY_STRING && task->privdata != nullptr) {
      const reply_sink* sink = static_cast<const reply_sink_source*>(task->privdata)->next_sink();
      if (sink != nullptr && sink->expect != nullptr) {
        auto* r = new resp_reply;
        r->type = resp_reply::kind::value;
        const auto got = decode_redis_value(std::span(reinterpret_cast<const std::byte*>(str), len), *sink->expect, sink->out);
        if (got) {
          r->integer = static_cast<long long>(*got);
        } else {
          r->value_error = got.error();
        }
        return r;
      }
    }
    resp_reply* r = node_for(task);
    if (r == nullptr) return nullptr;
    r->type = task->type == REDIS_REPLY_ERROR    ? resp_reply::kind::error
              : task->type == REDIS_REPLY_STATUS ? resp_reply::kind::status
                                                 : resp_reply::kind::string;
    r->text.assign(str, len);
    return r;
  } catch (...) {
    return nullptr;  // the reader reports out of memory
  }
}

/// @brief The most array elements one reply may declare, nested arrays included. A header is a
/// few bytes while its elements are allocated at once, so a broken or hostile server could
/// otherwise make a few bytes cost gigabytes; the largest real reply (CLUSTER SLOTS of a cluster
/// with thousands of slot ranges) stays far below this.
inline constexpr std::size_t max_reply_elements = std::size_t{1} << 20;

template <class N>
void* create_array(const redisReadTask* task, N elements) noexcept {
  try {
    if (elements < 0) return nullptr;
    const auto n = static_cast<std::size_t>(elements);
    const redisReadTask* top = task;
    while (top->parent != nullptr) top = top->parent;
    auto* root = task->parent == nullptr ? nullptr : static_cast<resp_reply*>(top->obj);
    const std::size_t used = root == nullptr ? 0 : root->reply_elements;
    if ((task->parent != nullptr && root == nullptr) || n > max_reply_elements - used)
      return nullptr;  // the reader fails the reply (out of memory) and the connection is dropped
    resp_reply* r = node_for(task);
    if (r == nullptr) return nullptr;
    r->type = resp_reply::kind::array;
    r->elements.resize(n);
    (root == nullptr ? r : root)->reply_elements = used + n;
    return r;
  } catch (...) {
    return nullptr;
  }
}

inline void* create_integer(const redisReadTask* task, long long v) noexcept {
  try {
    resp_reply* r = node_for(task);
    if (r == nullptr) return nullptr;
    r->type = resp_reply::kind::integer;
    r->integer = v;
    return r;
  } catch (...) {
    return nullptr;
  }
}

inline void* create_nil(const redisReadTask* task) noexcept {
  try {
    resp_reply* r = node_for(task);
    if (r == nullptr) return nullptr;
    r->type = resp_reply::kind::nil;
    return r;
  } catch (...) {
    return nullptr;
  }
}

// Only roots are freed: children live inside their parent.
inline void free_object(void* obj) noexcept { delete static_cast<resp_reply*>(obj); }

// RESP3-only reply kinds of later hiredis versions (never sent: the tier speaks RESP2) become errors.
template <class... A>
void* create_unexpected(const redisReadTask* task, A...) noexcept {
  try {
    resp_reply* r = node_for(task);
    if (r == nullptr) return nullptr;
    r->type = resp_reply::kind::error;
    r->text = "ERR unexpected RESP3 reply";
    return r;
  } catch (...) {
    return nullptr;
  }
}

template <class F>
void set_resp3(F& fn) {
  if constexpr (requires { fn.createDouble; }) fn.createDouble = &create_unexpected<double, char*, std::size_t>;
  if constexpr (requires { fn.createBool; }) fn.createBool = &create_unexpected<int>;
}

inline redisReplyObjectFunctions* functions() noexcept {
  static redisReplyObjectFunctions fn = [] {
    redisReplyObjectFunctions f{};
    f.createString = &create_string;
    f.createArray = &create_array<typename second_param<decltype(f.createArray)>::type>;
    f.createInteger = &create_integer;
    f.createNil = &create_nil;
    f.freeObject = &free_object;
    set_resp3(f);
    return f;
  }();
  return &fn;
}

}  // namespace resp_objects

/// @brief A hiredis reader that builds `resp_reply` trees, with `source` (may be null) naming
/// the sink of each top-level reply. Never frees its unused buffer (reused for the next value).
struct resp_reader {
  struct deleter {
    void operator()(redisReader* r) const noexcept { redisReaderFree(r); }
  };
  std::unique_ptr<redisReader, deleter> r;

  explicit resp_reader(const reply_sink_source* source) : r(redisReaderCreateWithFunctions(resp_objects::functions())) {
    if (!r) throw std::bad_alloc();
    r->maxbuf = 0;
    r->privdata = const_cast<reply_sink_source*>(source);
  }

  /// @brief Bytes fed but not yet consumed by a complete reply.
  [[nodiscard]] std::size_t buffered() const noexcept { return r->len - r->pos; }
  [[nodiscard]] bool feed(const char* p, std::size_t n) noexcept { return redisReaderFeed(r.get(), p, n) == REDIS_OK; }
  /// @brief The next complete reply (null when more bytes are needed); false on a protocol error.
  [[nodiscard]] bool next(std::unique_ptr<resp_reply>& out) noexcept {
    void* obj = nullptr;
    if (redisReaderGetReply(r.get(), &obj) != REDIS_OK) return false;
    out.reset(static_cast<resp_reply*>(obj));
    return true;
  }
  [[nodiscard]] std::string error() const { return r->errstr; }
};

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

struct socket_address {
  sockaddr_storage addr{};
  socklen_t len{0};
  int family{AF_UNSPEC};
};

/// @brief The addresses of `ep` (literals without a lookup; names through getaddrinfo).
[[nodiscard]] inline result<std::vector<socket_address>> resolve(const redis_endpoint& ep) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_family = AF_UNSPEC;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(ep.port);
  const int rc = ::getaddrinfo(ep.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return fail(errc::backend_failure, "redis " + ep.text() + ": cannot resolve the host: " + ::gai_strerror(rc));
  std::vector<socket_address> out;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    if (a->ai_addrlen > sizeof(sockaddr_storage)) continue;
    socket_address s;
    std::memcpy(&s.addr, a->ai_addr, a->ai_addrlen);
    s.len = a->ai_addrlen;
    s.family = a->ai_family;
    out.push_back(s);
  }
  ::freeaddrinfo(res);
  if (out.empty()) return fail(errc::backend_failure, "redis " + ep.text() + ": the host has no address");
  return out;
}

/// @brief What a new connection sends before any request: AUTH, SELECT, then a PING that proves
/// the server answers (a stopped server still completes TCP handshakes from its listen backlog).
struct redis_handshake {
  std::string username, password;
  unsigned database{0};
};

// ---------------------------------------------------------------------------------------------
// The connection
// ---------------------------------------------------------------------------------------------

/// @brief A non-blocking connection that runs one exchange at a time: a batch of pipelined
/// commands and their replies, in order. A new connection's first exchange carries the
/// handshake in front of it. After a failure (connect error, I/O error, protocol error, timeout)
/// the connection is unusable and must be discarded: replies in flight are lost with it.
class redis_connection final : private reply_sink_source {
 public:
  /// @brief Starts connecting to `addrs` (tried in order); never blocks. `label` names the
  /// server in messages. Connecting and the handshake must be done within `connect_timeout` from
  /// now; replies larger than `max_reply_bytes` fail the connection.
  redis_connection(std::vector<socket_address> addrs, std::string label, const redis_handshake& hs,
                   std::chrono::milliseconds connect_timeout, std::size_t max_reply_bytes)
      : addrs_(std::move(addrs)),
        label_(std::move(label)),
        connect_timeout_(connect_timeout),
        connect_by_(redis_clock::now() + connect_timeout),
        reader_(this),
        max_reply_(max_reply_bytes),
        rbuf_(128 * 1024) {
    if (!hs.password.empty() || !hs.username.empty()) {
      handshake_names_.push_back("AUTH");
      if (hs.username.empty()) {
        handshake_.command(2);
        handshake_.arg("AUTH");
      } else {
        handshake_.command(3);
        handshake_.arg("AUTH");
        handshake_.arg(hs.username);
      }
      handshake_.arg(hs.password);
    }
    if (hs.database != 0) {
      handshake_names_.push_back("SELECT");
      handshake_.command(2);
      handshake_.arg("SELECT");
      handshake_.arg(std::uint64_t{hs.database});
    }
    handshake_names_.push_back("PING");
    handshake_.command(1);
    handshake_.arg("PING");
    handshake_left_ = handshake_.commands();
    start_connect();
  }
  redis_connection(const redis_connection&) = delete;
  redis_connection& operator=(const redis_connection&) = delete;
  ~redis_connection() { close_fd(); }

  [[nodiscard]] const std::string& label() const noexcept { return label_; }
  /// @brief Still connecting or waiting for the handshake's replies.
  [[nodiscard]] bool handshaking() const noexcept { return state_ == phase::connecting || handshake_left_ != 0; }
  /// @brief When the exchange must be done: `deadline`, or earlier while the handshake runs.
  [[nodiscard]] redis_clock::time_point deadline(redis_clock::time_point deadline) const noexcept {
    return handshaking() ? std::min(deadline, connect_by_) : deadline;
  }
  /// @brief Fails the connection as timed out, saying which phase ran out of time.
  void time_out(std::chrono::milliseconds budget) {
    if (handshaking() && connect_by_ <= redis_clock::now())
      fail("no answer from " + label_ + " within the connect timeout (" + std::to_string(connect_timeout_.count()) + " ms)", true);
    else
      fail("no reply from " + label_ + " within " + std::to_string(budget.count()) + " ms", true);
  }
  /// @brief Whether the connection has completed its handshake (an exchange succeeded on it).
  [[nodiscard]] bool established() const noexcept { return handshake_left_ == 0 && state_ == phase::ready; }
  [[nodiscard]] bool failed() const noexcept { return state_ == phase::failed; }
  [[nodiscard]] const std::string& failure() const noexcept { return failure_; }
  /// @brief Why it failed: a timeout (the server did not answer in time) or anything else.
  [[nodiscard]] bool timed_out() const noexcept { return timed_out_; }
  /// @brief The exchange has all its replies.
  [[nodiscard]] bool finished() const noexcept { return state_ == phase::ready && replies_.size() == sinks_.size() && handshake_left_ == 0 && iov_at_ == iov_.size(); }

  /// @brief Starts an exchange: `req` (kept by the caller until the exchange ends) and one sink
  /// per command. The previous exchange's replies are dropped.
  void begin(const resp_request& req, std::vector<reply_sink> sinks) {
    replies_.clear();
    sinks_ = std::move(sinks);
    iov_.clear();
    iov_at_ = 0;
    if (!handshake_sent_) {
      handshake_.append_iov(iov_);
      handshake_sent_ = true;
    }
    req.append_iov(iov_);
  }

  /// @brief The replies of the exchange so far, in command order.
  [[nodiscard]] std::vector<std::unique_ptr<resp_reply>>& replies() noexcept { return replies_; }
  [[nodiscard]] const std::vector<std::unique_ptr<resp_reply>>& replies() const noexcept { return replies_; }

  /// @brief Marks the connection failed (an exchange cut off by its deadline, with `timeout`).
  void fail(std::string why, bool timeout = false) {
    if (state_ == phase::failed) return;
    failure_ = std::move(why);
    timed_out_ = timeout;
    state_ = phase::failed;
    close_fd();
  }

  /// @brief Makes the connection unusable without a message (for paths that must not throw).
  void abandon() noexcept {
    timed_out_ = false;
    state_ = phase::failed;
    close_fd();
  }

  /// @brief The poll events the connection waits for, 0 when it waits for nothing.
  [[nodiscard]] short events() const noexcept {
    if (state_ == phase::failed || finished()) return 0;
    if (state_ == phase::connecting) return POLLOUT;
    short e = POLLIN;
    if (iov_at_ < iov_.size()) e |= POLLOUT;
    return e;
  }
  [[nodiscard]] int fd() const noexcept { return fd_; }

  /// @brief Advances on the poll result `revents`.
  void on_events(short revents) {
    if (state_ == phase::connecting) {
      int err = 0;
      socklen_t len = sizeof err;
      if (::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      if (err == 0 && (revents & (POLLOUT | POLLERR | POLLHUP)) != 0) {
        if ((revents & (POLLERR | POLLHUP)) == 0) {
          state_ = phase::ready;
        } else {
          err = ECONNREFUSED;
        }
      }
      if (err != 0) {
        connect_error_ = err;
        next_address();
        return;
      }
      if (state_ != phase::ready) return;
    }
    if ((revents & POLLOUT) != 0 && iov_at_ < iov_.size()) send_some();
    if (state_ == phase::ready && (revents & (POLLIN | POLLHUP | POLLERR)) != 0) receive_some();
  }

  /// @brief For a pooled idle connection: false when the server closed it or sent something
  /// unasked for (then it must not be reused).
  [[nodiscard]] bool idle_healthy() const noexcept {
    if (state_ != phase::ready || fd_ < 0 || reader_.buffered() != 0) return false;
    pollfd p{fd_, static_cast<short>(POLLIN | POLLRDHUP), 0};
    const int n = ::poll(&p, 1, 0);
    return n == 0;
  }

 private:
  enum class phase : std::uint8_t { connecting, ready, failed };

  const reply_sink* next_sink() const noexcept override {
    if (handshake_left_ != 0) return nullptr;
    return replies_.size() < sinks_.size() ? &sinks_[replies_.size()] : nullptr;
  }

  void close_fd() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  void start_connect() {
    while (addr_at_ < addrs_.size()) {
      const socket_address& a = addrs_[addr_at_];
      fd_ = ::socket(a.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd_ < 0) {
        connect_error_ = errno;
        ++addr_at_;
        continue;
      }
      const int one = 1;
      (void)::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      (void)::setsockopt(fd_, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
      int rc;
      do rc = ::connect(fd_, reinterpret_cast<const sockaddr*>(&a.addr), a.len);
      while (rc != 0 && errno == EINTR);
      if (rc == 0) {
        state_ = phase::ready;
        return;
      }
      if (errno == EINPROGRESS) {
        state_ = phase::connecting;
        return;
      }
      connect_error_ = errno;
      close_fd();
      ++addr_at_;
    }
    fail("cannot connect to " + label_ + ": " + redis_errno_text(connect_error_ != 0 ? connect_error_ : EHOSTUNREACH));
  }

  void next_address() {
    close_fd();
    ++addr_at_;
    state_ = phase::connecting;
    start_connect();
  }

  void send_some() {
    while (iov_at_ < iov_.size()) {
      msghdr msg{};
      msg.msg_iov = &iov_[iov_at_];
      msg.msg_iovlen = std::min<std::size_t>(iov_.size() - iov_at_, IOV_MAX);
      const ssize_t n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        fail("sending to " + label_ + " failed: " + redis_errno_text(errno));
        return;
      }
      auto left = static_cast<std::size_t>(n);
      while (left > 0 && iov_at_ < iov_.size()) {
        iovec& v = iov_[iov_at_];
        if (left >= v.iov_len) {
          left -= v.iov_len;
          ++iov_at_;
        } else {
          v.iov_base = static_cast<char*>(v.iov_base) + left;
          v.iov_len -= left;
          left = 0;
        }
      }
      while (iov_at_ < iov_.size() && iov_[iov_at_].iov_len == 0) ++iov_at_;
    }
  }

  void receive_some() {
    // Bounded per call, so one fast connection cannot starve the others in a drive loop.
    for (int round = 0; round < 64 && state_ == phase::ready; ++round) {
      const ssize_t n = ::recv(fd_, rbuf_.data(), rbuf_.size(), MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        fail("receiving from " + label_ + " failed: " + redis_errno_text(errno));
        return;
      }
      if (n == 0) {
        fail("connection closed by " + label_);
        return;
      }
      if (!reader_.feed(rbuf_.data(), static_cast<std::size_t>(n))) {
        fail("reading a reply from " + label_ + ": " + reader_.error());
        return;
      }
      if (!take_replies()) return;
      if (reader_.buffered() > max_reply_) {
        fail("a reply from " + label_ + " exceeds " + std::to_string(max_reply_) + " bytes");
        return;
      }
      if (finished()) {
        if (reader_.buffered() != 0) fail("unrequested bytes from " + label_);
        return;
      }
    }
  }

  bool take_replies() {
    for (;;) {
      std::unique_ptr<resp_reply> reply;
      if (!reader_.next(reply)) {
        fail("protocol error from " + label_ + ": " + reader_.error());
        return false;
      }
      if (!reply) return true;
      if (handshake_left_ != 0) {
        const std::size_t at = handshake_names_.size() - handshake_left_;
        --handshake_left_;
        if (reply->type != resp_reply::kind::status) {
          fail(handshake_names_[at] + " on " + label_ + " failed: " +
               (reply->type == resp_reply::kind::error ? reply->text : std::string("unexpected reply")));
          return false;
        }
        continue;
      }
      if (replies_.size() >= sinks_.size()) {
        fail("unrequested reply from " + label_);
        return false;
      }
      replies_.push_back(std::move(reply));
    }
  }

  std::vector<socket_address> addrs_;
  std::size_t addr_at_{0};
  int connect_error_{0};
  std::string label_;
  std::chrono::milliseconds connect_timeout_;
  redis_clock::time_point connect_by_;
  int fd_{-1};
  phase state_{phase::connecting};
  std::string failure_;
  bool timed_out_{false};

  resp_request handshake_;
  std::vector<std::string> handshake_names_;
  std::size_t handshake_left_{0};
  bool handshake_sent_{false};

  resp_reader reader_;
  std::size_t max_reply_;
  std::vector<char> rbuf_;
  std::vector<reply_sink> sinks_;
  std::vector<std::unique_ptr<resp_reply>> replies_;
  std::vector<iovec> iov_;
  std::size_t iov_at_{0};
};

/// @brief Advances every connection in `conns` until each has finished its exchange or failed,
/// or `stop()` returns true (checked after every wake-up); at `deadline` (or, for one still
/// connecting, its connect deadline) an unfinished connection fails as timed out, `budget`
/// naming the time it had. Returns at the deadline at the latest.
template <class Stop>
void drive(std::span<redis_connection* const> conns, redis_clock::time_point deadline, std::chrono::milliseconds budget,
           Stop&& stop) {
  std::vector<pollfd> fds;
  std::vector<redis_connection*> live;
  for (;;) {
    fds.clear();
    live.clear();
    const auto now = redis_clock::now();
    auto wake = redis_clock::time_point::max();
    for (redis_connection* c : conns) {
      const short e = c->events();
      if (e == 0) continue;
      const auto due = c->deadline(deadline);
      if (now >= due) {
        c->time_out(budget);
        continue;
      }
      wake = std::min(wake, due);
      fds.push_back({c->fd(), e, 0});
      live.push_back(c);
    }
    if (live.empty()) return;
    const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(wake - now);
    timespec ts{static_cast<time_t>(left.count() / 1000000000), static_cast<long>(left.count() % 1000000000)};
    const int n = ::ppoll(fds.data(), fds.size(), &ts, nullptr);
    if (n < 0) {
      if (errno == EINTR) continue;
      const std::string why = "poll failed: " + redis_errno_text(errno);
      for (redis_connection* c : live) c->fail(why);
      return;
    }
    for (std::size_t i = 0; i < fds.size(); ++i)
      if (fds[i].revents != 0) live[i]->on_events(fds[i].revents);
    if (stop()) return;
  }
}

inline void drive(std::span<redis_connection* const> conns, redis_clock::time_point deadline, std::chrono::milliseconds budget) {
  drive(conns, deadline, budget, [] { return false; });
}

}  // namespace kvortex::detail

#endif
