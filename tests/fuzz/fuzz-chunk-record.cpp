// Fuzz target: the chunk record decoders (a Redis value: header + payload; a disk entry: block
// header + payload + zero padding). Input: one byte of options, then the record.
// - Neither decoder reads outside the input (ASan) or accepts anything but what the encoder
//   writes: a record that decodes re-encodes, from the decoded payload and the expected namespace
//   and key, to exactly the input. So a changed byte anywhere is refused, never turned into
//   other bytes.
// - decode_chunk_header agrees with the full decoders and with the fields it read.
// - The input's tail as a payload round-trips through both encoders, and one byte flipped in
//   the encoded record (position and bits from the input) makes it a miss.

#include "fuzz_support.hpp"

#include <kvortex/detail/chunk_record.hpp>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

namespace kd = kvortex::detail;

// The namespace and key the committed seeds were written for.
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

std::uint64_t le64(std::span<const std::byte> s, std::size_t at) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < 8; ++i) v |= std::uint64_t{std::to_integer<std::uint8_t>(s[at + i])} << (8 * i);
  return v;
}

bool same(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

// options bit 0: expect the seeds' namespace and key (else whatever the record names, so the
// fuzzer gets past those checks); bit 1: expect the payload size the record states; bits 2-3:
// payload limit none / 1 MiB / 4 KiB / 0; bit 4: disk output buffer one byte short.
void check_decoders(std::uint8_t options, std::span<const std::byte> rec) {
  kd::chunk_record_expect expect;
  if ((options & 1) != 0 || rec.size() < kd::chunk_record_fixed_bytes) {
    expect.ns = seed_ns();
    expect.key = seed_key();
  } else {
    std::memcpy(expect.ns.data(), rec.data() + 16, 32);
    std::memcpy(expect.key.bytes.data(), rec.data() + 48, 32);
  }
  if ((options & 2) != 0 && rec.size() >= kd::chunk_record_fixed_bytes) expect.payload_bytes = le64(rec, 80);
  switch ((options >> 2) & 3) {
    case 0: break;
    case 1: expect.max_payload_bytes = 1 << 20; break;
    case 2: expect.max_payload_bytes = 4096; break;
    default: expect.max_payload_bytes = 0; break;
  }

  const auto header = kd::decode_chunk_header(rec, expect);
  if (header) {
    KVFUZZ_CHECK(header->header_bytes >= kd::chunk_record_fixed_bytes && header->header_bytes <= rec.size(),
                 "header size outside the record");
    KVFUZZ_CHECK(header->payload_bytes == le64(rec, 80) && header->payload_checksum == le64(rec, 88),
                 "header fields differ from the bytes");
    KVFUZZ_CHECK(header->payload_bytes <= expect.max_payload_bytes, "payload limit ignored");
  }

  const auto value = kd::decode_chunk_record(rec, expect);
  if (value) {
    KVFUZZ_CHECK(header.has_value(), "a record decodes whose header does not");
    KVFUZZ_CHECK(value->data() >= rec.data() && value->data() + value->size() == rec.data() + rec.size(),
                 "payload view outside the record");
    const auto again = kd::encode_chunk_record(expect.ns, expect.key, *value, header->header_bytes);
    KVFUZZ_CHECK(same(again, rec), "a record the encoder would not write was accepted");
  }

  // A disk entry, into a buffer of the stated payload size (or one byte less), bounded by the input.
  std::size_t cap = rec.size();
  if (header && header->payload_bytes <= rec.size()) {
    cap = static_cast<std::size_t>(header->payload_bytes);
    if ((options & 16) != 0 && cap > 0) --cap;
  }
  std::vector<std::byte> out(cap);
  const auto disk = kd::decode_disk_entry(rec, expect, out);
  if (disk) {
    KVFUZZ_CHECK(*disk <= out.size(), "disk payload larger than the buffer");
    const auto again = kd::encode_disk_entry(expect.ns, expect.key, std::span(out).first(*disk));
    KVFUZZ_CHECK(same(again, rec), "a disk entry the encoder would not write was accepted");
  } else if (disk.error() == kd::record_error::buffer_too_small) {
    KVFUZZ_CHECK(header.has_value() && header->payload_bytes > out.size(), "buffer_too_small for a fitting payload");
  }
}

// The tail of the input as a payload: both encodings decode to it; one flipped byte is refused.
void check_round_trip(kvfuzz::reader& in, std::span<const std::byte> payload) {
  const auto ns = seed_ns();
  const auto key = seed_key();
  const kd::chunk_record_expect expect{ns, key, payload.size(), ~std::uint64_t{0}};
  const std::size_t header_bytes = kd::chunk_record_fixed_bytes + 8 * in.below(8);
  auto rec = kd::encode_chunk_record(ns, key, payload, header_bytes);
  const auto value = kd::decode_chunk_record(rec, expect);
  KVFUZZ_CHECK(value.has_value(), "an encoded record does not decode: " + std::string(kd::to_string(value.error())));
  KVFUZZ_CHECK(same(*value, payload), "an encoded record decodes to other bytes");

  auto entry = kd::encode_disk_entry(ns, key, payload);
  KVFUZZ_CHECK(entry.size() == kd::disk_entry_bytes(payload.size()), "disk entry size");
  std::vector<std::byte> out(payload.size());
  const auto disk = kd::decode_disk_entry(entry, expect, out);
  KVFUZZ_CHECK(disk.has_value(), "an encoded disk entry does not decode: " + std::string(kd::to_string(disk.error())));
  KVFUZZ_CHECK(same(std::span(out).first(*disk), payload), "an encoded disk entry decodes to other bytes");

  const auto mask = static_cast<std::byte>(in.u8() | 1);
  const std::size_t at = in.below(rec.size());
  rec[at] ^= mask;
  const auto bad = kd::decode_chunk_record(rec, expect);
  KVFUZZ_CHECK(!bad.has_value(), "a record with byte " + std::to_string(at) + " flipped was accepted");
  const std::size_t disk_at = in.below(entry.size());
  entry[disk_at] ^= mask;
  const auto bad_disk = kd::decode_disk_entry(entry, expect, out);
  KVFUZZ_CHECK(!bad_disk.has_value(), "a disk entry with byte " + std::to_string(disk_at) + " flipped was accepted");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t options = data[0];
  // Copy into a heap block of exactly the record's size, so ASan sees any read past its end.
  std::vector<std::byte> rec(size - 1);
  if (!rec.empty()) std::memcpy(rec.data(), data + 1, rec.size());
  check_decoders(options, rec);

  if ((options & 0x80) != 0) {
    kvfuzz::reader in(data + 1, std::min<std::size_t>(size - 1, 3));
    const std::size_t skip = std::min<std::size_t>(size - 1, 3);
    check_round_trip(in, std::span<const std::byte>(rec).subspan(skip));
  }
  return 0;
}
