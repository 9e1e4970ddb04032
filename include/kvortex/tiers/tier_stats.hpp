#pragma once
/// @file tier_stats.hpp
/// @brief Counters of a storage tier below host memory (disk, Redis): `tier_stats`, defined with
/// the engine's counters in stats.hpp.

#include "kvortex/stats.hpp"
