#pragma once
/// @file cpu_backend.hpp
/// @brief Chunks kept in host memory taken from the engine's allocator.

#include <cstddef>
#include <span>

#include "kvortex/concepts/allocator.hpp"
#include "kvortex/concepts/backend.hpp"
#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief The host-memory tier: each chunk is one block from the allocator, written in place by the
/// transfer scheduler, so a store is a single copy. Stateless: the handle is the block itself.
class cpu_backend {
 public:
  /// @brief One chunk's block.
  struct handle {
    std::byte* data;
    std::size_t bytes;
  };

  template <class A>
  [[nodiscard]] result<handle> reserve(A& a, const chunk_key&, std::size_t n) {
    auto p = a.allocate(n);
    if (!p) return std::unexpected(std::move(p.error()));
    return handle{static_cast<std::byte*>(*p), n};
  }

  [[nodiscard]] std::span<std::byte> data(handle h) const noexcept { return {h.data, h.bytes}; }

  /// @brief The bytes are already where they stay.
  [[nodiscard]] result<void> commit(const chunk_key&, handle) noexcept { return {}; }

  template <class A>
  void release(A& a, const chunk_key&, handle h) noexcept {
    a.deallocate(h.data, h.bytes);
  }
};

static_assert(backend<cpu_backend>, "cpu_backend does not satisfy kvortex::backend");

}  // namespace kvortex
