#pragma once
/// @file kvortex.hpp
/// @brief The whole library, with the default engine stacks.

#include "kvortex/allocators/host_allocator.hpp"
#include "kvortex/allocators/numa_pool_allocator.hpp"
#include "kvortex/backends/cpu_backend.hpp"
#include "kvortex/backends/tiered_backend.hpp"
#include "kvortex/concepts.hpp"
#include "kvortex/config.hpp"
#include "kvortex/engine.hpp"
#include "kvortex/error.hpp"
#include "kvortex/eviction/lru_eviction.hpp"
#include "kvortex/eviction/s3fifo_eviction.hpp"
#include "kvortex/hashers/sha256_hasher.hpp"
#include "kvortex/hashers/xxh3_hasher.hpp"
#include "kvortex/layout.hpp"
#include "kvortex/logging.hpp"
#include "kvortex/schedulers/host_transfer_scheduler.hpp"
#include "kvortex/schedulers/inline_transfer_scheduler.hpp"
#include "kvortex/stats.hpp"
#include "kvortex/types.hpp"
#include "kvortex/version.hpp"

#ifdef KVORTEX_WITH_CUDA
#include "kvortex/allocators/pinned_host_allocator.hpp"
#include "kvortex/schedulers/cuda_transfer_scheduler.hpp"
#endif

namespace kvortex {

/// @brief The host-only stack: plain host memory, SHA-256 keys, LRU eviction, chunks in host RAM,
/// multi-threaded memcpy. Needs no GPU.
using host_engine = basic_engine<host_allocator, sha256_hasher, lru_eviction, cpu_backend, host_transfer_scheduler>;

/// @brief `host_engine` with storage tiers below host memory, highest first, e.g.
/// `tiered_host_engine<disk_tier, redis_tier>` (include kvortex/tiers/disk_tier.hpp and
/// kvortex/tiers/redis_tier.hpp). Made with `create(cfg, tiered_backend<cpu_backend, ...>(...))`.
template <storage_tier... Tiers>
using tiered_host_engine =
    basic_engine<host_allocator, sha256_hasher, lru_eviction, tiered_backend<cpu_backend, Tiers...>, host_transfer_scheduler>;

#ifdef KVORTEX_WITH_CUDA
/// @brief The GPU stack: NUMA-local pinned host pool, staged CUDA transfers (NVRTC kernels, DMA),
/// SHA-256 keys, LRU eviction, chunks in pinned host RAM.
using engine =
    basic_engine<pinned_host_allocator, sha256_hasher, lru_eviction, cpu_backend, cuda_transfer_scheduler>;

/// @brief `engine` with storage tiers below its pinned host memory, highest first.
template <storage_tier... Tiers>
using tiered_engine = basic_engine<pinned_host_allocator, sha256_hasher, lru_eviction, tiered_backend<cpu_backend, Tiers...>,
                                   cuda_transfer_scheduler>;
#endif

}  // namespace kvortex
