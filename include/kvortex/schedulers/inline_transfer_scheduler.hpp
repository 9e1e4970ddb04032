#pragma once
/// @file inline_transfer_scheduler.hpp
/// @brief Copies every batch on the calling thread before `submit` returns.

#include <span>
#include <utility>

#include "kvortex/concepts/transfer_scheduler.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief The simplest scheduler: `memcpy` on the caller's thread. Deterministic, no threads;
/// suits small chunks, tests, and callers that run their own thread pools.
class inline_transfer_scheduler {
 public:
  /// @brief Copies `ops`, then calls `done`.
  void submit(std::span<const copy_op> ops, transfer_callback done) {
    for (const auto& op : ops) copy_host(op);
    done(result<void>{});
  }
  /// @brief Nothing is ever pending.
  void drain() noexcept {}
};

static_assert(transfer_scheduler<inline_transfer_scheduler>,
              "inline_transfer_scheduler does not satisfy kvortex::transfer_scheduler");

}  // namespace kvortex
