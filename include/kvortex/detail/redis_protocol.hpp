#pragma once
/// @file redis_protocol.hpp
/// @brief What the Redis tier computes without a connection: key names and their cluster slots
/// (CRC16 with hash tags, as the Redis Cluster specification defines them), shard choice over
/// independent servers, RESP request framing, the reply tree, redirect errors, CLUSTER SLOTS
/// parsing and the check of a stored value. Needs xxHash (through chunk_record.hpp); not hiredis.

#include <algorithm>
#include <array>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <expected>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <sys/uio.h>
#include <vector>

#include "kvortex/detail/chunk_record.hpp"
#include "kvortex/error.hpp"
#include "kvortex/tiers/redis_tier_config.hpp"
#include "kvortex/types.hpp"

namespace kvortex::detail {

// ---------------------------------------------------------------------------------------------
// Cluster slots: CRC16 (XMODEM: polynomial 0x1021, initial value 0, no reflection) of the key, or
// of its hash tag, modulo 16384.
// ---------------------------------------------------------------------------------------------

inline constexpr std::size_t redis_cluster_slots = 16384;

inline constexpr std::array<std::uint16_t, 256> crc16_table = [] {
  std::array<std::uint16_t, 256> t{};
  for (unsigned i = 0; i < 256; ++i) {
    auto c = static_cast<std::uint16_t>(i << 8);
    for (int b = 0; b < 8; ++b) c = static_cast<std::uint16_t>((c & 0x8000) != 0 ? (c << 1) ^ 0x1021 : c << 1);
    t[i] = c;
  }
  return t;
}();

[[nodiscard]] constexpr std::uint16_t crc16(std::string_view bytes) noexcept {
  std::uint16_t crc = 0;
  for (const char ch : bytes)
    crc = static_cast<std::uint16_t>((crc << 8) ^ crc16_table[((crc >> 8) ^ static_cast<unsigned char>(ch)) & 0xFF]);
  return crc;
}

/// @brief The cluster slot of `key`: when the key holds a '{' followed later by a '}' with at
/// least one byte between them, only the bytes between the first '{' and the first '}' after it
/// are hashed.
[[nodiscard]] constexpr std::uint16_t key_hash_slot(std::string_view key) noexcept {
  if (const auto open = key.find('{'); open != std::string_view::npos) {
    const auto close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) key = key.substr(open + 1, close - open - 1);
  }
  return static_cast<std::uint16_t>(crc16(key) & (redis_cluster_slots - 1));
}

// ---------------------------------------------------------------------------------------------
// Key names: <prefix>{<hex of key bytes 0-7>}<namespace digest: 32 bytes><chunk key: 32 bytes>.
// The explicit hash tag comes first, so no byte of the binary part (which may hold braces) can
// become the tag: a key's slot is the CRC16 of 16 hex digits of its own key, spread evenly, and
// the same in every client. A prompt's chunks are not grouped into one slot: a chunk's key alone
// must route it (get and put see nothing else), and spread chunks balance the masters; batch calls
// reach all masters at once, so a batch still costs one round trip.
// ---------------------------------------------------------------------------------------------

inline constexpr std::size_t redis_tag_chars = 16;

[[nodiscard]] inline std::string redis_key_name(std::string_view prefix, const namespace_digest& ns, const chunk_key& key) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s;
  s.reserve(prefix.size() + 2 + redis_tag_chars + ns.size() + key.bytes.size());
  s.append(prefix);
  s.push_back('{');
  for (std::size_t i = 0; i < redis_tag_chars / 2; ++i) {
    const auto b = std::to_integer<unsigned>(key.bytes[i]);
    s.push_back(digits[b >> 4]);
    s.push_back(digits[b & 0xF]);
  }
  s.push_back('}');
  s.append(reinterpret_cast<const char*>(ns.data()), ns.size());
  s.append(reinterpret_cast<const char*>(key.bytes.data()), key.bytes.size());
  return s;
}

/// @brief The server among `servers` that holds `key` when the tier shards over independent
/// servers: jump consistent hashing (Lamping and Veach, 2014) of the key's first 8 bytes, so
/// every client with the same server list agrees, and a server added at the end moves only
/// 1/n of the keys.
[[nodiscard]] inline std::size_t shard_of(const chunk_key& key, std::size_t servers) noexcept {
  if (servers <= 1) return 0;
  std::uint64_t h = record_codec::get_le(key.bytes.data(), 8);
  std::int64_t b = -1, j = 0;
  while (j < static_cast<std::int64_t>(servers)) {
    b = j;
    h = h * 2862933555777941757ULL + 1;
    j = static_cast<std::int64_t>(static_cast<double>(b + 1) *
                                  (static_cast<double>(std::int64_t{1} << 31) / static_cast<double>((h >> 33) + 1)));
  }
  return static_cast<std::size_t>(b);
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// @brief One parsed RESP2 reply. `value` is a GET reply that was checked and copied into the
/// caller's buffer as it was parsed (see redis_connection.hpp): `integer` holds the payload size,
/// `value_error` why it was refused.
struct resp_reply {
  enum class kind : std::uint8_t { nil, status, error, integer, string, array, value };
  kind type{kind::nil};
  long long integer{0};
  record_error value_error{record_error::ok};
  std::string text;                 ///< status, error and string replies
  std::vector<resp_reply> elements; ///< array replies
  std::size_t reply_elements{0};    ///< on a root: elements of every array in the reply so far

  /// @brief An error reply whose first word is `code` ("MOVED", "OOM", ...).
  [[nodiscard]] bool is_error(std::string_view code) const noexcept {
    return type == kind::error && text.starts_with(code) && (text.size() == code.size() || text[code.size()] == ' ');
  }
  [[nodiscard]] bool is_status(std::string_view s) const noexcept { return type == kind::status && text == s; }
};

/// @brief A cluster redirect: "MOVED <slot> <host>:<port>" or "ASK <slot> <host>:<port>".
struct redis_redirect {
  bool ask{false};
  std::uint16_t slot{0};
  redis_endpoint target;
};

/// @brief Parses a redirect error's text. An empty host (a node that does not know its own
/// address) becomes `same_host`, the host the error came from. nullopt: not a well-formed redirect.
[[nodiscard]] inline std::optional<redis_redirect> parse_redirect(std::string_view text, std::string_view same_host) {
  redis_redirect r;
  if (text.starts_with("MOVED ")) {
    text.remove_prefix(6);
  } else if (text.starts_with("ASK ")) {
    r.ask = true;
    text.remove_prefix(4);
  } else {
    return std::nullopt;
  }
  const auto space = text.find(' ');
  if (space == std::string_view::npos || space == 0) return std::nullopt;
  unsigned slot = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + space, slot);
  if (ec != std::errc{} || end != text.data() + space || slot >= redis_cluster_slots) return std::nullopt;
  r.slot = static_cast<std::uint16_t>(slot);
  std::string_view addr = text.substr(space + 1);
  const auto colon = addr.rfind(':');
  if (colon == std::string_view::npos || colon + 1 == addr.size()) return std::nullopt;
  std::string_view host = addr.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.find_first_of(" \r\n") != std::string_view::npos) return std::nullopt;
  const auto port_text = addr.substr(colon + 1);
  unsigned port = 0;
  const auto [pend, pec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (pec != std::errc{} || pend != port_text.data() + port_text.size() || port == 0 || port > 65535) return std::nullopt;
  r.target.host = host.empty() ? std::string(same_host) : std::string(host);
  if (r.target.host.empty()) return std::nullopt;
  r.target.port = static_cast<std::uint16_t>(port);
  return r;
}

/// @brief One range of a cluster's slot map and the master serving it.
struct slot_range {
  std::uint16_t first{0}, last{0};
  redis_endpoint master;
};

/// @brief The slot ranges of a CLUSTER SLOTS reply, `answered_by` being the node that sent it
/// (an empty or "?" address in the reply means that node's host). Every range must be in
/// [0, 16383] with first <= last and name a master with a port; anything else fails the reply.
[[nodiscard]] inline result<std::vector<slot_range>> parse_cluster_slots(const resp_reply& reply, std::string_view answered_by) {
  using kind = resp_reply::kind;
  if (reply.type == kind::error) return fail(errc::backend_failure, "CLUSTER SLOTS failed: " + reply.text);
  if (reply.type != kind::array) return fail(errc::backend_failure, "CLUSTER SLOTS: the reply is not an array");
  std::vector<slot_range> out;
  out.reserve(reply.elements.size());
  for (std::size_t i = 0; i < reply.elements.size(); ++i) {
    const resp_reply& e = reply.elements[i];
    const auto bad = [&](const char* why) {
      return fail(errc::backend_failure, "CLUSTER SLOTS: entry " + std::to_string(i) + ": " + why);
    };
    if (e.type != kind::array || e.elements.size() < 3) return bad("not [first, last, master, ...]");
    const resp_reply &lo = e.elements[0], &hi = e.elements[1], &m = e.elements[2];
    if (lo.type != kind::integer || hi.type != kind::integer) return bad("slot bounds are not integers");
    if (lo.integer < 0 || hi.integer < lo.integer || hi.integer >= static_cast<long long>(redis_cluster_slots))
      return bad("slot bounds out of range");
    if (m.type != kind::array || m.elements.size() < 2 || m.elements[0].type != kind::string || m.elements[1].type != kind::integer)
      return bad("the master is not [host, port, ...]");
    const long long port = m.elements[1].integer;
    if (port <= 0 || port > 65535) return bad("the master's port is out of range");
    slot_range r;
    r.first = static_cast<std::uint16_t>(lo.integer);
    r.last = static_cast<std::uint16_t>(hi.integer);
    const std::string& host = m.elements[0].text;
    r.master.host = host.empty() || host == "?" ? std::string(answered_by) : host;
    if (r.master.host.empty() || r.master.host.find_first_of(" \r\n") != std::string::npos)
      return bad("the master's host is unusable");
    r.master.port = static_cast<std::uint16_t>(port);
    out.push_back(std::move(r));
  }
  return out;
}

/// @brief Checks a stored value (a chunk record) against `expect` and copies its payload into
/// `out`: the payload size, or why the value is refused (`buffer_too_small` when `out` cannot
/// hold a valid record's payload). `out` is written only on success.
[[nodiscard]] inline std::expected<std::size_t, record_error> decode_redis_value(std::span<const std::byte> value,
                                                                                const chunk_record_expect& expect,
                                                                                std::span<std::byte> out) noexcept {
  const auto payload = decode_chunk_record(value, expect);
  if (!payload) return std::unexpected(payload.error());
  if (payload->size() > out.size()) return std::unexpected(record_error::buffer_too_small);
  if (!payload->empty()) std::memcpy(out.data(), payload->data(), payload->size());
  return payload->size();
}

// ---------------------------------------------------------------------------------------------
// Requests: RESP arrays of bulk strings, built into an arena plus borrowed payload spans, sent
// with one writev-like call: a chunk's payload goes from the caller's buffer to the socket
// without a copy.
// ---------------------------------------------------------------------------------------------

class resp_request {
 public:
  /// @brief Starts a command of `argc` arguments (the command name included).
  void command(std::size_t argc) {
    ++commands_;
    owned("*");
    number(argc);
    owned("\r\n");
  }
  /// @brief An argument, copied.
  void arg(std::string_view s) {
    bulk_header(s.size());
    owned(s);
    owned("\r\n");
  }
  void arg(std::uint64_t v) { arg(std::string_view(std::to_string(v))); }
  /// @brief A chunk record argument: `header` copied, `payload` borrowed (it must outlive the send).
  void arg_record(std::span<const std::byte> header, std::span<const std::byte> payload) {
    bulk_header(header.size() + payload.size());
    owned(std::string_view(reinterpret_cast<const char*>(header.data()), header.size()));
    if (!payload.empty()) pieces_.push_back({0, payload.size(), payload.data()});
    owned("\r\n");
  }

  [[nodiscard]] std::size_t commands() const noexcept { return commands_; }
  [[nodiscard]] bool empty() const noexcept { return commands_ == 0; }
  [[nodiscard]] std::size_t bytes() const noexcept {
    std::size_t n = 0;
    for (const auto& p : pieces_) n += p.len;
    return n;
  }
  void clear() noexcept {
    arena_.clear();
    pieces_.clear();
    commands_ = 0;
  }

  /// @brief Appends the request's buffers to `out`; valid until the request changes.
  void append_iov(std::vector<iovec>& out) const {
    for (std::size_t i = 0; i < pieces_.size();) {
      const piece& p = pieces_[i];
      if (p.borrowed != nullptr) {
        out.push_back({const_cast<std::byte*>(p.borrowed), p.len});
        ++i;
        continue;
      }
      // Adjacent arena pieces are adjacent in memory: one iovec for the run.
      std::size_t len = p.len, j = i + 1;
      while (j < pieces_.size() && pieces_[j].borrowed == nullptr) len += pieces_[j++].len;
      out.push_back({const_cast<char*>(arena_.data()) + p.off, len});
      i = j;
    }
  }

  /// @brief The whole request as one string (tests, fuzzing).
  [[nodiscard]] std::string flatten() const {
    std::string s;
    for (const auto& p : pieces_) {
      if (p.borrowed != nullptr)
        s.append(reinterpret_cast<const char*>(p.borrowed), p.len);
      else
        s.append(arena_, p.off, p.len);
    }
    return s;
  }

 private:
  struct piece {
    std::size_t off;
    std::size_t len;
    const std::byte* borrowed;  // null: arena_[off, off + len)
  };
  void owned(std::string_view s) {
    if (s.empty()) return;
    if (!pieces_.empty() && pieces_.back().borrowed == nullptr) {
      pieces_.back().len += s.size();
    } else {
      pieces_.push_back({arena_.size(), s.size(), nullptr});
    }
    arena_.append(s);
  }
  void number(std::size_t v) {
    char buf[24];
    const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
    (void)ec;
    owned(std::string_view(buf, static_cast<std::size_t>(end - buf)));
  }
  void bulk_header(std::size_t len) {
    owned("$");
    number(len);
    owned("\r\n");
  }

  std::string arena_;
  std::vector<piece> pieces_;
  std::size_t commands_{0};
};

}  // namespace kvortex::detail
