#include <doctest/doctest.h>

#include <openssl/sha.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "kvortex/hashers/sha256_hasher.hpp"
#include "kvortex/hashers/xxh3_hasher.hpp"
#include "kvortex/types.hpp"

using kvortex::chunk_key;
using kvortex::token_id;

namespace {

template <class H>
H make_hasher() {
  if constexpr (requires { H::create(); }) {
    auto r = H::create();
    REQUIRE(r.has_value());
    return std::move(*r);
  } else {
    return H{};
  }
}

std::span<const std::byte> bytes_of(std::string_view s) { return std::as_bytes(std::span(s.data(), s.size())); }

chunk_key from_hex(std::string_view hex) {
  REQUIRE(hex.size() == 64);
  chunk_key k;
  auto nib = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
  for (std::size_t i = 0; i < 32; ++i) k.bytes[i] = static_cast<std::byte>(nib(hex[2 * i]) * 16 + nib(hex[2 * i + 1]));
  return k;
}

std::vector<token_id> iota_tokens(std::size_t n, token_id start) {
  std::vector<token_id> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = start + static_cast<token_id>(i);
  return v;
}

}  // namespace

#ifdef KVORTEX_HAS_XXH3_HASHER
#define KVORTEX_TEST_HASHERS kvortex::sha256_hasher, kvortex::xxh3_hasher
#else
#define KVORTEX_TEST_HASHERS kvortex::sha256_hasher
#endif

TEST_CASE_TEMPLATE("hasher conformance", H, KVORTEX_TEST_HASHERS) {
  const H h = make_hasher<H>();
  CHECK_FALSE(std::string_view(H::name).empty());
  const chunk_key root = h.root(bytes_of("llama|bf16|kv_2ltd|0/1"));
  const auto tokens = iota_tokens(256, 1000);

  SUBCASE("deterministic, also across instances") {
    const H other = make_hasher<H>();
    CHECK(h.chain(root, tokens) == h.chain(root, tokens));
    CHECK(other.chain(root, tokens) == h.chain(root, tokens));
    CHECK(other.root(bytes_of("x")) == h.root(bytes_of("x")));
    CHECK(h.chain(root, tokens) != chunk_key{});
  }

  SUBCASE("roots differ per seed, including the empty seed") {
    CHECK(h.root(bytes_of("model-a")) != h.root(bytes_of("model-b")));
    CHECK(h.root(bytes_of("")) != h.root(bytes_of("model-a")));
    CHECK(h.root(bytes_of("ab")) != h.root(bytes_of("a")));
  }

  SUBCASE("different parents give different keys") {
    const chunk_key other_root = h.root(bytes_of("llama|bf16|kv_2ltd|1/2"));
    CHECK(h.chain(root, tokens) != h.chain(other_root, tokens));
  }

  SUBCASE("different tokens give different keys") {
    auto changed = tokens;
    changed[200] += 1;
    CHECK(h.chain(root, tokens) != h.chain(root, changed));
    CHECK(h.chain(root, tokens) != h.chain(root, std::span(tokens).first(255)));
    CHECK(h.chain(root, {}) != h.chain(root, tokens));
  }

  SUBCASE("order matters, within a chunk and along the chain") {
    auto swapped = tokens;
    std::swap(swapped[0], swapped[1]);
    CHECK(h.chain(root, tokens) != h.chain(root, swapped));
    const auto a = iota_tokens(16, 1);
    const auto b = iota_tokens(16, 100);
    CHECK(h.chain(h.chain(root, a), b) != h.chain(h.chain(root, b), a));
  }

  SUBCASE("8 threads compute the same chain") {
    const auto prompt = iota_tokens(8192, 7);
    auto run_chain = [&] {
      chunk_key k = root;
      for (std::size_t c = 0; c < 32; ++c) k = h.chain(k, std::span(prompt).subspan(c * 256, 256));
      return k;
    };
    const chunk_key expected = run_chain();
    std::array<chunk_key, 8> got{};
    std::vector<std::thread> threads;
    for (std::size_t t = 0; t < got.size(); ++t)
      threads.emplace_back([&, t] {
        for (int rep = 0; rep < 50; ++rep) got[t] = run_chain();
      });
    for (auto& th : threads) th.join();
    for (const auto& k : got) CHECK(k == expected);
  }
}

TEST_CASE("sha256_hasher: known answers") {
  const auto h = make_hasher<kvortex::sha256_hasher>();
  CHECK(kvortex::sha256_hasher::name == "sha256");
  const std::vector<token_id> tokens{1, 2, 3, -1, 0x12345678};

  // sha256sum of 32 zero bytes, 01000000 02000000 03000000 ffffffff 78563412, width 04.
  CHECK(h.chain(chunk_key{}, tokens).hex() == "0e483a9711b5c71565867942ec36116fbeb15fe90a30f1da193366b421e2f74f");
  // sha256sum of 32 zero bytes, 010000 020000 efcdab, width 03: ids below 2^24 take 3 bytes.
  const std::vector<token_id> narrow{1, 2, 0xABCDEF};
  CHECK(h.chain(chunk_key{}, narrow).hex() == "e1670a94e1db12b5acbdcd809da6c68dc020a7a5b5a2cab19f2a4ca0faae4605");
  // sha256sum of "kvortex-root\0model".
  CHECK(h.root(bytes_of("model")) == from_hex("c6d232b01bceccf83e54096941facbea9ab6f9b977dff3cba8360b69eeb8000c"));
  // sha256sum of 32 zero bytes and the width byte 03.
  CHECK(h.chain(chunk_key{}, {}).hex() == "d9cf8add8675a1b25627d7b0ec33bc177cb3930b0b6e995d79c386b980b2f4d6");

  // And against OpenSSL's one-shot SHA256() over the concatenated bytes of a full chunk.
  // Chunks of every size and both widths, against a message written out independently.
  const chunk_key parent = h.root(bytes_of("seed"));
  for (const token_id start : {-128, 0, 100000}) {
    for (const std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{256}, std::size_t{1023},
                                std::size_t{1024}, std::size_t{2051}}) {
      CAPTURE(start);
      CAPTURE(n);
      const auto chunk = iota_tokens(n, start);
      const std::size_t width = start < 0 ? 4 : 3;
      std::vector<unsigned char> buf(32 + chunk.size() * width + 1);
      std::memcpy(buf.data(), parent.bytes.data(), 32);
      for (std::size_t i = 0; i < chunk.size(); ++i) {
        const auto v = static_cast<std::uint32_t>(chunk[i]);
        for (std::size_t b = 0; b < width; ++b) buf[32 + width * i + b] = static_cast<unsigned char>(v >> (8 * b));
      }
      buf.back() = static_cast<unsigned char>(width);
      chunk_key expected;
      SHA256(buf.data(), buf.size(), reinterpret_cast<unsigned char*>(expected.bytes.data()));
      CHECK(h.chain(parent, chunk) == expected);
    }
  }
}

#ifdef KVORTEX_HAS_XXH3_HASHER
TEST_CASE("xxh3_hasher: digest in the first 16 bytes, zero tail") {
  const kvortex::xxh3_hasher h;
  CHECK(kvortex::xxh3_hasher::name == "xxh3_128");
  const auto chunk = iota_tokens(256, 5);
  const chunk_key parent = h.root(bytes_of("seed"));
  const chunk_key k = h.chain(parent, chunk);
  for (std::size_t i = 16; i < 32; ++i) CHECK(k.bytes[i] == std::byte{0});
  for (std::size_t i = 16; i < 32; ++i) CHECK(parent.bytes[i] == std::byte{0});

  // The digest equals XXH3-128 over the concatenation, in canonical order.
  std::vector<unsigned char> buf(32 + chunk.size() * 4);
  std::memcpy(buf.data(), parent.bytes.data(), 32);
  for (std::size_t i = 0; i < chunk.size(); ++i) {
    const auto v = static_cast<std::uint32_t>(chunk[i]);
    for (std::size_t b = 0; b < 4; ++b) buf[32 + 4 * i + b] = static_cast<unsigned char>(v >> (8 * b));
  }
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, XXH3_128bits(buf.data(), buf.size()));
  CHECK(std::memcmp(k.bytes.data(), c.digest, 16) == 0);
}
#endif

TEST_CASE("compact token packing: the scalar and the SIMD path agree") {
  std::vector<std::uint32_t> ids(1024);
  std::uint32_t x = 12345;
  for (auto& v : ids) v = (x = x * 1103515245u + 12345u) % (1u << 24);
  std::vector<std::uint32_t> scalar(3 * ids.size() / 4 + 1, 0);
  const std::uint32_t all = kvortex::detail::pack_24bit(ids.data(), ids.size(), scalar.data());
  std::uint32_t expect_all = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    expect_all |= ids[i];
    const auto* b = reinterpret_cast<const unsigned char*>(scalar.data()) + 3 * i;
    CHECK(static_cast<std::uint32_t>(b[0] | b[1] << 8 | b[2] << 16) == ids[i]);
  }
  CHECK(all == expect_all);
#ifdef KVORTEX_PACK_SSSE3
  if (__builtin_cpu_supports("ssse3")) {
    std::vector<unsigned char> simd(3 * ids.size() + 4, 0);
    CHECK(kvortex::detail::pack_24bit_ssse3(ids.data(), ids.size(), simd.data()) == all);
    CHECK(std::memcmp(simd.data(), scalar.data(), 3 * ids.size()) == 0);
  }
#endif
}
