// Kernel template of the deterministic segmented sum (launcher: segment_sum_kernel.cu): the
// per-class feature sums of label_supcon and update_prototypes_, which ATen's index_add_ would
// compute with float atomics (run-to-run different bits).
//
// One block of 256 threads per (segment, 32 columns): 8 row groups x 32 columns; group g sums the
// rows order[offsets[s] + g], order[offsets[s] + g + 8], ... in that order, then group 0 adds the 8
// partial sums in a fixed order. Reads of a row are 32 consecutive values (coalesced).
#pragma once

#include "primitives.cuh"

namespace mlcontrast {
namespace cuda {
namespace segsum {

constexpr int kGroups = 8;
constexpr int kCols = kWarp;
constexpr int kBlock = kGroups * kCols;

template <typename T, typename Acc>
__global__ void __launch_bounds__(kBlock) segment_sum_kernel(const SegmentSumParams p) {
  __shared__ Acc partial[kGroups][kCols];
  const int64_t seg = blockIdx.x;
  const int lane = threadIdx.x % kCols, group = threadIdx.x / kCols;
  const int64_t k = int64_t(blockIdx.y) * kCols + lane;
  const T* x = static_cast<const T*>(p.x);
  const Acc* weight = static_cast<const Acc*>(p.weight);
  const int64_t begin = p.offsets[seg], end = p.offsets[seg + 1];
  Acc acc = Acc(0);
  if (k < p.d) {
    for (int64_t t = begin + group; t < end; t += kGroups) {
      const int64_t row = p.order[t];
      const Acc v = to_acc<Acc>(x[row * p.ld_x + k]);
      acc += weight != nullptr ? weight[row] * v : v;
    }
  }
  partial[group][lane] = acc;
  __syncthreads();
  if (group == 0 && k < p.d) {
    Acc total = partial[0][lane];
#pragma unroll
    for (int g = 1; g < kGroups; ++g) total += partial[g][lane];
    static_cast<Acc*>(p.out)[seg * p.d + k] = total;
  }
}

// The grid of the kernel, for the launcher and the CPU emulation alike.
inline dim3 grid(const SegmentSumParams& p) {
  return dim3(static_cast<unsigned int>(p.segments), blocks_for(p.d, kCols));
}

}  // namespace segsum
}  // namespace cuda
}  // namespace mlcontrast
