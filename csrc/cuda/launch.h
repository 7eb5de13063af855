// Host entry points of the CUDA kernels: each launches its kernel(s) on `stream` and returns at once.
//
// Defined in the csrc/cuda/*_kernel.cu files; called by the api files, which check the launch with
// C10_CUDA_KERNEL_LAUNCH_CHECK() right after. No torch types cross this boundary.
#pragma once

#include <cuda_runtime_api.h>

#include "params.h"

namespace mlcontrast {
namespace cuda {

void run_label_supcon_fwd(const LabelSupconFwdParams& params, cudaStream_t stream);
void run_label_supcon_bwd(const LabelSupconBwdParams& params, cudaStream_t stream);
void run_prototype_nce_fwd(const PrototypeNceFwdParams& params, cudaStream_t stream);
void run_prototype_nce_bwd(const PrototypeNceBwdParams& params, cudaStream_t stream);
// The split of the prototype gradient's sum over the b samples that run_prototype_nce_bwd expects
// in its params (the caller sizes `partials` by it). A pure function of the sizes and the dtype.
PrototypeNceSplit prototype_nce_bwd_split(int64_t b, int64_t c, int64_t d, DType dtype);
void run_segment_sum(const SegmentSumParams& params, cudaStream_t stream);
void run_pack_label_masks(const PackLabelMasksParams& params, cudaStream_t stream);
void run_multihot_supcon_fwd(const MultihotSupconFwdParams& params, cudaStream_t stream);
void run_multihot_supcon_bwd(const MultihotSupconBwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace mlcontrast
