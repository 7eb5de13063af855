// Launcher of the label_supcon backward kernel (gradient of the LSE part), with its explicit
// instantiations: the same dtype / tensor-core choices as the forward (label_supcon_fwd_kernel.cu),
// so that the backward recomputes exactly the similarity tiles the forward saw.
#include "label_supcon.cuh"
#include "launch.h"

namespace mlcontrast {
namespace cuda {
namespace {

template <class Cfg>
void launch_grad(const LabelSupconBwdParams& p, cudaStream_t stream) {
  supcon::lse_grad_kernel<Cfg><<<supcon::lse_grad_grid<Cfg>(p), dim3(kThreads), 0, stream>>>(p);
}

template <typename T>
void launch_grad_tensor_cores(const LabelSupconBwdParams& p, cudaStream_t stream) {
  using Tc = supcon::KernelConfig<T, true>;
  if (compiled_for_sm80(supcon::lse_grad_kernel<Tc>)) {
    launch_grad<Tc>(p, stream);
  } else {
    launch_grad<supcon::KernelConfig<T, false>>(p, stream);
  }
}

}  // namespace

void run_label_supcon_bwd(const LabelSupconBwdParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.d == 0) return;  // nothing to write
  switch (p.dtype) {
    case DType::kFloat16:
      launch_grad_tensor_cores<__half>(p, stream);
      break;
    case DType::kBFloat16:
      launch_grad_tensor_cores<__nv_bfloat16>(p, stream);
      break;
    case DType::kFloat32:
      if (p.allow_tf32) {
        launch_grad_tensor_cores<float>(p, stream);
      } else {
        launch_grad<supcon::KernelConfig<float, false>>(p, stream);
      }
      break;
    case DType::kFloat64:
      launch_grad<supcon::KernelConfig<double, false>>(p, stream);
      break;
  }
}

}  // namespace cuda
}  // namespace mlcontrast
