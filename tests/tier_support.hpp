#pragma once
// Shared by the tiered-engine tests: store a prompt's KV from a cache filled with it, and retrieve
// it into a fresh cache checking every byte served.

#include <doctest/doctest.h>

#include <cstddef>
#include <vector>

#include "test_support.hpp"

namespace kvt {

// Stores `tokens` from a cache filled with their KV; returns the tokens the store wrote.
template <class Engine>
std::size_t store_prompt(Engine& e, const std::vector<kvortex::token_id>& tokens) {
  const auto& c = e.config();
  paged_cache src(c.geometry, tokens.size() / c.block_tokens + 1, c.block_tokens);
  src.fill(tokens, {});
  auto t = e.store(tokens, src.layout());
  REQUIRE_MESSAGE(t.has_value(), t.error().message);
  auto n = t->wait();
  REQUIRE_MESSAGE(n.has_value(), n.error().message);
  return *n;
}

// Retrieves `tokens` into a fresh cache; returns the tokens served and checks every byte of them.
template <class Engine>
std::size_t retrieve_checked(Engine& e, const std::vector<kvortex::token_id>& tokens) {
  const auto& c = e.config();
  paged_cache dst(c.geometry, tokens.size() / c.block_tokens + 1, c.block_tokens);
  auto t = e.retrieve(tokens, dst.layout());
  REQUIRE_MESSAGE(t.has_value(), t.error().message);
  auto n = t->wait();
  REQUIRE_MESSAGE(n.has_value(), n.error().message);
  CHECK(dst.mismatches(tokens, *n, {}) == 0);
  return *n;
}

}  // namespace kvt
