// Fuzz target: the lookup service's frame parsers, as a server and a client meet bytes from a
// peer. Input: one byte of options (how the stream is cut into reads), then the stream.
// - parse_query never reads outside its input (ASan), and what it calls complete is exactly a
//   header, its salt and its tokens, within the limits; cutting the stream into pieces at any
//   points yields the same queries, in order, as parsing it whole (a server that gets a frame in
//   several reads answers the same).
// - parse_reply agrees with the reply's fields.

#include "fuzz_support.hpp"

#include <kvortex/detail/lookup_wire.hpp>

#include <cstring>
#include <vector>

namespace {

namespace kd = kvortex::detail;
constexpr std::size_t max_tokens = 4096, max_salt = 512;

struct seen {
  std::uint64_t id;
  std::vector<std::byte> salt, tokens;
  bool operator==(const seen&) const = default;
};

// Parses like the server: append what arrived, take every complete frame, stop at a bad one.
std::vector<seen> serve(std::span<const std::byte> stream, std::span<const std::size_t> cuts, bool& closed) {
  std::vector<seen> out;
  std::vector<std::byte> in;
  std::size_t from = 0;
  closed = false;
  for (std::size_t k = 0; k <= cuts.size() && !closed; ++k) {
    const std::size_t to = k < cuts.size() ? std::min(stream.size(), cuts[k]) : stream.size();
    if (to < from) continue;
    in.insert(in.end(), stream.begin() + static_cast<std::ptrdiff_t>(from), stream.begin() + static_cast<std::ptrdiff_t>(to));
    from = to;
    std::size_t at = 0;
    for (;;) {
      kd::parsed_query q;
      const auto st = kd::parse_query(std::span<const std::byte>(in).subspan(at), max_tokens, max_salt, q);
      if (st == kd::frame_status::incomplete) break;
      if (st == kd::frame_status::malformed) {
        closed = true;
        break;
      }
      kd::lookup_query_header h;
      std::memcpy(&h, in.data() + at, sizeof h);
      if (q.count != h.tokens || q.count == 0 || q.count > max_tokens || q.salt.size() != h.salt_bytes ||
          q.salt.size() > max_salt || q.tokens.size() != q.count * 4 || q.size != sizeof h + q.salt.size() + q.tokens.size() ||
          q.id != h.id || q.salt.data() != in.data() + at + sizeof h || q.tokens.data() != q.salt.data() + q.salt.size())
        kvfuzz::failure(__FILE__, __LINE__, "parse_query: the frame it returned is not the header's");
      out.push_back({q.id, {q.salt.begin(), q.salt.end()}, {q.tokens.begin(), q.tokens.end()}});
      at += q.size;
    }
    in.erase(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(at));
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const std::uint8_t opts = data[0];
  const std::span<const std::byte> stream(reinterpret_cast<const std::byte*>(data + 1), size - 1);

  bool closed_whole = false;
  const auto whole = serve(stream, {}, closed_whole);
  std::vector<std::size_t> cuts;
  for (std::size_t at = 1 + opts % 7; at < stream.size(); at += 1 + (opts >> 3) % 41 + at % 13) cuts.push_back(at);
  bool closed_cut = false;
  const auto pieces = serve(stream, cuts, closed_cut);
  if (whole != pieces || closed_whole != closed_cut) kvfuzz::failure(__FILE__, __LINE__, "lookup frames: cutting the stream changed what was parsed");

  // Replies: every 24-byte window parses to its own fields.
  for (std::size_t at = 0; at + sizeof(kd::lookup_reply) <= stream.size(); at += sizeof(kd::lookup_reply)) {
    const auto r = kd::parse_reply(stream.subspan(at));
    if (!r) kvfuzz::failure(__FILE__, __LINE__, "parse_reply: a whole reply was reported incomplete");
    kd::lookup_reply raw;
    std::memcpy(&raw, stream.data() + at, sizeof raw);
    const bool ok = raw.magic == kd::lookup_reply_magic && raw.version == kd::lookup_wire_version;
    if (r->ok != ok || r->reply.id != raw.id || r->reply.tokens != raw.tokens || r->reply.status != raw.status)
      kvfuzz::failure(__FILE__, __LINE__, "parse_reply: fields differ from the bytes");
  }
  if (kd::parse_reply(stream.first(std::min<std::size_t>(stream.size(), sizeof(kd::lookup_reply) - 1))))
    kvfuzz::failure(__FILE__, __LINE__, "parse_reply: a partial reply was reported whole");
  return 0;
}
