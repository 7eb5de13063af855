// Launcher of the deterministic segmented sum (segment_sum.cuh), instantiated for fp32 and fp64.
#include "launch.h"
#include "segment_sum.cuh"

namespace mlcontrast {
namespace cuda {

void run_segment_sum(const SegmentSumParams& p, cudaStream_t stream) {
  if (p.segments == 0 || p.d == 0) return;
  const dim3 grid(static_cast<unsigned int>(p.segments), blocks_for(p.d, segsum::kCols));
  const dim3 block(segsum::kBlock);
  if (p.dtype == DType::kFloat64) {
    segsum::segment_sum_kernel<double><<<grid, block, 0, stream>>>(p);
  } else {
    segsum::segment_sum_kernel<float><<<grid, block, 0, stream>>>(p);
  }
}

}  // namespace cuda
}  // namespace mlcontrast
