#pragma once
/// @file transfer_scheduler.hpp
/// @brief The `transfer_scheduler` concept: who moves the bytes, and when.

#include <concepts>
#include <cstdint>
#include <functional>
#include <span>

#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Called exactly once when a submitted batch has finished, with its outcome.
using transfer_callback = std::move_only_function<void(result<void>)>;

/// @brief Which way a batch goes, seen from the inference engine's cache.
enum class transfer_direction : std::uint8_t {
  to_store,    ///< cache -> chunk buffers (store); each op's `src` is in the cache
  from_store,  ///< chunk buffers -> cache (retrieve); each op's `dst` is in the cache
};

/// @brief Where a cache lives.
enum class memory_location : std::uint8_t { host, device };

/// @brief What a scheduler may use beyond the copies themselves. Opaque handles keep CUDA types
/// out of the host API: `wait_event` is a `cudaEvent_t`, `stream` a `cudaStream_t`.
struct transfer_hints {
  transfer_direction direction{transfer_direction::to_store};
  memory_location cache_location{memory_location::host};  ///< side of each op that is in the cache
  void* wait_event{nullptr};  ///< start only after this event (e.g. the layer's compute); may be null
  void* stream{nullptr};      ///< for retrieves: make this stream wait for the copies; may be null
};

/// @brief Executes batches of copies.
///
/// Required, for `S& s`, `std::span<const copy_op> ops`, `transfer_callback done`:
/// - `s.submit(ops, std::move(done))`: performs every copy in `ops`, inline or in the background,
///   then calls `done` exactly once (on any thread) with success or the first failure. `ops` stay
///   valid until `done` is called; `done` must not be called with the scheduler's locks held.
///   Ops may be 2D (`rows` rows at `src_pitch` / `dst_pitch`, see `copy_op`); `copy_host` performs
///   one in host memory.
/// - `s.drain()`: blocks until every batch submitted so far has called its `done`.
///
/// Optional: `s.submit(ops, hints, std::move(done))` with a `const transfer_hints&`; the engine
/// calls it instead when present. A scheduler that can reach device memory declares
/// `static constexpr bool reaches_device_memory = true;`.
///
/// When: the engine calls `submit` without holding any of its locks, from the thread that calls
/// `store`, `retrieve`, `submit_layer`, `submit_all`, `save_blocks` or `load_blocks`; a transfer may
/// arrive as several batches (`engine_config::transfer_batch_bytes`, and one per layer for layered
/// transfers). `done` may run inline, inside `submit`, or later on any thread; the engine's work in
/// it (publishing a finished store, unpinning a retrieve, completing its ticket) takes the index
/// lock. The ops of one retrieve batch never write overlapping bytes (destinations are validated);
/// a store's ops may read overlapping bytes. `drain` is called by `shutdown` after every `done` ran.
///
/// Semantics: `submit` and `drain` are safe to call from several threads at once. A failure
/// reported through `done` fails that transfer: a store is rolled back, a retrieve's ticket
/// fails; the engine keeps serving. Construction as for `allocator`.
template <class S>
concept transfer_scheduler = std::move_constructible<S> &&
                             requires(S& s, std::span<const copy_op> ops, transfer_callback done) {
                               s.submit(ops, std::move(done));
                               s.drain();
                             };

}  // namespace kvortex
