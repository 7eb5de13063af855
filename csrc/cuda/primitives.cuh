// The primitives every CUDA kernel file builds on: the block size, element types and conversions,
// numeric constants, warp reductions, the zero-padded copy of a global tile into shared memory, and
// the launchers' host-side checks (vector loads, sm_80 code, block counts).
//
// No torch headers here (see params.h). Conversions go through the cuda_fp16 / cuda_bf16
// intrinsics because torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ and friends.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "params.h"

namespace mlcontrast {
namespace cuda {

// Every kernel of the library runs 128 threads (4 warps) per block unless it says otherwise.
constexpr int kThreads = 128;
constexpr int kWarp = 32;

// ----------------------------------------------------------------------------------------------
// Element types
// ----------------------------------------------------------------------------------------------

// The accumulation type of an element type: fp64 for fp64, fp32 for everything else.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Element -> accumulation type. Only fp64 elements accumulate in fp64.
template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T x) {
  return static_cast<Acc>(to_float(x));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double x) {
  return x;
}

// Accumulation type -> element, rounding to nearest.
template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc x);
template <>
__device__ __forceinline__ float from_acc<float, float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ double from_acc<double, double>(double x) {
  return x;
}

template <typename Acc>
__device__ __forceinline__ Acc inf_of();
template <>
__device__ __forceinline__ float inf_of<float>() {
  return std::numeric_limits<float>::infinity();  // constexpr: usable in device code
}
template <>
__device__ __forceinline__ double inf_of<double>() {
  return std::numeric_limits<double>::infinity();
}

// Accurate exp/log/sqrt (no fast-math intrinsics: the fp32 results are compared with fp64 at 1e-4).
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double acc_sqrt(double x) { return sqrt(x); }

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ----------------------------------------------------------------------------------------------
// Global -> shared tile copy
// ----------------------------------------------------------------------------------------------

constexpr std::size_t round_up(std::size_t x, std::size_t a) { return (x + a - 1) / a * a; }

// Copies rows [r0, r0 + R) x columns [c0, c0 + C) of the row-major matrix `src` (nrows x ncols,
// row stride ld) into shared memory, as dst[r * LDD + c], or dst[c * LDD + r] when Transposed.
// Entries outside the matrix are written as zeros, so a partial tile needs no masking in the
// products. With `vec`, rows are read as 16-byte vectors: the caller guarantees that `src` is
// 16-byte aligned and that ld and ncols are multiples of the vector width, so a vector lies
// wholly inside or wholly outside the matrix. Consecutive threads read consecutive columns of a
// row (coalesced). Must be called by all kThreads threads of the block.
template <int R, int C, bool Transposed, int LDD, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* __restrict__ src, int64_t ld, int64_t r0,
                                          int64_t c0, int64_t nrows, int64_t ncols, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(C % kVec == 0, "tile width must be a multiple of the vector width");
  if (vec) {
    constexpr int kCv = C / kVec;
    for (int idx = threadIdx.x; idx < R * kCv; idx += kThreads) {
      const int r = idx / kCv, cv = idx % kCv;
      const int64_t gr = r0 + r, gc = c0 + int64_t(cv) * kVec;
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (gr < nrows && gc < ncols) raw = *reinterpret_cast<const uint4*>(src + gr * ld + gc);
      const T* e = reinterpret_cast<const T*>(&raw);
      if constexpr (Transposed) {
#pragma unroll
        for (int q = 0; q < kVec; ++q) dst[(cv * kVec + q) * LDD + r] = e[q];
      } else if constexpr ((LDD * sizeof(T)) % 16 == 0) {
        *reinterpret_cast<uint4*>(dst + r * LDD + cv * kVec) = raw;
      } else {
#pragma unroll
        for (int q = 0; q < kVec; ++q) dst[r * LDD + cv * kVec + q] = e[q];
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < R * C; idx += kThreads) {
      const int r = idx / C, c = idx % C;
      const int64_t gr = r0 + r, gc = c0 + c;
      T v = from_acc<T>(acc_t<T>(0));
      if (gr < nrows && gc < ncols) v = src[gr * ld + gc];
      if constexpr (Transposed) {
        dst[c * LDD + r] = v;
      } else {
        dst[r * LDD + c] = v;
      }
    }
  }
}

// Whether 16-byte vector loads are valid for a row-major matrix (see load_tile).
__host__ __device__ inline bool vector_loads_ok(const void* ptr, int64_t ld, int64_t ncols, int element_size) {
  const int64_t width = 16 / element_size;
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && ld % width == 0 && ncols % width == 0;
}

// Whether a kernel's device code was compiled for sm_80 or newer (its PTX version, which is the
// __CUDA_ARCH__ it saw). Tensor-core kernels trap on older architectures, so the launchers use
// them only when this holds for the running device. Cached per device.
template <typename Kernel>
bool compiled_for_sm80(Kernel kernel) {
  static std::atomic<int> cache[64];  // 0 unknown, 1 no, 2 yes (static: zero-initialised)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (device >= 0 && device < 64) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known != 0) return known == 2;
  }
  cudaFuncAttributes attr;
  bool ok = false;
  if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess) {
    ok = attr.ptxVersion >= 80;
  } else {
    // No image for this device: the caller's fallback launch reports the error.
    (void)cudaGetLastError();
  }
  if (device >= 0 && device < 64) cache[device].store(ok ? 2 : 1, std::memory_order_relaxed);
  return ok;
}

inline unsigned int blocks_for(int64_t work, int64_t per_block) {
  return static_cast<unsigned int>((work + per_block - 1) / per_block);
}

}  // namespace cuda
}  // namespace mlcontrast
