#pragma once
/// @file backend.hpp
/// @brief The `backend` concept: the tier that keeps chunk bytes.

#include <concepts>
#include <cstddef>
#include <span>
#include <type_traits>

#include "kvortex/concepts/allocator.hpp"
#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

namespace detail {
/// Stands for any allocator in the concept check.
struct allocator_archetype {
  result<void*> allocate(std::size_t);
  void deallocate(void*, std::size_t) noexcept;
  std::size_t bytes_reserved() const;
};
}  // namespace detail

/// @brief Keeps the bytes of stored chunks. The engine owns the index (which keys exist, their
/// sizes, pins and eviction order); the backend owns where the bytes are.
///
/// Required, for `B& b`, an allocator `A& a`, `const chunk_key& k`, `std::size_t n`,
/// `typename B::handle h`:
/// - `typename B::handle`: trivially copyable; names one chunk's storage.
/// - `b.reserve(a, k, n) -> result<handle>`: room for `n` bytes of chunk `k`, not yet readable.
///   May take memory from `a`; returns `errc::out_of_memory` when `a` is full (the engine evicts
///   and retries) and leaves nothing behind on failure.
/// - `b.data(h) -> std::span<std::byte>`: the chunk's `n` bytes in host memory, for the transfer
///   scheduler to write (after `reserve`) or read (after `commit`). Stable until `release`.
/// - `b.commit(k, h) -> result<void>`: the bytes are written; persist them in this tier.
/// - `b.release(a, k, h) noexcept`: drop the chunk (evicted, aborted or shut down) and give its
///   memory back to `a`.
///
/// When each is called: `reserve` under the engine's exclusive index lock, when a store or
/// `save_blocks` places a chunk (after evicting, if the byte budget requires); `data` without the
/// lock, while a transfer builds its copies (the chunk is reserved or pinned, so it cannot go);
/// `commit` without the lock, once per chunk, by the thread that completes a store's last copy,
/// before the chunk becomes readable (a failed commit rolls back that chunk and the store's chunks
/// after it, and fails the store; the complete chunks before it stay readable);
/// `release` under the exclusive index lock, when a chunk is evicted or replaced, when a store is
/// rolled back (also for chunks never committed), and for every chunk at shutdown.
///
/// Semantics: calls for different keys may come from several threads at once; the engine never
/// calls two of them for the same key concurrently, and never releases a chunk a transfer reads.
/// `reserve` and `release` run under the index lock, so they must not call back into the engine
/// and should be fast. Construction as for `allocator`.
template <class B, class A = detail::allocator_archetype>
concept backend = std::move_constructible<B> && std::is_trivially_copyable_v<typename B::handle> &&
                  requires(B& b, A& a, const chunk_key& k, std::size_t n, typename B::handle h) {
                    { b.reserve(a, k, n) } -> std::same_as<result<typename B::handle>>;
                    { b.data(h) } -> std::same_as<std::span<std::byte>>;
                    { b.commit(k, h) } -> std::same_as<result<void>>;
                    { b.release(a, k, h) } noexcept;
                  };

}  // namespace kvortex
