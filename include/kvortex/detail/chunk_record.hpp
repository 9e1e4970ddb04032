#pragma once
/// @file chunk_record.hpp
/// @brief The self-describing record a chunk is stored as below host memory (a disk file, later a
/// Redis value): a fixed header that names the namespace, the key and the payload, with checksums,
/// then the payload. Needs xxHash (XXH3-64 checksums).

#if !__has_include(<xxhash.h>)
#error "kvortex/detail/chunk_record.hpp needs xxHash's <xxhash.h> (Debian: apt-get install libxxhash-dev); the disk tier cannot be used without it"
#else

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <expected>
#include <span>
#include <string_view>
#include <vector>

#include "kvortex/detail/chunk_record_format.hpp"
#include "kvortex/detail/xxhash_include.hpp"

#include "kvortex/types.hpp"

namespace kvortex::detail {

// Record layout, version 1. Every integer is little-endian, whatever the host.
//
//   offset  size  field
//        0     8  magic "\x8BKVX\r\n\x1A\n" (the CR/LF and ^Z catch text-mode mangling)
//        8     2  format version (1)
//       10     2  reserved, 0
//       12     4  header bytes: where the payload starts; >= 128, a multiple of 8, <= 64 KiB.
//                 Bytes [128, header bytes) are zero (a disk file pads its header to one
//                 direct-I/O block so the payload is block aligned).
//       16    32  namespace digest
//       48    32  chunk key
//       80     8  payload bytes
//       88     8  XXH3-64 of the payload
//       96    24  reserved, 0
//      120     8  XXH3-64 of bytes [0, 120)
inline constexpr std::array<std::byte, 8> chunk_record_magic{std::byte{0x8B}, std::byte{'K'}, std::byte{'V'},
                                                             std::byte{'X'},  std::byte{'\r'}, std::byte{'\n'},
                                                             std::byte{0x1A}, std::byte{'\n'}};
inline constexpr std::uint16_t chunk_record_version = 1;
inline constexpr std::size_t chunk_record_fixed_bytes = 128;
inline constexpr std::size_t chunk_record_max_header_bytes = 64 * 1024;
// chunk_record_block (the disk files' block) is in chunk_record_format.hpp.

/// @brief Why a record was refused. Every value but `ok` makes the record a miss.
enum class record_error : std::uint8_t {
  ok = 0,
  too_short,            ///< fewer bytes than the header needs
  bad_magic,            ///< not a KVortex record
  unsupported_version,  ///< written by a newer (or unknown) format version
  header_checksum,      ///< the header's bytes changed
  bad_header_size,      ///< header size out of range, or nonzero reserved or padding bytes
  foreign_namespace,    ///< written under another namespace
  wrong_key,            ///< the record of another chunk
  wrong_size,           ///< payload size is not what the caller expects, or above its limit
  truncated,            ///< fewer payload bytes than the header says
  trailing_bytes,       ///< more bytes than header, payload and padding
  payload_checksum,     ///< the payload's bytes changed
  buffer_too_small,     ///< the caller's output buffer cannot hold the payload
};

/// @brief Stable lower-case name, e.g. "payload_checksum".
[[nodiscard]] constexpr std::string_view to_string(record_error e) noexcept {
  switch (e) {
    case record_error::ok: return "ok";
    case record_error::too_short: return "too_short";
    case record_error::bad_magic: return "bad_magic";
    case record_error::unsupported_version: return "unsupported_version";
    case record_error::header_checksum: return "header_checksum";
    case record_error::bad_header_size: return "bad_header_size";
    case record_error::foreign_namespace: return "foreign_namespace";
    case record_error::wrong_key: return "wrong_key";
    case record_error::wrong_size: return "wrong_size";
    case record_error::truncated: return "truncated";
    case record_error::trailing_bytes: return "trailing_bytes";
    case record_error::payload_checksum: return "payload_checksum";
    case record_error::buffer_too_small: return "buffer_too_small";
  }
  return "unknown";
}

/// @brief What a decoder must find in a record.
struct chunk_record_expect {
  namespace_digest ns{};
  chunk_key key{};
  std::uint64_t payload_bytes{0};      ///< exact payload size required; 0 accepts any size
  std::uint64_t max_payload_bytes{~std::uint64_t{0}};  ///< refuse larger payloads (bounds allocations)
};

/// @brief A header that passed every check.
struct chunk_record_info {
  std::uint32_t header_bytes{0};
  std::uint64_t payload_bytes{0};
  std::uint64_t payload_checksum{0};
};

/// @brief XXH3-64 (seed 0) of a record's payload.
[[nodiscard]] inline std::uint64_t chunk_payload_checksum(std::span<const std::byte> payload) noexcept {
  return XXH3_64bits(payload.data(), payload.size());
}

namespace record_codec {
inline void put_le(std::byte* p, std::uint64_t v, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
}
[[nodiscard]] inline std::uint64_t get_le(const std::byte* p, std::size_t n) noexcept {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v |= std::uint64_t{std::to_integer<std::uint8_t>(p[i])} << (8 * i);
  return v;
}
[[nodiscard]] inline bool all_zero(std::span<const std::byte> s) noexcept {
  for (const std::byte b : s)
    if (b != std::byte{0}) return false;
  return true;
}
inline constexpr std::size_t off_version = 8, off_reserved0 = 10, off_header_bytes = 12, off_ns = 16, off_key = 48,
                             off_payload_bytes = 80, off_payload_sum = 88, off_reserved1 = 96, off_header_sum = 120;
}  // namespace record_codec

/// @brief Writes the header of the record of `payload` into `out[0, header_bytes)`, padding
/// included. `header_bytes` must be at least 128, a multiple of 8 and at most 64 KiB, and `out` at
/// least that long; returns false (writing nothing) otherwise.
[[nodiscard]] inline bool encode_chunk_header(std::span<std::byte> out, const namespace_digest& ns,
                                              const chunk_key& key, std::span<const std::byte> payload,
                                              std::size_t header_bytes = chunk_record_fixed_bytes) noexcept {
  using namespace record_codec;
  if (header_bytes < chunk_record_fixed_bytes || header_bytes > chunk_record_max_header_bytes ||
      header_bytes % 8 != 0 || out.size() < header_bytes)
    return false;
  std::byte* p = out.data();
  std::memset(p, 0, header_bytes);
  std::memcpy(p, chunk_record_magic.data(), chunk_record_magic.size());
  put_le(p + off_version, chunk_record_version, 2);
  put_le(p + off_header_bytes, header_bytes, 4);
  std::memcpy(p + off_ns, ns.data(), ns.size());
  std::memcpy(p + off_key, key.bytes.data(), key.bytes.size());
  put_le(p + off_payload_bytes, payload.size(), 8);
  put_le(p + off_payload_sum, chunk_payload_checksum(payload), 8);
  put_le(p + off_header_sum, XXH3_64bits(p, off_header_sum), 8);
  return true;
}

/// @brief Checks a record's header against `expect`. `bytes` starts at the record and holds at
/// least its header (padding included), possibly more. Never reads outside `bytes`.
[[nodiscard]] inline std::expected<chunk_record_info, record_error> decode_chunk_header(
    std::span<const std::byte> bytes, const chunk_record_expect& expect) noexcept {
  using namespace record_codec;
  if (bytes.size() < chunk_record_fixed_bytes) return std::unexpected(record_error::too_short);
  const std::byte* p = bytes.data();
  if (std::memcmp(p, chunk_record_magic.data(), chunk_record_magic.size()) != 0)
    return std::unexpected(record_error::bad_magic);
  // The version decides the layout, so it is read before the checksum that layout places.
  if (get_le(p + off_version, 2) != chunk_record_version) return std::unexpected(record_error::unsupported_version);
  if (get_le(p + off_header_sum, 8) != XXH3_64bits(p, off_header_sum))
    return std::unexpected(record_error::header_checksum);
  chunk_record_info info;
  const std::uint64_t header_bytes = get_le(p + off_header_bytes, 4);
  if (header_bytes < chunk_record_fixed_bytes || header_bytes > chunk_record_max_header_bytes ||
      header_bytes % 8 != 0 || get_le(p + off_reserved0, 2) != 0 ||
      !all_zero(bytes.subspan(off_reserved1, off_header_sum - off_reserved1)))
    return std::unexpected(record_error::bad_header_size);
  if (bytes.size() < header_bytes) return std::unexpected(record_error::too_short);
  if (!all_zero(bytes.subspan(chunk_record_fixed_bytes, header_bytes - chunk_record_fixed_bytes)))
    return std::unexpected(record_error::bad_header_size);
  info.header_bytes = static_cast<std::uint32_t>(header_bytes);
  if (std::memcmp(p + off_ns, expect.ns.data(), expect.ns.size()) != 0)
    return std::unexpected(record_error::foreign_namespace);
  if (std::memcmp(p + off_key, expect.key.bytes.data(), expect.key.bytes.size()) != 0)
    return std::unexpected(record_error::wrong_key);
  info.payload_bytes = get_le(p + off_payload_bytes, 8);
  if ((expect.payload_bytes != 0 && info.payload_bytes != expect.payload_bytes) ||
      info.payload_bytes > expect.max_payload_bytes)
    return std::unexpected(record_error::wrong_size);
  info.payload_checksum = get_le(p + off_payload_sum, 8);
  return info;
}

/// @brief Checks a whole record (header immediately followed by exactly its payload, as a Redis
/// value holds it) and returns the payload, a view into `record`.
[[nodiscard]] inline std::expected<std::span<const std::byte>, record_error> decode_chunk_record(
    std::span<const std::byte> record, const chunk_record_expect& expect) noexcept {
  const auto info = decode_chunk_header(record, expect);
  if (!info) return std::unexpected(info.error());
  const std::size_t available = record.size() - info->header_bytes;
  if (info->payload_bytes > available) return std::unexpected(record_error::truncated);
  if (info->payload_bytes < available) return std::unexpected(record_error::trailing_bytes);
  const auto payload = record.subspan(info->header_bytes);
  if (chunk_payload_checksum(payload) != info->payload_checksum) return std::unexpected(record_error::payload_checksum);
  return payload;
}

/// @brief The whole record of `payload` with a `header_bytes` header (Redis values, tests).
[[nodiscard]] inline std::vector<std::byte> encode_chunk_record(const namespace_digest& ns, const chunk_key& key,
                                                                std::span<const std::byte> payload,
                                                                std::size_t header_bytes = chunk_record_fixed_bytes) {
  if (header_bytes < chunk_record_fixed_bytes || header_bytes > chunk_record_max_header_bytes || header_bytes % 8 != 0)
    header_bytes = chunk_record_fixed_bytes;
  std::vector<std::byte> out(header_bytes + payload.size());
  (void)encode_chunk_header(out, ns, key, payload, header_bytes);
  if (!payload.empty()) std::memcpy(out.data() + header_bytes, payload.data(), payload.size());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Disk entries: the record with a one-block header and the payload zero-padded to whole blocks,
//   [header: chunk_record_block bytes][payload][zeros up to a multiple of chunk_record_block]
// so direct I/O can read the payload straight into an aligned buffer.
// ---------------------------------------------------------------------------------------------

/// @brief File size of the disk entry of a `payload_bytes` payload, or 0 when it overflows.
[[nodiscard]] constexpr std::uint64_t disk_entry_bytes(std::uint64_t payload_bytes) noexcept {
  constexpr std::uint64_t b = chunk_record_block;
  if (payload_bytes > ~std::uint64_t{0} - 2 * b) return 0;
  return b + (payload_bytes + b - 1) / b * b;
}

/// @brief Checks a disk entry's header block against `expect` and against the file's size
/// `file_bytes` (the payload must fill the file up to its last block). `header_block` holds the
/// first `chunk_record_block` bytes of the file, or fewer when the file is shorter.
[[nodiscard]] inline std::expected<chunk_record_info, record_error> decode_disk_header(
    std::span<const std::byte> header_block, std::uint64_t file_bytes, const chunk_record_expect& expect) noexcept {
  if (file_bytes < chunk_record_block || header_block.size() < chunk_record_block)
    return std::unexpected(record_error::too_short);
  const auto info = decode_chunk_header(header_block.first(chunk_record_block), expect);
  if (!info) return std::unexpected(info.error());
  if (info->header_bytes != chunk_record_block) return std::unexpected(record_error::bad_header_size);
  const std::uint64_t want = disk_entry_bytes(info->payload_bytes);
  if (want == 0 || want > file_bytes) return std::unexpected(record_error::truncated);
  if (want < file_bytes) return std::unexpected(record_error::trailing_bytes);
  return info;
}

/// @brief Checks a payload read from a disk entry whose header decoded to `info`: its checksum, and
/// that `padding` (the bytes after it up to the end of the file) is zero.
[[nodiscard]] inline record_error verify_disk_payload(const chunk_record_info& info, std::span<const std::byte> payload,
                                                      std::span<const std::byte> padding) noexcept {
  if (payload.size() != info.payload_bytes) return record_error::truncated;
  if (!record_codec::all_zero(padding)) return record_error::trailing_bytes;
  if (chunk_payload_checksum(payload) != info.payload_checksum) return record_error::payload_checksum;
  return record_error::ok;
}

/// @brief Decodes a whole disk entry held in memory (`file` is the file's bytes) into `out`;
/// returns the payload size. The disk tier checks files it reads in pieces with the same two
/// steps (`decode_disk_header`, `verify_disk_payload`). `out` is left unspecified on failure.
[[nodiscard]] inline std::expected<std::size_t, record_error> decode_disk_entry(std::span<const std::byte> file,
                                                                               const chunk_record_expect& expect,
                                                                               std::span<std::byte> out) noexcept {
  const auto info = decode_disk_header(file.first(std::min(file.size(), chunk_record_block)), file.size(), expect);
  if (!info) return std::unexpected(info.error());
  if (info->payload_bytes > out.size()) return std::unexpected(record_error::buffer_too_small);
  const auto n = static_cast<std::size_t>(info->payload_bytes);
  const auto payload = file.subspan(chunk_record_block, n);
  const auto padding = file.subspan(chunk_record_block + n);
  if (const auto e = verify_disk_payload(*info, payload, padding); e != record_error::ok) return std::unexpected(e);
  if (n != 0) std::memcpy(out.data(), payload.data(), n);
  return n;
}

/// @brief The disk entry of `payload` as one buffer (tests, tools).
[[nodiscard]] inline std::vector<std::byte> encode_disk_entry(const namespace_digest& ns, const chunk_key& key,
                                                              std::span<const std::byte> payload) {
  std::vector<std::byte> out(static_cast<std::size_t>(disk_entry_bytes(payload.size())));
  (void)encode_chunk_header(out, ns, key, payload, chunk_record_block);
  if (!payload.empty()) std::memcpy(out.data() + chunk_record_block, payload.data(), payload.size());
  return out;
}

}  // namespace kvortex::detail

#endif
