#pragma once
/// @file transfer_scheduler.hpp
/// @brief The `transfer_scheduler` concept: who moves the bytes, and when.

#include <concepts>
#include <functional>
#include <span>

#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Called exactly once when a submitted batch has finished, with its outcome.
using transfer_callback = std::move_only_function<void(result<void>)>;

/// @brief Executes batches of copies.
///
/// Required, for `S& s`, `std::span<const copy_op> ops`, `transfer_callback done`:
/// - `s.submit(ops, std::move(done))`: performs every copy in `ops`, inline or in the background,
///   then calls `done` exactly once (on any thread) with success or the first failure. `ops` stay
///   valid until `done` is called; `done` must not be called with the scheduler's locks held.
/// - `s.drain()`: blocks until every batch submitted so far has called its `done`.
///
/// Semantics: `submit` and `drain` are safe to call from several threads at once. Construction
/// as for `allocator`.
template <class S>
concept transfer_scheduler = std::move_constructible<S> &&
                             requires(S& s, std::span<const copy_op> ops, transfer_callback done) {
                               s.submit(ops, std::move(done));
                               s.drain();
                             };

}  // namespace kvortex
