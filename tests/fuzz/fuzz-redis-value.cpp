// Fuzz target: what the Redis tier makes of bytes a server sends. Input: one byte of options,
// then a stream of RESP2 replies as they would arrive on a connection.
// - The stream goes through hiredis' reader with the tier's reply objects twice: once whole and
//   once cut into pieces (sizes from the options). Both parses agree, reply by reply (kinds,
//   texts, integers, the values delivered) and on whether the stream is broken.
// - Each top-level bulk string is a GET reply: checked against the seeds' namespace and key and
//   copied into a caller's buffer as the tier does. A value accepted re-encodes to exactly the
//   bytes received (the decoder takes nothing the encoder would not write) and its payload
//   lands in the buffer, with nothing written past the payload; a refused one leaves the buffer
//   untouched. ASan checks no read or write strays outside the reader's or the caller's memory.
// - Error replies go through the redirect parser and arrays through the CLUSTER SLOTS parser;
//   what they accept is in range.
// - Options bit 3: the tail of the input instead becomes request arguments (length-prefixed),
//   framed by resp_request and parsed back: the arguments come back byte for byte.
// Built without hiredis (KVORTEX_WITH_HIREDIS off), only the parts that need no reader run.

#include "fuzz_support.hpp"

#include <kvortex/detail/chunk_record.hpp>
#include <kvortex/detail/redis_protocol.hpp>
#if defined(KVORTEX_WITH_HIREDIS)
#include <kvortex/detail/redis_connection.hpp>
#endif

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

namespace kd = kvortex::detail;

kvortex::namespace_digest seed_ns() {
  kvortex::namespace_digest d;
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<std::byte>(0xA0 + i);
  return d;
}
kvortex::chunk_key seed_key() {
  kvortex::chunk_key k;
  for (std::size_t i = 0; i < k.bytes.size(); ++i) k.bytes[i] = static_cast<std::byte>(i * 7 + 1);
  return k;
}

constexpr std::byte canary{0x5A};

void check_redirect(const std::string& text) {
  const auto r = kd::parse_redirect(text, "h");
  if (!r) return;
  KVFUZZ_CHECK(text.starts_with(r->ask ? "ASK " : "MOVED "), "redirect kind differs from the text");
  KVFUZZ_CHECK(r->slot < kd::redis_cluster_slots, "redirect slot out of range");
  KVFUZZ_CHECK(r->target.port != 0 && !r->target.host.empty(), "redirect target unusable");
}

[[maybe_unused]] void check_slots(const kd::resp_reply& reply) {
  const auto ranges = kd::parse_cluster_slots(reply, "h");
  if (!ranges) {
    kvfuzz::check_error(ranges.error(), "parse_cluster_slots");
    return;
  }
  KVFUZZ_CHECK(ranges->size() == reply.elements.size(), "slot ranges dropped or invented");
  for (const auto& r : *ranges) {
    KVFUZZ_CHECK(r.first <= r.last && r.last < kd::redis_cluster_slots, "slot range out of bounds");
    KVFUZZ_CHECK(r.master.port != 0 && !r.master.host.empty(), "slot range master unusable");
  }
}

#if defined(KVORTEX_WITH_HIREDIS)

// Hands every top-level reply its own buffer, prefilled with a canary.
struct buffers final : kd::reply_sink_source {
  kd::chunk_record_expect expect{seed_ns(), seed_key(), 0, std::uint64_t{1} << 20};
  std::size_t size{0};
  mutable std::vector<std::vector<std::byte>> outs;
  mutable std::vector<kd::reply_sink> sinks;
  std::size_t taken{0};  // replies completed so far

  const kd::reply_sink* next_sink() const noexcept override {
    while (outs.size() <= taken) {
      outs.emplace_back(size, canary);
      sinks.push_back({&expect, outs.back()});
    }
    sinks[taken].out = outs[taken];
    return &sinks[taken];
  }
  // A (canary) buffer for each of the first `n` replies, also those that asked for none.
  void cover(std::size_t n) const {
    while (outs.size() < n) outs.emplace_back(size, canary);
  }
};

struct parse_result {
  std::vector<std::unique_ptr<kd::resp_reply>> replies;
  bool broken{false};
};

// Feeds `stream` in pieces (`piece` 0: all at once), taking replies after every piece.
parse_result parse(std::span<const char> stream, std::size_t piece, buffers* sink) {
  parse_result out;
  kd::resp_reader reader(sink);
  std::size_t at = 0;
  do {
    const std::size_t n = piece == 0 ? stream.size() : std::min(piece, stream.size() - at);
    if (n > 0 && !reader.feed(stream.data() + at, n)) {
      out.broken = true;
      return out;
    }
    at += n;
    for (;;) {
      std::unique_ptr<kd::resp_reply> r;
      if (!reader.next(r)) {
        out.broken = true;
        return out;
      }
      if (!r) break;
      out.replies.push_back(std::move(r));
      if (sink != nullptr) ++sink->taken;
    }
  } while (at < stream.size());
  return out;
}

bool same_tree(const kd::resp_reply& a, const kd::resp_reply& b) {
  if (a.type != b.type || a.integer != b.integer || a.value_error != b.value_error || a.text != b.text ||
      a.elements.size() != b.elements.size())
    return false;
  for (std::size_t i = 0; i < a.elements.size(); ++i)
    if (!same_tree(a.elements[i], b.elements[i])) return false;
  return true;
}

void check_stream(std::uint8_t options, std::span<const char> stream) {
  static constexpr std::size_t sizes[4] = {4096, 64, 0, 70000};
  buffers whole_sink, cut_sink;
  whole_sink.size = cut_sink.size = sizes[options & 3];
  const std::size_t piece = std::size_t{1} + ((options >> 4) & 15) * 7;  // 1, 8, 15, ... 106

  const auto plain = parse(stream, 0, nullptr);  // bulk strings as text, for comparison
  const auto whole = parse(stream, 0, &whole_sink);
  const auto cut = parse(stream, piece, &cut_sink);
  whole_sink.cover(whole.replies.size());
  cut_sink.cover(cut.replies.size());
  KVFUZZ_CHECK(whole.broken == plain.broken && cut.broken == whole.broken, "feeding in pieces changed the verdict");
  KVFUZZ_CHECK(whole.replies.size() == plain.replies.size() && cut.replies.size() == whole.replies.size(),
               "feeding in pieces changed the number of replies");

  for (std::size_t i = 0; i < whole.replies.size(); ++i) {
    const kd::resp_reply& w = *whole.replies[i];
    const kd::resp_reply& p = *plain.replies[i];
    KVFUZZ_CHECK(same_tree(w, *cut.replies[i]), "reply " + std::to_string(i) + " differs when fed in pieces");
    const auto& out = whole_sink.outs.at(i);
    KVFUZZ_CHECK(out == cut_sink.outs.at(i), "reply " + std::to_string(i) + " left other bytes when fed in pieces");

    if (w.type == kd::resp_reply::kind::value) {
      KVFUZZ_CHECK(p.type == kd::resp_reply::kind::string, "a value that was not a bulk string");
      const auto raw = std::span(reinterpret_cast<const std::byte*>(p.text.data()), p.text.size());
      std::vector<std::byte> again(out.size());
      const auto direct = kd::decode_redis_value(raw, whole_sink.expect, again);
      if (w.value_error == kd::record_error::ok) {
        KVFUZZ_CHECK(direct.has_value() && static_cast<long long>(*direct) == w.integer, "sink and decoder disagree");
        const auto n = static_cast<std::size_t>(w.integer);
        KVFUZZ_CHECK(n <= out.size(), "a payload larger than the buffer was delivered");
        const auto payload = std::span(out).first(n);
        const auto info = kd::decode_chunk_header(raw, whole_sink.expect);
        KVFUZZ_CHECK(info.has_value(), "an accepted value's header does not decode");
        const auto rec = kd::encode_chunk_record(whole_sink.expect.ns, whole_sink.expect.key, payload, info->header_bytes);
        KVFUZZ_CHECK(rec.size() == raw.size() && std::memcmp(rec.data(), raw.data(), raw.size()) == 0,
                     "a value the encoder would not write was accepted");
        KVFUZZ_CHECK(std::all_of(out.begin() + static_cast<std::ptrdiff_t>(n), out.end(), [](std::byte b) { return b == canary; }),
                     "bytes written past the payload");
      } else {
        KVFUZZ_CHECK(!direct.has_value() && direct.error() == w.value_error, "sink and decoder disagree on a refusal");
        KVFUZZ_CHECK(std::all_of(out.begin(), out.end(), [](std::byte b) { return b == canary; }),
                     "a refused value wrote into the buffer");
      }
    } else {
      KVFUZZ_CHECK(same_tree(w, p), "a reply other than a bulk string depends on the sink");
      KVFUZZ_CHECK(std::all_of(out.begin(), out.end(), [](std::byte b) { return b == canary; }),
                   "a reply that is not a value wrote into the buffer");
    }
    if (w.type == kd::resp_reply::kind::error) check_redirect(w.text);
    if (w.type == kd::resp_reply::kind::array) check_slots(w);
  }
}

// Arguments from the input (each: one length byte, then that many bytes), framed and parsed back.
void check_request(std::span<const char> tail) {
  std::vector<std::string> args;
  kd::resp_request req;
  std::size_t at = 0;
  while (at < tail.size() && args.size() < 64) {
    const std::size_t n = std::min<std::size_t>(static_cast<unsigned char>(tail[at]), tail.size() - at - 1);
    args.emplace_back(tail.data() + at + 1, n);
    at += 1 + n;
  }
  if (args.empty()) return;
  // Commands of up to three arguments; a 'R' first byte makes an argument a record (the seeds'
  // namespace and key, its bytes as the payload).
  std::vector<std::vector<std::byte>> headers;
  std::vector<std::string> want;
  headers.reserve(args.size());
  for (std::size_t i = 0; i < args.size(); i += 3) {
    const std::size_t argc = std::min<std::size_t>(3, args.size() - i);
    req.command(argc);
    for (std::size_t j = i; j < i + argc; ++j) {
      const auto bytes = std::span(reinterpret_cast<const std::byte*>(args[j].data()), args[j].size());
      if (!args[j].empty() && args[j][0] == 'R') {
        headers.emplace_back(kd::chunk_record_fixed_bytes);
        (void)kd::encode_chunk_header(headers.back(), seed_ns(), seed_key(), bytes);
        req.arg_record(headers.back(), bytes);
        const auto rec = kd::encode_chunk_record(seed_ns(), seed_key(), bytes);
        want.emplace_back(reinterpret_cast<const char*>(rec.data()), rec.size());
      } else {
        req.arg(std::string_view(args[j]));
        want.push_back(args[j]);
      }
    }
  }
  const std::string flat = req.flatten();
  KVFUZZ_CHECK(flat.size() == req.bytes(), "request size");
  std::vector<iovec> iov;
  req.append_iov(iov);
  std::string joined;
  for (const auto& v : iov) joined.append(static_cast<const char*>(v.iov_base), v.iov_len);
  KVFUZZ_CHECK(joined == flat, "the iovecs and the flat request differ");
  const auto parsed = parse(std::span(flat.data(), flat.size()), 5, nullptr);
  KVFUZZ_CHECK(!parsed.broken, "a framed request does not parse");
  KVFUZZ_CHECK(parsed.replies.size() == req.commands(), "command count");
  std::size_t k = 0;
  for (const auto& r : parsed.replies) {
    KVFUZZ_CHECK(r->type == kd::resp_reply::kind::array, "a command is not an array");
    for (const auto& e : r->elements) {
      KVFUZZ_CHECK(e.type == kd::resp_reply::kind::string && k < want.size() && e.text == want[k], "argument " + std::to_string(k) + " changed");
      ++k;
    }
  }
  KVFUZZ_CHECK(k == want.size(), "arguments lost");
}

#endif  // KVORTEX_WITH_HIREDIS

// Without a reader: the input itself as one value, and as a redirect text.
void check_raw(std::uint8_t options, std::span<const char> bytes) {
  const kd::chunk_record_expect expect{seed_ns(), seed_key(), 0, std::uint64_t{1} << 20};
  std::vector<std::byte> out(options & 1 ? 64 : 4096, canary);
  const auto raw = std::span(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size());
  const auto r = kd::decode_redis_value(raw, expect, out);
  if (r) {
    const auto rec = kd::encode_chunk_record(expect.ns, expect.key, std::span(out).first(*r),
                                             kd::decode_chunk_header(raw, expect)->header_bytes);
    KVFUZZ_CHECK(rec.size() == raw.size() && std::memcmp(rec.data(), raw.data(), raw.size()) == 0,
                 "a value the encoder would not write was accepted");
  } else {
    KVFUZZ_CHECK(std::all_of(out.begin(), out.end(), [](std::byte b) { return b == canary; }), "a refused value wrote into the buffer");
  }
  check_redirect(std::string(bytes.data(), bytes.size()));
  (void)kd::key_hash_slot(std::string_view(bytes.data(), bytes.size()));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t options = data[0];
  // A heap copy of exactly the stream's size, so ASan sees any read past its end.
  std::vector<char> stream(data + 1, data + size);
  const std::span<const char> s(stream.data(), stream.size());
  check_raw(options, s);
#if defined(KVORTEX_WITH_HIREDIS)
  if ((options & 8) != 0)
    check_request(s);
  else
    check_stream(options, s);
#endif
  return 0;
}
