#pragma once
/// @file disk_io.hpp
/// @brief The disk tier's I/O, in one place: positional transfers of iovec lists with
/// `preadv`/`pwritev`, and, where the build has liburing, an io_uring ring that keeps several
/// requests of one transfer in flight while the caller works (checksums) between completions.
///
/// liburing is used when `KVORTEX_WITH_LIBURING` is defined (the CMake option links `-luring`)
/// and <liburing.h> is found; `KVORTEX_HAS_LIBURING` is defined then. Linux only.

#include <fcntl.h>
#include <limits.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#if defined(KVORTEX_WITH_LIBURING) && __has_include(<liburing.h>)
#define KVORTEX_HAS_LIBURING 1
#include <liburing.h>
#endif

namespace kvortex::detail::disk_io {

/// Every byte of `iov` from/to `fd` at `offset`: the bytes moved (fewer only when a read meets the
/// end of the file), or -errno. Consumes `iov`.
template <bool write>
[[nodiscard]] inline std::int64_t transfer(int fd, std::span<iovec> iov, off_t offset) noexcept {
  std::size_t first = 0;
  std::int64_t done = 0;
  while (first < iov.size()) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    const int count = static_cast<int>(std::min<std::size_t>(iov.size() - first, IOV_MAX));
    const ssize_t n = write ? ::pwritev(fd, &iov[first], count, offset) : ::preadv(fd, &iov[first], count, offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) {
      if (write) return -EIO;
      break;
    }
    done += n;
    offset += n;
    auto left = static_cast<std::size_t>(n);
    while (left > 0 && first < iov.size()) {
      if (left >= iov[first].iov_len) {
        left -= iov[first].iov_len;
        ++first;
      } else {
        iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
        iov[first].iov_len -= left;
        left = 0;
      }
    }
  }
  return done;
}

[[nodiscard]] inline std::string errno_text(int e) { return std::error_code(e, std::generic_category()).message(); }

/// A file descriptor closed on scope exit.
class unique_fd {
 public:
  unique_fd() = default;
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;
  ~unique_fd() { reset(); }
  [[nodiscard]] int get() const noexcept { return fd_; }
  [[nodiscard]] explicit operator bool() const noexcept { return fd_ >= 0; }
  /// Closes now; returns close()'s errno, 0 on success.
  int reset() noexcept {
    int e = 0;
    if (fd_ >= 0 && ::close(fd_) != 0) e = errno;
    fd_ = -1;
    return e;
  }

 private:
  int fd_{-1};
};

#ifdef KVORTEX_HAS_LIBURING

/// One io_uring and the requests of the transfer it is running: one file, all reads or all
/// writes, each request a buffer at a file offset. `push` queues requests (submitted up to the
/// depth), `pump` reaps completions, resubmits the rest of a short transfer and refills the
/// queue, so a caller can do other work between calls and still keep `depth` requests in flight.
/// After an error or an early end of file nothing more is submitted; `drain` (and `pump` until
/// `busy()` is false) waits for what is in flight, so no buffer is released while the kernel may
/// still use it. Used by one thread at a time (`ring_pool` hands rings out).
class ring {
 public:
  /// A ring of `depth` requests in flight: nullptr and `err` = errno when the kernel refuses
  /// (seccomp, `kernel.io_uring_disabled`, memory limits).
  [[nodiscard]] static std::unique_ptr<ring> create(unsigned depth, int& err) noexcept {
    std::unique_ptr<ring> r(new (std::nothrow) ring);
    if (!r) {
      err = ENOMEM;
      return nullptr;
    }
    const int rc = ::io_uring_queue_init(depth, &r->ring_, 0);
    if (rc < 0) {
      err = -rc;
      return nullptr;
    }
    r->ready_ = true;
    r->depth_ = depth;
    err = 0;
    return r;
  }

  ring(const ring&) = delete;
  ring& operator=(const ring&) = delete;
  ~ring() {
    drain();
    if (ready_) ::io_uring_queue_exit(&ring_);
  }

  /// One NOP through the ring and back: whether submission and completion work at all.
  [[nodiscard]] int probe() noexcept {
    io_uring_sqe* sqe = ::io_uring_get_sqe(&ring_);
    if (sqe == nullptr) return EBUSY;
    ::io_uring_prep_nop(sqe);
    ::io_uring_sqe_set_data64(sqe, ~std::uint64_t{0});
    if (const int rc = ::io_uring_submit(&ring_); rc < 0) return -rc;
    io_uring_cqe* cqe = nullptr;
    int rc;
    do rc = ::io_uring_wait_cqe(&ring_, &cqe);
    while (rc == -EINTR);
    if (rc < 0) return -rc;
    const int res = cqe->res;
    ::io_uring_cqe_seen(&ring_, cqe);
    return res < 0 ? -res : 0;
  }

  /// Starts a transfer on `fd`: reads, or writes when `write`. No request may be in flight.
  /// Returns false when the request list cannot be allocated.
  [[nodiscard]] bool begin(int fd, bool write, std::size_t expected_requests) noexcept {
    fd_ = fd;
    write_ = write;
    reqs_.clear();
    next_ = 0;
    in_flight_ = 0;
    finished_ = 0;
    error_ = 0;
    eof_ = false;
    try {
      reqs_.reserve(expected_requests);
    } catch (...) {
      return false;
    }
    return true;
  }

  /// Queues `len` bytes at `buf` to or from file offset `off`; returns its index. Submitted by
  /// the next `pump`. The list was reserved by `begin`, so a push within it does not allocate.
  std::size_t push(void* buf, std::size_t len, std::uint64_t off) {
    reqs_.push_back(request{static_cast<char*>(buf), len, off, 0, false});
    return reqs_.size() - 1;
  }

  /// Submits queued requests up to the depth, then reaps completions: waits for at least one
  /// when `wait` and something is in flight, else takes only those already there.
  void pump(bool wait) noexcept {
    fill();
    if (in_flight_ == 0) return;
    io_uring_cqe* cqe = nullptr;
    if (wait) {
      int rc;
      do rc = ::io_uring_wait_cqe(&ring_, &cqe);
      while (rc == -EINTR);
      if (rc < 0) {
        fail(-rc);
        return;
      }
    }
    unsigned head;
    unsigned seen = 0;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      complete(static_cast<std::size_t>(::io_uring_cqe_get_data64(cqe)), cqe->res);
    }
    ::io_uring_cq_advance(&ring_, seen);
    fill();
  }

  /// Waits for every request in flight; submits nothing more.
  void drain() noexcept {
    if (!ready_) return;
    next_ = reqs_.size();
    while (in_flight_ > 0) {
      io_uring_cqe* cqe = nullptr;
      const int rc = ::io_uring_wait_cqe(&ring_, &cqe);
      if (rc == -EINTR) continue;
      if (rc < 0) return;  // cannot happen with requests in flight; nothing left to wait on
      --in_flight_;
      ::io_uring_cqe_seen(&ring_, cqe);
    }
  }

  /// Requests queued or in flight (after an error or end of file: in flight only).
  [[nodiscard]] bool busy() const noexcept { return in_flight_ > 0 || (ok() && next_ < reqs_.size()); }
  /// Whether request `i` moved all its bytes.
  [[nodiscard]] bool finished(std::size_t i) const noexcept { return i < reqs_.size() && reqs_[i].complete; }
  /// Whether a submission failed, leaving entries in the queue: the ring must not be reused.
  [[nodiscard]] bool broken() const noexcept { return broken_; }
  /// The first error (an errno), 0 when none.
  [[nodiscard]] int error() const noexcept { return error_; }
  /// Whether a read met the end of the file before its last byte.
  [[nodiscard]] bool eof() const noexcept { return eof_; }

 private:
  struct request {
    char* buf;
    std::size_t len;
    std::uint64_t off;
    std::size_t done;
    bool complete;
  };

  ring() = default;

  [[nodiscard]] bool ok() const noexcept { return error_ == 0 && !eof_; }

  void fail(int e) noexcept {
    if (error_ == 0) error_ = e;
  }

  void prep(std::size_t i) noexcept {
    io_uring_sqe* sqe = ::io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {  // cannot happen: at most `depth` entries are ever queued or in flight
      fail(EBUSY);
      broken_ = true;
      return;
    }
    request& r = reqs_[i];
    const auto n = static_cast<unsigned>(std::min<std::size_t>(r.len - r.done, std::size_t{1} << 30));
    if (write_)
      ::io_uring_prep_write(sqe, fd_, r.buf + r.done, n, r.off + r.done);
    else
      ::io_uring_prep_read(sqe, fd_, r.buf + r.done, n, r.off + r.done);
    ::io_uring_sqe_set_data64(sqe, i);
    ++in_flight_;
  }

  void fill() noexcept {
    bool added = false;
    while (ok() && in_flight_ < depth_ && next_ < reqs_.size()) {
      prep(next_++);
      added = true;
    }
    if (resubmit_ || added) {
      resubmit_ = false;
      int rc;
      do rc = ::io_uring_submit(&ring_);
      while (rc == -EINTR);
      if (rc < 0) {
        // The prepared entries stay in the submission queue: nothing of them reaches the kernel
        // or comes back, so they are no longer counted as in flight, and the ring (whose queue
        // still names this call's buffers) is not used again.
        fail(-rc);
        broken_ = true;
        in_flight_ -= std::min<unsigned>(in_flight_, ::io_uring_sq_ready(&ring_));
      }
    }
  }

  void complete(std::size_t i, int res) noexcept {
    --in_flight_;
    if (i >= reqs_.size()) return;  // the probe's NOP
    request& r = reqs_[i];
    if (res == -EINTR || res == -EAGAIN) {
      if (ok()) {
        prep(i);
        resubmit_ = true;
      }
      return;
    }
    if (res < 0) {
      fail(-res);
      return;
    }
    if (res == 0) {  // a read at the end of the file; a write that moves nothing is an error
      if (write_)
        fail(EIO);
      else
        eof_ = true;
      return;
    }
    r.done += static_cast<std::size_t>(res);
    if (r.done < r.len) {  // short: the rest goes as a request of its own
      if (ok()) {
        prep(i);
        resubmit_ = true;
      }
      return;
    }
    r.complete = true;
    ++finished_;
  }

  io_uring ring_{};
  bool ready_{false};
  unsigned depth_{0};
  int fd_{-1};
  bool write_{false};
  std::vector<request> reqs_;
  std::size_t next_{0};  // first request not yet submitted
  unsigned in_flight_{0};
  std::size_t finished_{0};
  int error_{0};
  bool eof_{false};
  bool resubmit_{false};
  bool broken_{false};
};

/// Rings for the threads of one tier: a call takes one (made on first need) and gives it back, so
/// concurrent calls never share a ring and a thread's calls reuse one.
class ring_pool {
 public:
  ring_pool() = default;
  explicit ring_pool(unsigned depth) noexcept : depth_(depth) {}
  ring_pool(const ring_pool&) = delete;
  ring_pool& operator=(const ring_pool&) = delete;

  /// A ring for one call, or nullptr when no new one can be made (`err` then says why).
  [[nodiscard]] std::unique_ptr<ring> take(int& err) noexcept {
    {
      std::lock_guard lock(mu_);
      if (!free_.empty()) {
        auto r = std::move(free_.back());
        free_.pop_back();
        err = 0;
        return r;
      }
    }
    return ring::create(depth_, err);
  }

  /// Keeps `r` for the next call (drops it when broken or when the list cannot grow).
  void give(std::unique_ptr<ring> r) noexcept {
    if (!r || r->broken()) return;
    std::lock_guard lock(mu_);
    try {
      free_.push_back(std::move(r));
    } catch (...) {
    }
  }

 private:
  unsigned depth_{4};
  std::mutex mu_;
  std::vector<std::unique_ptr<ring>> free_;
};

#endif  // KVORTEX_HAS_LIBURING

}  // namespace kvortex::detail::disk_io
