#pragma once
/// @file hasher.hpp
/// @brief The `hasher` concept: how token chunks become chained keys.

#include <concepts>
#include <cstddef>
#include <span>
#include <string_view>

#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Turns a namespace seed and token chunks into a chain of `chunk_key`s:
/// `key_0 = root(seed)`, `key_i = chain(key_{i-1}, tokens of chunk i)`.
///
/// Required expressions, for `const H& h`, `std::span<const std::byte> seed`,
/// `const chunk_key& parent`, `std::span<const token_id> tokens`:
/// - `h.root(seed) -> chunk_key`: the chain's root for a serialized namespace.
/// - `h.chain(parent, tokens) -> chunk_key`: digest of the parent's 32 bytes followed by an
///   injective encoding of the tokens (each hasher documents its own). Equal inputs give equal
///   keys in every process and on every platform.
/// - `H::name -> std::string_view`: a stable name, e.g. "sha256".
///
/// When: `root` once, when the engine is created; `chain` once per chunk of every token list given
/// to `lookup`, `store`, `retrieve`, `begin_store`, `begin_retrieve` and `chunk_keys`, in chunk
/// order, without any engine lock held (a `lookup` that misses its first chunk hashes only that one).
///
/// Semantics: `root` and `chain` are `const` and safe to call from many threads at once; they do
/// not fail (a hasher that cannot be set up fails in `create`). Keys are compared as all 32 bytes;
/// the engine's index hashes them again with a seeded hash, so a hasher need not spread its output. Shorter digests fill the leading
/// bytes of the key and zero the rest.
template <class H>
concept hasher = std::move_constructible<H> &&
                 requires(const H& h, std::span<const std::byte> seed, const chunk_key& parent,
                          std::span<const token_id> tokens) {
                   { h.root(seed) } -> std::same_as<chunk_key>;
                   { h.chain(parent, tokens) } -> std::same_as<chunk_key>;
                   { H::name } -> std::convertible_to<std::string_view>;
                 };

}  // namespace kvortex
