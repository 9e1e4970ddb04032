#pragma once
/// @file allocator.hpp
/// @brief The `allocator` concept: where chunk bytes live.

#include <concepts>
#include <cstddef>

#include "kvortex/error.hpp"

namespace kvortex {

/// @brief Supplies the memory that stored chunks occupy.
///
/// Required expressions, for `A& a`, `std::size_t n`, `void* p`:
/// - `a.allocate(n) -> result<void*>`: `n > 0` bytes aligned to at least 64 bytes, or an error
///   (`errc::out_of_memory` when full, so the engine evicts and retries). Never a null success.
/// - `a.deallocate(p, n) noexcept`: gives back a block from `allocate(n)` with the same `n`.
/// - `a.bytes_reserved() -> std::size_t`: bytes currently handed out (for stats and tests).
///
/// When: the engine calls `allocate` and `deallocate` only through the backend (`cpu_backend`
/// forwards them), under its exclusive index lock: when a chunk is placed, and when one is
/// evicted, replaced, rolled back or freed at shutdown. After `errc::out_of_memory` the engine
/// evicts one chunk and asks again, until nothing evictable is left; any other error fails that
/// store at once.
///
/// Semantics: every member is safe to call from several threads at once, must not call back into
/// the engine, and should not block for long (lookups wait for the lock meanwhile). The allocator
/// owns the memory; the engine never frees a pointer any other way. Moving an allocator moves ownership of
/// its outstanding blocks. Construction: `A::create(const engine_config&) -> result<A>`, else
/// `A::create() -> result<A>`, else `A(const engine_config&)`, else `A()` (`detail::make_policy`).
template <class A>
concept allocator = std::move_constructible<A> && requires(A& a, std::size_t n, void* p) {
  { a.allocate(n) } -> std::same_as<result<void*>>;
  { a.deallocate(p, n) } noexcept;
  { a.bytes_reserved() } -> std::convertible_to<std::size_t>;
};

}  // namespace kvortex
