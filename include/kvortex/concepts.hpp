#pragma once
/// @file concepts.hpp
/// @brief Every policy concept of `basic_engine`.

#include "kvortex/concepts/allocator.hpp"
#include "kvortex/concepts/backend.hpp"
#include "kvortex/concepts/eviction_policy.hpp"
#include "kvortex/concepts/hasher.hpp"
#include "kvortex/concepts/storage_tier.hpp"
#include "kvortex/concepts/transfer_scheduler.hpp"
