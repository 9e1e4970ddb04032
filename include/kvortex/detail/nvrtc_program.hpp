#pragma once
/// @file nvrtc_program.hpp
/// @brief Compiles kernel source with NVRTC at first use, caches the cubin on disk, and loads it
/// through the runtime API (`cudaLibraryLoadData`, `cudaLibraryGetKernel`).
///
/// NVRTC is used when `KVORTEX_WITH_NVRTC` is defined (CMake defines it when it finds the library);
/// otherwise every compile answers `errc::unsupported` and callers fall back to DMA-only copies.
/// Compiling needs no GPU, so CI can check the kernel source for any architecture.
///
/// Cache: `$KVORTEX_CACHE_DIR`, else `$XDG_CACHE_HOME/kvortex`, else `$HOME/.cache/kvortex`; one file
/// per hash of (source, options, architecture, NVRTC version). Unwritable caches are ignored.

#include <cuda_runtime.h>
#ifdef KVORTEX_WITH_NVRTC
#include <nvrtc.h>
#endif
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "kvortex/detail/cuda_runtime.hpp"
#include "kvortex/detail/transfer_kernels.hpp"
#include "kvortex/error.hpp"

namespace kvortex::detail::nvrtc {

/// Whether this build can compile kernels at run time.
inline constexpr bool available =
#ifdef KVORTEX_WITH_NVRTC
    true;
#else
    false;
#endif

/// NVRTC's version as `major * 1000 + minor * 10` (CUDA's convention), or an error.
[[nodiscard]] inline result<int> version() {
#ifdef KVORTEX_WITH_NVRTC
  int major = 0, minor = 0;
  if (nvrtcVersion(&major, &minor) != NVRTC_SUCCESS) return fail(errc::unsupported, "nvrtcVersion failed");
  return major * 1000 + minor * 10;
#else
  return fail(errc::unsupported, "built without NVRTC (KVORTEX_WITH_NVRTC undefined)");
#endif
}

/// 64-bit FNV-1a, enough to name cache files.
[[nodiscard]] constexpr std::uint64_t fnv1a(std::string_view s, std::uint64_t h = 0xcbf29ce484222325ULL) noexcept {
  for (const char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

/// The cubin cache directory (not created here).
[[nodiscard]] inline std::filesystem::path cache_dir() {
  if (const char* d = std::getenv("KVORTEX_CACHE_DIR"); d != nullptr && *d != '\0') return d;
  if (const char* d = std::getenv("XDG_CACHE_HOME"); d != nullptr && *d != '\0')
    return std::filesystem::path(d) / "kvortex";
  if (const char* d = std::getenv("HOME"); d != nullptr && *d != '\0')
    return std::filesystem::path(d) / ".cache" / "kvortex";
  return std::filesystem::temp_directory_path() / "kvortex-cache";
}

#ifdef KVORTEX_WITH_NVRTC
namespace impl {
inline error nvrtc_error(nvrtcResult r, std::string_view what, std::string log = {}) {
  std::string msg(what);
  msg += ": ";
  msg += nvrtcGetErrorString(r);
  if (!log.empty()) {
    msg += "\n";
    msg += log;
  }
  return {errc::unsupported, std::move(msg)};
}
struct program_guard {
  nvrtcProgram p{};
  ~program_guard() {
    if (p != nullptr) (void)nvrtcDestroyProgram(&p);
  }
};
}  // namespace impl
#endif

/// The best cubin architecture NVRTC offers for a device of compute capability `major.minor`:
/// the highest supported `sm_<major><m>` with `m <= minor` (cubins run on later minors of a major).
[[nodiscard]] inline result<int> pick_arch([[maybe_unused]] int major, [[maybe_unused]] int minor) {
#ifdef KVORTEX_WITH_NVRTC
  int n = 0;
  if (auto r = nvrtcGetNumSupportedArchs(&n); r != NVRTC_SUCCESS) return std::unexpected(impl::nvrtc_error(r, "nvrtcGetNumSupportedArchs"));
  std::vector<int> archs(static_cast<std::size_t>(n));
  if (auto r = nvrtcGetSupportedArchs(archs.data()); r != NVRTC_SUCCESS)
    return std::unexpected(impl::nvrtc_error(r, "nvrtcGetSupportedArchs"));
  int best = -1;
  for (const int a : archs)
    if (a / 10 == major && a % 10 <= minor && a > best) best = a;
  if (best < 0)
    return fail(errc::unsupported, "NVRTC cannot build cubins for compute capability " + std::to_string(major) + "." +
                                       std::to_string(minor));
  return best;
#else
  return std::unexpected(version().error());
#endif
}

/// Compiles `source` to a cubin for `sm_<arch>` (e.g. 80, 90). Needs no GPU.
[[nodiscard]] inline result<std::vector<char>> compile_cubin([[maybe_unused]] std::string_view source,
                                                             [[maybe_unused]] std::string_view name,
                                                             [[maybe_unused]] int arch) {
#ifdef KVORTEX_WITH_NVRTC
  impl::program_guard g;
  const std::string src(source), nm(name);
  if (auto r = nvrtcCreateProgram(&g.p, src.c_str(), nm.c_str(), 0, nullptr, nullptr); r != NVRTC_SUCCESS)
    return std::unexpected(impl::nvrtc_error(r, "nvrtcCreateProgram"));
  const std::string arch_opt = "--gpu-architecture=sm_" + std::to_string(arch);
  const char* opts[] = {arch_opt.c_str(), "-std=c++17", "--extra-device-vectorization"};
  const auto rc = nvrtcCompileProgram(g.p, 3, opts);
  if (rc != NVRTC_SUCCESS) {
    std::size_t n = 0;
    std::string log;
    if (nvrtcGetProgramLogSize(g.p, &n) == NVRTC_SUCCESS && n > 1) {
      log.resize(n);
      (void)nvrtcGetProgramLog(g.p, log.data());
    }
    return std::unexpected(impl::nvrtc_error(rc, "nvrtcCompileProgram(" + arch_opt + ")", std::move(log)));
  }
  std::size_t n = 0;
  if (auto r = nvrtcGetCUBINSize(g.p, &n); r != NVRTC_SUCCESS) return std::unexpected(impl::nvrtc_error(r, "nvrtcGetCUBINSize"));
  if (n == 0) return fail(errc::unsupported, "NVRTC produced an empty cubin for " + arch_opt);
  std::vector<char> cubin(n);
  if (auto r = nvrtcGetCUBIN(g.p, cubin.data()); r != NVRTC_SUCCESS) return std::unexpected(impl::nvrtc_error(r, "nvrtcGetCUBIN"));
  return cubin;
#else
  return std::unexpected(version().error());
#endif
}

/// The cache file for `source` built for `sm_<arch>`.
[[nodiscard]] inline result<std::filesystem::path> cache_path(std::string_view source, int arch) {
  auto v = version();
  if (!v) return std::unexpected(v.error());
  std::string key(source);
  key += "\x01-std=c++17 --extra-device-vectorization\x01sm_" + std::to_string(arch) + "\x01nvrtc " + std::to_string(*v);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(fnv1a(key)));
  return cache_dir() / ("kvortex-" + std::string(hex) + "-sm_" + std::to_string(arch) + ".cubin");
}

// POSIX I/O, not iostreams: a stream's locale facets can belong to another C++ runtime loaded
// into the process (PyTorch's), which crashed a stream parse.
[[nodiscard]] inline std::vector<char> read_whole_file(const std::filesystem::path& p) {
  std::vector<char> out;
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n < 0) out.clear();
      break;
    }
    out.insert(out.end(), buf, buf + n);
  }
  ::close(fd);
  return out;
}
[[nodiscard]] inline bool write_whole_file(const std::filesystem::path& p, const std::vector<char>& bytes) {
  const int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<std::size_t>(n);
  }
  return ::close(fd) == 0 && done == bytes.size();
}

/// A cubin for `source` and `sm_<arch>`: read from the disk cache, else compiled and written there.
[[nodiscard]] inline result<std::vector<char>> cached_cubin(std::string_view source, std::string_view name, int arch) {
  auto path = cache_path(source, arch);
  if (!path) return std::unexpected(path.error());
  if (auto bytes = read_whole_file(*path); !bytes.empty()) return bytes;
  auto cubin = compile_cubin(source, name, arch);
  if (!cubin) return cubin;
  std::error_code ec;
  std::filesystem::create_directories(path->parent_path(), ec);
  if (!ec) {
    // Write aside and rename, so a reader never sees half a file.
    auto tmp = *path;
    tmp += ".tmp" + std::to_string(::getpid());
    if (!write_whole_file(tmp, *cubin)) {
      std::filesystem::remove(tmp, ec);
      return cubin;
    }
    std::filesystem::rename(tmp, *path, ec);
    if (ec) std::filesystem::remove(tmp, ec);
  }
  return cubin;
}

/// The transfer kernels, loaded for one architecture. Process-wide; never unloaded (a library
/// unloaded during static destruction could outlive the runtime).
struct transfer_kernels {
  cudaKernel_t gather{};
  cudaKernel_t scatter{};
  int arch{0};
};

/// The transfer kernels for `device`, compiled (or read from the cache) and loaded on first use.
/// Thread-safe; a failure is remembered per architecture so it is not retried on every call.
[[nodiscard]] inline result<transfer_kernels> load_transfer_kernels(int device) {
  auto info = cuda::query(device);
  if (!info) return std::unexpected(info.error());
  static std::mutex m;
  static std::map<int, result<transfer_kernels>> loaded;  // key: cc major*10+minor
  const int cc = info->cc_major * 10 + info->cc_minor;
  std::lock_guard lk(m);
  if (auto it = loaded.find(cc); it != loaded.end()) return it->second;
  auto make = [&]() -> result<transfer_kernels> {
    auto arch = pick_arch(info->cc_major, info->cc_minor);
    if (!arch) return std::unexpected(arch.error());
    auto cubin = cached_cubin(transfer_kernels_source, "kvortex_transfer.cu", *arch);
    if (!cubin) return std::unexpected(cubin.error());
    cuda::device_guard dg(info->id);
    cudaLibrary_t lib{};
    if (auto r = cuda::check(cudaLibraryLoadData(&lib, cubin->data(), nullptr, nullptr, 0, nullptr, nullptr, 0),
                             "cudaLibraryLoadData", errc::unsupported);
        !r)
      return std::unexpected(r.error());
    transfer_kernels k;
    k.arch = *arch;
    if (auto r = cuda::check(cudaLibraryGetKernel(&k.gather, lib, gather_kernel_name), "cudaLibraryGetKernel(gather)",
                             errc::unsupported);
        !r)
      return std::unexpected(r.error());
    if (auto r = cuda::check(cudaLibraryGetKernel(&k.scatter, lib, scatter_kernel_name),
                             "cudaLibraryGetKernel(scatter)", errc::unsupported);
        !r)
      return std::unexpected(r.error());
    return k;
  };
  auto r = make();
  loaded.emplace(cc, r);
  return r;
}

}  // namespace kvortex::detail::nvrtc
