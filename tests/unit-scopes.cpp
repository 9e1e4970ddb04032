// Key salts (prompts scoped inside one namespace) and skipped destination blocks (a retrieve that
// leaves the blocks an inference engine already holds untouched).

#include <doctest/doctest.h>

#include "test_support.hpp"

#include <string_view>

using namespace kvortex;

namespace {

key_salt salt_of(std::string_view s) { return std::as_bytes(std::span(s.data(), s.size())); }

}  // namespace

TEST_CASE("a prompt stored under a salt is found only under that salt") {
  auto eng = host_engine::create(kvt::small_config()).value();
  const auto cfg = kvt::small_config();
  const auto tokens = kvt::make_tokens(96, 1);
  kvt::paged_cache cache(cfg.geometry, 16, cfg.block_tokens);
  cache.fill(tokens, {});
  REQUIRE(eng.store(tokens, cache.layout(), {}, {}, salt_of("tenant-a")).value().wait().value() == 96);

  CHECK(eng.lookup(tokens, salt_of("tenant-a")).value() == 96);
  CHECK(eng.lookup(tokens).value() == 0);
  CHECK(eng.lookup(tokens, salt_of("tenant-b")).value() == 0);
  const std::byte zero[1] = {std::byte{0}};
  CHECK(eng.lookup(tokens, key_salt(zero, 1)).value() == 0);  // one zero byte is not the empty salt

  // Keys differ from the unsalted chain at every chunk, and from another salt's.
  const auto plain = eng.chunk_keys(tokens).value();
  const auto a = eng.chunk_keys(tokens, salt_of("tenant-a")).value();
  const auto b = eng.chunk_keys(tokens, salt_of("tenant-b")).value();
  REQUIRE(plain.size() == 3);
  for (std::size_t i = 0; i < plain.size(); ++i) {
    CHECK(plain[i] != a[i]);
    CHECK(a[i] != b[i]);
  }

  // A retrieve under the wrong salt copies nothing; under the right one, every byte.
  kvt::paged_cache out(cfg.geometry, 16, cfg.block_tokens);
  CHECK(eng.retrieve(tokens, out.layout(), {}, {}, salt_of("tenant-b")).value().wait().value() == 0);
  CHECK(eng.retrieve(tokens, out.layout(), {}, {}, salt_of("tenant-a")).value().wait().value() == 96);
  CHECK(out.mismatches(tokens, 96, {}) == 0);

  // prefetch and the layered API take the salt too.
  CHECK(eng.prefetch(tokens, salt_of("tenant-a")).value().wait().value() == 96);
  CHECK(eng.prefetch(tokens).value().wait().value() == 0);
  auto lr = eng.begin_retrieve(tokens, out.layout(), {}, salt_of("tenant-a")).value();
  CHECK(lr.tokens() == 96);
  REQUIRE(lr.submit_all().has_value());
  CHECK(lr.finish().value().wait().value() == 96);
}

TEST_CASE("a salted pseudo-chunk never equals a real first chunk") {
  // The salt's bytes spelled as the first chunk's tokens must not give that chunk's key.
  auto eng = host_engine::create(kvt::small_config()).value();
  const auto tokens = kvt::make_tokens(64, 2);
  const auto plain = eng.chunk_keys(tokens).value();
  std::vector<std::byte> as_salt(32 * sizeof(token_id));
  std::memcpy(as_salt.data(), tokens.data(), as_salt.size());
  const std::span<const token_id> tail(tokens.data() + 32, 32);
  const auto salted = eng.chunk_keys(tail, key_salt(as_salt)).value();
  REQUIRE(salted.size() == 1);
  CHECK(salted[0] != plain[1]);
}

TEST_CASE("retrieve leaves skip_block entries untouched and still counts them as hit") {
  const auto cfg = kvt::small_config();
  auto eng = host_engine::create(cfg).value();
  const auto tokens = kvt::make_tokens(96, 3);  // 3 chunks of 32, 6 blocks of 16
  kvt::paged_cache src(cfg.geometry, 16, cfg.block_tokens);
  src.fill(tokens, {});
  REQUIRE(eng.store(tokens, src.layout()).value().wait().value() == 96);

  kvt::paged_cache dst(cfg.geometry, 16, cfg.block_tokens);
  std::vector<std::int32_t> table = {kv_layout::skip_block, kv_layout::skip_block, kv_layout::skip_block, 9, 4, 12};
  // The skipped blocks' physical homes hold sentinel bytes the retrieve must not overwrite.
  std::vector<std::int32_t> home = {0, 1, 2, 9, 4, 12};
  for (auto& l : dst.layers) std::memset(l.data(), 0x5A, l.size());
  REQUIRE(eng.retrieve(tokens, dst.layout(), table).value().wait().value() == 96);
  // Blocks 3..5 (tokens 48..95) carry the stored KV.
  std::size_t bad = 0;
  for (std::size_t pos = 48; pos < 96; ++pos)
    dst.for_each_byte(pos, home, [&](std::size_t l, std::size_t p, std::size_t i, std::byte* b) {
      bad += *b != kvt::kv_byte(tokens[pos], pos, l, p, i);
    });
  CHECK(bad == 0);
  // Blocks 0..2 still hold the sentinel.
  std::size_t touched = 0;
  for (std::size_t pos = 0; pos < 48; ++pos)
    dst.for_each_byte(pos, home, [&](std::size_t, std::size_t, std::size_t, std::byte* b) { touched += *b != std::byte{0x5A}; });
  CHECK(touched == 0);

  // Several skip entries do not count as duplicates; a real duplicate still fails.
  std::vector<std::int32_t> dup = {kv_layout::skip_block, 3, 3, 5, 6, 7};
  auto r = eng.retrieve(tokens, dst.layout(), dup);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == errc::invalid_argument);
  // Other negative entries are refused, and a store never accepts skip_block.
  std::vector<std::int32_t> neg = {-2, 1, 2, 3, 4, 5};
  CHECK(eng.retrieve(tokens, dst.layout(), neg).error().code == errc::invalid_argument);
  CHECK(eng.store(tokens, src.layout(), table).error().code == errc::invalid_argument);
}
