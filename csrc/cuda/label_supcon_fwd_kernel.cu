// Launcher of the label_supcon forward kernel (row LSE over the valid rows), with its explicit
// instantiations: fp16 and bf16 on tensor cores (SIMT where the binary predates sm_80), fp32 on
// TF32 tensor cores when torch allows TF32 matmuls and SIMT otherwise, fp64 SIMT.
#include "label_supcon.cuh"
#include "launch.h"

namespace mlcontrast {
namespace cuda {
namespace {

template <class Cfg>
void launch_lse(const LabelSupconFwdParams& p, cudaStream_t stream) {
  supcon::lse_kernel<Cfg><<<supcon::lse_grid<Cfg>(p), dim3(kThreads), 0, stream>>>(p);
}

template <typename T>
void launch_lse_tensor_cores(const LabelSupconFwdParams& p, cudaStream_t stream) {
  using Tc = supcon::KernelConfig<T, true>;
  if (compiled_for_sm80(supcon::lse_kernel<Tc>)) {
    launch_lse<Tc>(p, stream);
  } else {
    launch_lse<supcon::KernelConfig<T, false>>(p, stream);
  }
}

}  // namespace

void run_label_supcon_fwd(const LabelSupconFwdParams& p, cudaStream_t stream) {
  if (p.row_end <= p.row_begin) return;  // no anchors
  switch (p.dtype) {
    case DType::kFloat16:
      launch_lse_tensor_cores<__half>(p, stream);
      break;
    case DType::kBFloat16:
      launch_lse_tensor_cores<__nv_bfloat16>(p, stream);
      break;
    case DType::kFloat32:
      if (p.allow_tf32) {
        launch_lse_tensor_cores<float>(p, stream);
      } else {
        launch_lse<supcon::KernelConfig<float, false>>(p, stream);
      }
      break;
    case DType::kFloat64:
      launch_lse<supcon::KernelConfig<double, false>>(p, stream);
      break;
  }
}

}  // namespace cuda
}  // namespace mlcontrast
