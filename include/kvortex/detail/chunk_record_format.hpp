#pragma once
/// @file chunk_record_format.hpp
/// @brief Constants of the stored chunk record's layout that code without xxHash needs too (the
/// disk tier's configuration checks its capacity against them).

#include <cstddef>

namespace kvortex::detail {

/// Disk files pad the header and the payload's end to this block, the largest direct-I/O
/// alignment in common use, so the payload can be read straight into an aligned buffer.
inline constexpr std::size_t chunk_record_block = 4096;

}  // namespace kvortex::detail
