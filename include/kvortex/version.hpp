#pragma once
/// @file version.hpp
/// @brief Library version.

#define KVORTEX_VERSION_MAJOR 0
#define KVORTEX_VERSION_MINOR 1
#define KVORTEX_VERSION_PATCH 0

namespace kvortex {
/// @brief "major.minor.patch".
inline constexpr const char* version_string = "0.1.0";
}  // namespace kvortex
