#pragma once
/// @file xxhash_include.hpp
/// @brief Includes xxHash header-only (`XXH_INLINE_ALL`) where it is installed, and defines
/// `KVORTEX_HAS_XXHASH` then. Every KVortex header that uses XXH3 includes it through here, so all
/// of them see one configuration of the library.

#if defined(KVORTEX_WITH_XXHASH) || __has_include(<xxhash.h>)
#define KVORTEX_HAS_XXHASH 1
#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#define KVORTEX_XXH_INLINE_ALL_DEFINED_HERE
#endif
#include <xxhash.h>
#ifdef KVORTEX_XXH_INLINE_ALL_DEFINED_HERE
#undef XXH_INLINE_ALL
#undef KVORTEX_XXH_INLINE_ALL_DEFINED_HERE
#endif
#endif
