#pragma once
/// @file transfer_kernels.hpp
/// @brief CUDA C++ source of the gather and scatter kernels, compiled at run time by NVRTC.
///
/// Kept as a string so that no part of the library needs nvcc: `nvrtc_program.hpp` compiles it for
/// the running GPU on first use. Each kernel walks a table of fragments (`frag`: source, destination,
/// bytes per row, rows, pitches); one warp copies one fragment at a time, grid-striding over the
/// table, with 16-byte accesses when both ends, the length and the pitches allow, four loads in
/// flight per lane, and evict-first cache hints so the copy does not push a concurrent compute
/// kernel's working set out of L2. A fragment of several rows is copied as one flat range of
/// elements, so a warp stays busy across short rows (the transposition of HND heads). A fragment
/// may repeat its rows as `planes` (the heads of one HND block: one fragment instead of one per head);
/// its plane count and plane pitches then sit in the next table entry, an extension record with
/// `bytes == 0` that the warp drawing it skips.
/// The grids are small (a few CTAs), so the kernels fit beside compute kernels.

#include <cstdint>

namespace kvortex::detail {

/// One fragment as the kernels read it; the host builds tables of these in device memory.
/// Row `r` copies `bytes` from `src + r*src_pitch` to `dst + r*dst_pitch`; `rows` is at least 1.
/// With `rows & fragment_planes_flag` the rows (`rows & ~fragment_planes_flag` of them) repeat as
/// planes described by the next entry: `{src_plane_pitch, dst_plane_pitch, 0, planes, 0, 0}`.
struct alignas(16) kernel_fragment {
  std::uint64_t src;
  std::uint64_t dst;
  std::uint32_t bytes;
  std::uint32_t rows;
  std::uint32_t src_pitch;
  std::uint32_t dst_pitch;
};
static_assert(sizeof(kernel_fragment) == 32);

/// Set in `kernel_fragment::rows` when the next entry holds plane count and pitches.
inline constexpr std::uint32_t fragment_planes_flag = 0x80000000u;

/// Kernel names in `transfer_kernels_source`.
inline constexpr const char* gather_kernel_name = "kvortex_gather";
inline constexpr const char* scatter_kernel_name = "kvortex_scatter";

/// The kernels' source (C++17 subset NVRTC accepts, no includes).
inline constexpr const char* transfer_kernels_source = R"kvortex(
struct kvortex_frag { unsigned long long src, dst; unsigned bytes, rows, src_pitch, dst_pitch; };

template <class T>
__device__ __forceinline__ T kvx_load(const T* p) { return *p; }
template <>
__device__ __forceinline__ int4 kvx_load<int4>(const int4* p) { return __ldcs(p); }
template <class T>
__device__ __forceinline__ void kvx_store(T* p, T v) { *p = v; }
template <>
__device__ __forceinline__ void kvx_store<int4>(int4* p, int4 v) { __stcs(p, v); }

// One warp copies n elements of T; four independent loads per lane before the stores.
template <class T>
__device__ __forceinline__ void kvx_copy_warp(const T* __restrict__ s, T* __restrict__ d,
                                              unsigned long long n, unsigned lane) {
  unsigned long long i = lane;
  for (; i + 96 < n; i += 128) {
    const T a = kvx_load(s + i), b = kvx_load(s + i + 32), c = kvx_load(s + i + 64), e = kvx_load(s + i + 96);
    kvx_store(d + i, a); kvx_store(d + i + 32, b); kvx_store(d + i + 64, c); kvx_store(d + i + 96, e);
  }
  for (; i < n; i += 32) kvx_store(d + i, kvx_load(s + i));
}

// Element i of a 2D fragment: row i / per_row, column i % per_row (pitches in elements).
__device__ __forceinline__ unsigned long long kvx_at(unsigned i, unsigned per_row, unsigned pitch) {
  const unsigned r = i / per_row;
  return static_cast<unsigned long long>(r) * pitch + (i - r * per_row);
}

// One warp copies rows x per_row elements of T, the rows flattened into one index space.
template <class T>
__device__ __forceinline__ void kvx_copy_warp_2d(const T* __restrict__ s, T* __restrict__ d, unsigned per_row,
                                                 unsigned rows, unsigned sp, unsigned dp, unsigned lane) {
  const unsigned n = per_row * rows;
  unsigned i = lane;
  for (; i + 96 < n; i += 128) {
    const T a = kvx_load(s + kvx_at(i, per_row, sp)), b = kvx_load(s + kvx_at(i + 32, per_row, sp)),
            c = kvx_load(s + kvx_at(i + 64, per_row, sp)), e = kvx_load(s + kvx_at(i + 96, per_row, sp));
    kvx_store(d + kvx_at(i, per_row, dp), a); kvx_store(d + kvx_at(i + 32, per_row, dp), b);
    kvx_store(d + kvx_at(i + 64, per_row, dp), c); kvx_store(d + kvx_at(i + 96, per_row, dp), e);
  }
  for (; i < n; i += 32) kvx_store(d + kvx_at(i, per_row, dp), kvx_load(s + kvx_at(i, per_row, sp)));
}

__device__ __forceinline__ void kvx_copy_fragments(const kvortex_frag* __restrict__ frags, unsigned count) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warps = (gridDim.x * blockDim.x) >> 5;
  for (unsigned f = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; f < count; f += warps) {
    kvortex_frag fr = frags[f];
    if (fr.bytes == 0) continue;  // empty, or the extension record of the fragment before
    if (fr.rows & 0x80000000u) {
      // Planes: the same rows again at a fixed distance (plane pitches in the next entry).
      const kvortex_frag x = frags[f + 1];
      fr.rows &= 0x7FFFFFFFu;
      const unsigned long long a = fr.src | fr.dst | fr.bytes | fr.src_pitch | fr.dst_pitch | x.src | x.dst;
      for (unsigned p = 0; p < x.rows; ++p) {
        const unsigned long long s = fr.src + p * x.src, d = fr.dst + p * x.dst;
        if ((a & 15ull) == 0) {
          kvx_copy_warp_2d(reinterpret_cast<const int4*>(s), reinterpret_cast<int4*>(d), fr.bytes >> 4, fr.rows,
                           fr.src_pitch >> 4, fr.dst_pitch >> 4, lane);
        } else if ((a & 3ull) == 0) {
          kvx_copy_warp_2d(reinterpret_cast<const unsigned*>(s), reinterpret_cast<unsigned*>(d), fr.bytes >> 2,
                           fr.rows, fr.src_pitch >> 2, fr.dst_pitch >> 2, lane);
        } else {
          kvx_copy_warp_2d(reinterpret_cast<const unsigned char*>(s), reinterpret_cast<unsigned char*>(d), fr.bytes,
                           fr.rows, fr.src_pitch, fr.dst_pitch, lane);
        }
      }
      continue;
    }
    if (fr.rows <= 1) {
      const unsigned long long a = fr.src | fr.dst | fr.bytes;
      if ((a & 15ull) == 0) {
        kvx_copy_warp(reinterpret_cast<const int4*>(fr.src), reinterpret_cast<int4*>(fr.dst), fr.bytes >> 4, lane);
      } else if ((a & 3ull) == 0) {
        kvx_copy_warp(reinterpret_cast<const unsigned*>(fr.src), reinterpret_cast<unsigned*>(fr.dst), fr.bytes >> 2, lane);
      } else {
        kvx_copy_warp(reinterpret_cast<const unsigned char*>(fr.src), reinterpret_cast<unsigned char*>(fr.dst),
                      fr.bytes, lane);
      }
      continue;
    }
    const unsigned long long a = fr.src | fr.dst | fr.bytes | fr.src_pitch | fr.dst_pitch;
    if ((a & 15ull) == 0) {
      kvx_copy_warp_2d(reinterpret_cast<const int4*>(fr.src), reinterpret_cast<int4*>(fr.dst), fr.bytes >> 4, fr.rows,
                       fr.src_pitch >> 4, fr.dst_pitch >> 4, lane);
    } else if ((a & 3ull) == 0) {
      kvx_copy_warp_2d(reinterpret_cast<const unsigned*>(fr.src), reinterpret_cast<unsigned*>(fr.dst), fr.bytes >> 2,
                       fr.rows, fr.src_pitch >> 2, fr.dst_pitch >> 2, lane);
    } else {
      kvx_copy_warp_2d(reinterpret_cast<const unsigned char*>(fr.src), reinterpret_cast<unsigned char*>(fr.dst),
                       fr.bytes, fr.rows, fr.src_pitch, fr.dst_pitch, lane);
    }
  }
}

// Store side: cache fragments -> staging slab (or any destination).
extern "C" __global__ void __launch_bounds__(1024) kvortex_gather(const kvortex_frag* frags, unsigned count) {
  kvx_copy_fragments(frags, count);
}

// Retrieve side: staging slab -> cache fragments.
extern "C" __global__ void __launch_bounds__(1024) kvortex_scatter(const kvortex_frag* frags, unsigned count) {
  kvx_copy_fragments(frags, count);
}
)kvortex";

}  // namespace kvortex::detail
