#pragma once
// The frames `lookup_server` and `lookup_client` exchange over a Unix stream socket. Both ends run
// on one host, so integers travel in the host's byte order.

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex::detail {

inline constexpr std::uint32_t lookup_query_magic = 0x514C564BU;  // "KVLQ"
inline constexpr std::uint32_t lookup_reply_magic = 0x524C564BU;  // "KVLR"
inline constexpr std::uint16_t lookup_wire_version = 1;

/// A query: the header, then `salt_bytes` bytes of salt, then `tokens` token ids.
struct lookup_query_header {
  std::uint32_t magic;
  std::uint16_t version;
  std::uint16_t reserved;
  std::uint64_t id;
  std::uint32_t salt_bytes;
  std::uint32_t tokens;
};
static_assert(sizeof(lookup_query_header) == 24);

/// A reply: `status` 0 and the hit tokens, or an `errc` value and 0.
struct lookup_reply {
  std::uint32_t magic;
  std::uint16_t version;
  std::uint16_t status;
  std::uint64_t id;
  std::uint64_t tokens;
};
static_assert(sizeof(lookup_reply) == 24);

/// What `parse_query` found at the start of a buffer.
enum class frame_status : std::uint8_t { complete, incomplete, malformed };

/// A complete query, pointing into the buffer it was parsed from.
struct parsed_query {
  std::uint64_t id{0};
  std::span<const std::byte> salt;
  std::span<const std::byte> tokens;  ///< `count` token ids, unaligned: copy them out
  std::size_t count{0};
  std::size_t size{0};  ///< bytes of the whole frame
};

/// Parses the first query in `in`. `malformed`: a wrong magic or version, no tokens, or more
/// tokens or salt than the limits allow (the connection is then closed); `incomplete`: the frame
/// is well formed so far but not all of it has arrived. Reads nothing beyond `in`.
inline frame_status parse_query(std::span<const std::byte> in, std::size_t max_tokens, std::size_t max_salt_bytes,
                                parsed_query& out) noexcept {
  if (in.size() < sizeof(lookup_query_header)) return frame_status::incomplete;
  lookup_query_header h;
  std::memcpy(&h, in.data(), sizeof h);
  if (h.magic != lookup_query_magic || h.version != lookup_wire_version || h.tokens == 0 || h.tokens > max_tokens ||
      h.salt_bytes > max_salt_bytes)
    return frame_status::malformed;
  const std::size_t total = sizeof h + std::size_t{h.salt_bytes} + std::size_t{h.tokens} * sizeof(token_id);
  if (in.size() < total) return frame_status::incomplete;
  out.id = h.id;
  out.salt = in.subspan(sizeof h, h.salt_bytes);
  out.tokens = in.subspan(sizeof h + h.salt_bytes, std::size_t{h.tokens} * sizeof(token_id));
  out.count = h.tokens;
  out.size = total;
  return frame_status::complete;
}

/// Parses the first reply in `in` (nullopt until 24 bytes arrived); a wrong magic or version is
/// `malformed` through `ok == false`.
struct parsed_reply {
  bool ok{false};
  lookup_reply reply{};
};
inline std::optional<parsed_reply> parse_reply(std::span<const std::byte> in) noexcept {
  if (in.size() < sizeof(lookup_reply)) return std::nullopt;
  parsed_reply r;
  std::memcpy(&r.reply, in.data(), sizeof r.reply);
  r.ok = r.reply.magic == lookup_reply_magic && r.reply.version == lookup_wire_version;
  return r;
}

inline result<sockaddr_un> unix_address(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(a.sun_path) || path.find('\0') != std::string::npos)
    return fail(errc::invalid_argument, "socket path '" + path + "' is empty, has a NUL or is longer than " +
                                            std::to_string(sizeof(a.sun_path) - 1) + " bytes");
  std::memcpy(a.sun_path, path.data(), path.size());
  return a;
}

inline std::string errno_text(int e) { return std::string(std::strerror(e)) + " (errno " + std::to_string(e) + ")"; }

/// Closes a descriptor once.
class unique_fd {
 public:
  unique_fd() = default;
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& o) noexcept : fd_(o.release()) {}
  unique_fd& operator=(unique_fd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  ~unique_fd() { reset(); }
  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] explicit operator bool() const noexcept { return fd_ >= 0; }
  int release() noexcept {
    const int f = fd_;
    fd_ = -1;
    return f;
  }
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

/// Writes all of `bytes` to a non-blocking socket, waiting up to `timeout_ms` in total for room.
inline result<void> send_all(int fd, std::span<const std::byte> bytes, int timeout_ms) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n > 0) {
      bytes = bytes.subspan(static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd, POLLOUT, 0};
      const int r = ::poll(&p, 1, timeout_ms);
      if (r == 0) return fail(errc::backend_failure, "lookup socket: send timed out");
      if (r < 0 && errno != EINTR) return fail(errc::backend_failure, "lookup socket: poll: " + errno_text(errno));
      continue;
    }
    return fail(errc::backend_failure, "lookup socket: send: " + errno_text(errno));
  }
  return {};
}

inline void set_nonblocking(int fd) noexcept {
  const int fl = ::fcntl(fd, F_GETFL, 0);
  if (fl >= 0) (void)::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

}  // namespace kvortex::detail
