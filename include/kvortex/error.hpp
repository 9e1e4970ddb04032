#pragma once
/// @file error.hpp
/// @brief The error value every fallible KVortex call returns inside `std::expected`.

#include <cstdint>
#include <expected>
#include <string>
#include <string_view>
#include <utility>

namespace kvortex {

/// @brief What went wrong, coarse enough to branch on.
enum class errc : std::uint8_t {
  invalid_argument = 1,   ///< null pointer, empty input, value out of range
  size_mismatch,          ///< a buffer or layout disagrees with the sizes it must hold
  invalid_layout,         ///< a KV layout descriptor is inconsistent
  invalid_config,         ///< an engine configuration is unusable
  out_of_memory,          ///< an allocator could not serve the request
  capacity_exhausted,     ///< nothing evictable is left to make room
  not_found,              ///< a key is not stored
  shut_down,              ///< the engine was shut down
  unsupported,            ///< the build or platform lacks the feature
  backend_failure,        ///< a backend failed to store or fetch
  transfer_failure,       ///< a copy failed
  internal,               ///< a broken invariant; please report it
};

/// @brief Stable lower-case name of an error code, e.g. "size_mismatch".
[[nodiscard]] constexpr std::string_view to_string(errc c) noexcept {
  switch (c) {
    case errc::invalid_argument: return "invalid_argument";
    case errc::size_mismatch: return "size_mismatch";
    case errc::invalid_layout: return "invalid_layout";
    case errc::invalid_config: return "invalid_config";
    case errc::out_of_memory: return "out_of_memory";
    case errc::capacity_exhausted: return "capacity_exhausted";
    case errc::not_found: return "not_found";
    case errc::shut_down: return "shut_down";
    case errc::unsupported: return "unsupported";
    case errc::backend_failure: return "backend_failure";
    case errc::transfer_failure: return "transfer_failure";
    case errc::internal: return "internal";
  }
  return "unknown";
}

/// @brief An error code with a human-readable message naming the offending value.
struct error {
  errc code{errc::internal};
  std::string message;

  error() = default;
  error(errc c, std::string msg) : code(c), message(std::move(msg)) {}

  /// @brief "code: message", for logs.
  [[nodiscard]] std::string what() const {
    std::string s(to_string(code));
    s += ": ";
    s += message;
    return s;
  }
  friend bool operator==(const error& a, const error& b) = default;
};

/// @brief The return type of every fallible call.
template <class T>
using result = std::expected<T, error>;

/// @brief Shorthand for `std::unexpected(error{c, msg})`.
[[nodiscard]] inline std::unexpected<error> fail(errc c, std::string msg) {
  return std::unexpected<error>(error{c, std::move(msg)});
}

}  // namespace kvortex
