// Launcher of the deterministic segmented sum (segment_sum.cuh), instantiated for every input dtype
// (fp64 sums in fp64, the others in fp32).
#include "launch.h"
#include "segment_sum.cuh"

namespace mlcontrast {
namespace cuda {

void run_segment_sum(const SegmentSumParams& p, cudaStream_t stream) {
  if (p.segments == 0 || p.d == 0) return;
  const dim3 grid = segsum::grid(p);
  const dim3 block(segsum::kBlock);
  switch (p.x_dtype) {
    case DType::kFloat64:
      segsum::segment_sum_kernel<double, double><<<grid, block, 0, stream>>>(p);
      break;
    case DType::kFloat32:
      segsum::segment_sum_kernel<float, float><<<grid, block, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      segsum::segment_sum_kernel<__half, float><<<grid, block, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      segsum::segment_sum_kernel<__nv_bfloat16, float><<<grid, block, 0, stream>>>(p);
      break;
  }
}

}  // namespace cuda
}  // namespace mlcontrast
