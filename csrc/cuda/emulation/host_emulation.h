// A minimal CUDA execution model on the CPU, for testing the kernel templates without a GPU.
//
// Not part of the extension (setup.py compiles csrc/cuda/*.cu and *.cpp only): tests/test_cuda_build.py
// compiles emulate_kernels.cpp with g++ against this header and runs the real kernel code of
// label_supcon.cuh, multihot_supcon.cuh, prototype_nce.cuh and segment_sum.cuh on small inputs, then compares the results
// with reference.py. Built with -fsanitize=thread it also checks the kernels' barrier protocol:
// every block runs as one std::thread per CUDA thread, __syncthreads() is a std::barrier, so a
// shared-memory access that no barrier orders against a conflicting one is a data race for TSan.
// With -fsanitize=address it checks every global access for bounds, like compute-sanitizer memcheck.
//
// What it models: threadIdx / blockIdx, __shared__ (one static instance, blocks run one at a time),
// __syncthreads, __syncwarp, __shfl_xor_sync, and nvcuda::wmma with each lane holding the whole
// fragment (exact fp32 products; TF32 rounding as cvt.rna.tf32.f32; 32-byte pointer alignment and
// ldm multiples asserted as the PTX ISA requires). What it does not: timing, memory coalescing,
// bank conflicts, register limits, and the real lane ownership of fragment elements (the kernels
// only touch fragment elements through the wmma API, or element-wise, where ownership is irrelevant).
#pragma once

// The CUDA headers first, with their own host definitions (cuda_fp16.h and cuda_bf16.h have host
// implementations of the conversions); the execution-space keywords are then redefined as nothing.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

struct Block {
  int threads = 0;
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> exchange;  // one slot per thread, for shuffles
};

inline Block& block() {
  static Block b;
  return b;
}

inline thread_local uint3 thread_index{0, 0, 0};
inline thread_local uint3 block_index{0, 0, 0};

inline void syncthreads() { block().all->arrive_and_wait(); }
inline void syncwarp() { block().warps[thread_index.x / 32]->arrive_and_wait(); }

template <typename T>
T shfl_xor(T v, int offset) {
  auto& b = block();
  const int lane = thread_index.x % 32, base = thread_index.x - lane;
  b.exchange[thread_index.x] = static_cast<double>(v);
  syncwarp();
  const double other = b.exchange[base + (lane ^ offset)];
  syncwarp();
  return static_cast<T>(other);
}

// Runs kernel(args) over the grid, one block at a time, one std::thread per CUDA thread.
template <typename Kernel, typename... Args>
void launch(dim3 grid, int threads, Kernel kernel, const Args&... args) {
  assert(threads % 32 == 0);
  auto& b = block();
  b.threads = threads;
  b.all = std::make_unique<std::barrier<>>(threads);
  b.warps.clear();
  for (int w = 0; w < threads / 32; ++w) b.warps.push_back(std::make_unique<std::barrier<>>(32));
  b.exchange.assign(threads, 0.0);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            thread_index = uint3{static_cast<unsigned>(t), 0, 0};
            block_index = uint3{x, y, z};
            kernel(args...);
          });
        }
        for (auto& th : pool) th.join();
      }
}

}  // namespace emu

#define threadIdx (::emu::thread_index)
#define blockIdx (::emu::block_index)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int offset) {
  return emu::shfl_xor(v, offset);
}
[[noreturn]] inline void __trap() { std::abort(); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }

using std::fma;
using std::max;

// ----------------------------------------------------------------------------------------------
// nvcuda::wmma, each lane holding the whole fragment
// ----------------------------------------------------------------------------------------------

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K>
struct dims;
template <int M, int N, int K>
struct dims<matrix_a, M, N, K> {
  static constexpr int R = M, C = K;
};
template <int M, int N, int K>
struct dims<matrix_b, M, N, K> {
  static constexpr int R = K, C = N;
};
template <int M, int N, int K>
struct dims<accumulator, M, N, K> {
  static constexpr int R = M, C = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int R = dims<Use, M, N, K>::R, C = dims<Use, M, N, K>::C;
  static constexpr int num_elements = R * C;
  float x[R * C];  // x[r * C + c], the logical matrix
};

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero.
inline float __float_to_tf32(float f) {
  if (!std::isfinite(f)) return f;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <typename E>
void check_operand(const E* p, unsigned ldm) {
  // PTX wmma.load/store: 256-bit aligned address, ldm a multiple of 16 bytes.
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0 || (ldm * sizeof(E)) % 16 != 0) {
    std::fprintf(stderr, "wmma operand misaligned: %p ldm %u (element %zu bytes)\n", static_cast<const void*>(p),
                 ldm, sizeof(E));
    std::abort();
  }
}

template <class Use, int M, int N, int K, class T, class L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}

template <int M, int N, int K, class T, typename E>
void load_matrix_sync(fragment<matrix_a, M, N, K, T, row_major>& f, const E* p, unsigned ldm) {
  check_operand(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < K; ++c) f.x[r * K + c] = as_float(p[r * ldm + c]);
}

template <int M, int N, int K, class T, typename E>
void load_matrix_sync(fragment<matrix_b, M, N, K, T, col_major>& f, const E* p, unsigned ldm) {
  check_operand(p, ldm);
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) f.x[k * N + n] = as_float(p[n * ldm + k]);
}

template <int M, int N, int K, class T, typename E>
void load_matrix_sync(fragment<matrix_b, M, N, K, T, row_major>& f, const E* p, unsigned ldm) {
  check_operand(p, ldm);
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) f.x[k * N + n] = as_float(p[k * ldm + n]);
}

template <int M, int N, int K, class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = c.x[m * N + n];
      for (int k = 0; k < K; ++k) acc += a.x[m * K + k] * b.x[k * N + n];
      out[m * N + n] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_operand(p, ldm);
  assert(layout == mem_row_major);
  (void)layout;
  // Every lane holds the whole tile; lane 0 writes it (the hardware spreads it over the lanes).
  if (threadIdx.x % 32 != 0) return;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) p[m * ldm + n] = f.x[m * N + n];
}

}  // namespace wmma
}  // namespace nvcuda
