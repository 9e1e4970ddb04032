#pragma once
/// @file kvortex_fwd.hpp
/// @brief Forward declarations, for headers that only name the engine.

#include "kvortex/concepts.hpp"

namespace kvortex {

template <allocator Allocator, hasher Hasher, eviction_policy EvictionPolicy, class Backend,
          transfer_scheduler TransferScheduler>
class basic_engine;

class transfer_ticket;
class kv_layout;
struct engine_config;
struct engine_stats;

}  // namespace kvortex
