#pragma once
/// @file cuda_runtime.hpp
/// @brief CUDA runtime errors as `kvortex::error` values, and the device queries the GPU path needs.
///
/// Only the runtime API (libcudart) is used: a program linked to it starts on a machine without a
/// driver, where every query answers `errc::unsupported` ("no CUDA device").

#include <cuda_runtime.h>

#include <fcntl.h>
#include <unistd.h>

#include <cctype>
#include <charconv>
#include <cstdio>
#include <system_error>
#include <string>
#include <string_view>

#include "kvortex/error.hpp"

namespace kvortex::detail::cuda {

/// True for the codes that mean "there is no usable GPU here" rather than "a call failed".
[[nodiscard]] inline bool is_no_device(cudaError_t e) noexcept {
  return e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice ||
         e == cudaErrorDevicesUnavailable || e == cudaErrorStubLibrary || e == cudaErrorSystemNotReady ||
         e == cudaErrorSystemDriverMismatch || e == cudaErrorCompatNotSupportedOnDevice;
}

/// The `kvortex::error` for a failed runtime call: out-of-memory codes map to
/// `errc::out_of_memory`, missing devices to `errc::unsupported`, anything else to `fallback`.
[[nodiscard]] inline error to_error(cudaError_t e, std::string_view what, errc fallback = errc::transfer_failure) {
  std::string msg(what);
  msg += ": ";
  msg += cudaGetErrorName(e);
  msg += " (";
  msg += cudaGetErrorString(e);
  msg += ")";
  if (e == cudaErrorMemoryAllocation || e == cudaErrorHostMemoryAlreadyRegistered) return {errc::out_of_memory, msg};
  if (is_no_device(e)) return {errc::unsupported, "no CUDA device: " + msg};
  return {fallback, std::move(msg)};
}

/// `{}` on success, else the error for `e`. Clears the runtime's last-error slot on failure so a
/// non-sticky error does not resurface in an unrelated later call.
[[nodiscard]] inline result<void> check(cudaError_t e, std::string_view what, errc fallback = errc::transfer_failure) {
  if (e == cudaSuccess) return {};
  (void)cudaGetLastError();
  return std::unexpected(to_error(e, what, fallback));
}

/// How many CUDA devices are usable; 0 when there is no driver or no device.
[[nodiscard]] inline int device_count() noexcept {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

/// True when at least one CUDA device is usable.
[[nodiscard]] inline bool has_device() noexcept { return device_count() > 0; }

/// The device to use: `device` when >= 0, else the calling thread's current device.
/// Fails with `errc::unsupported` ("no CUDA device") when there is none.
[[nodiscard]] inline result<int> require_device(int device = -1) {
  const int n = device_count();
  if (n == 0) return fail(errc::unsupported, "no CUDA device");
  if (device >= n)
    return fail(errc::invalid_argument, "CUDA device " + std::to_string(device) + " does not exist (" +
                                            std::to_string(n) + " present)");
  if (device >= 0) return device;
  int cur = 0;
  if (auto r = check(cudaGetDevice(&cur), "cudaGetDevice", errc::unsupported); !r) return std::unexpected(r.error());
  return cur;
}

/// What the transfer path needs to know about a device.
struct device_info {
  int id{0};
  int cc_major{0};
  int cc_minor{0};
  int sm_count{0};
  std::string name;
  std::string pci_bus_id;  ///< lower case, e.g. "0000:1b:00.0"
  int numa_node{-1};       ///< from sysfs; -1 when unknown
};

/// The NUMA node of a PCI device, read from /sys/bus/pci/devices/<bus id>/numa_node; -1 if unknown.
/// Plain POSIX reads and from_chars, no iostreams: a stream's locale facets can come from another
/// C++ runtime loaded into the process (PyTorch's), and parsing a number through them crashed.
[[nodiscard]] inline int pci_numa_node(const std::string& bus_id) {
  const std::string path = "/sys/bus/pci/devices/" + bus_id + "/numa_node";
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  char buf[32];
  const ssize_t n = ::read(fd, buf, sizeof buf);
  ::close(fd);
  if (n <= 0) return -1;
  const char* end = buf + n;
  const char* p = buf;
  const bool negative = p < end && *p == '-';
  if (negative) ++p;
  int node = -1;
  const auto [q, ec] = std::from_chars(p, end, node);
  if (ec != std::errc{} || q == p) return -1;
  return negative || node < 0 ? -1 : node;
}

/// Properties of `device` (or the current one when -1).
[[nodiscard]] inline result<device_info> query(int device = -1) {
  auto d = require_device(device);
  if (!d) return std::unexpected(d.error());
  device_info out;
  out.id = *d;
  const auto attr = [&](cudaDeviceAttr a, int& v, const char* what) {
    return check(cudaDeviceGetAttribute(&v, a, out.id), what, errc::unsupported);
  };
  if (auto r = attr(cudaDevAttrComputeCapabilityMajor, out.cc_major, "cudaDeviceGetAttribute(cc major)"); !r)
    return std::unexpected(r.error());
  if (auto r = attr(cudaDevAttrComputeCapabilityMinor, out.cc_minor, "cudaDeviceGetAttribute(cc minor)"); !r)
    return std::unexpected(r.error());
  if (auto r = attr(cudaDevAttrMultiProcessorCount, out.sm_count, "cudaDeviceGetAttribute(SM count)"); !r)
    return std::unexpected(r.error());
  char bus[64] = {};
  if (cudaDeviceGetPCIBusId(bus, sizeof bus, out.id) == cudaSuccess) {
    out.pci_bus_id = bus;
    for (auto& c : out.pci_bus_id) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    out.numa_node = pci_numa_node(out.pci_bus_id);
  } else {
    (void)cudaGetLastError();
  }
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, out.id) == cudaSuccess)
    out.name = p.name;
  else
    (void)cudaGetLastError();
  return out;
}

/// Makes `device` current for the calling thread for the guard's lifetime.
class device_guard {
 public:
  explicit device_guard(int device) noexcept {
    if (cudaGetDevice(&prev_) != cudaSuccess) {
      (void)cudaGetLastError();
      prev_ = -1;
    }
    if (prev_ != device && cudaSetDevice(device) != cudaSuccess) (void)cudaGetLastError();
    set_ = device;
  }
  device_guard(const device_guard&) = delete;
  device_guard& operator=(const device_guard&) = delete;
  ~device_guard() {
    if (prev_ >= 0 && prev_ != set_) (void)cudaSetDevice(prev_);
  }

 private:
  int prev_{-1};
  int set_{-1};
};

}  // namespace kvortex::detail::cuda
