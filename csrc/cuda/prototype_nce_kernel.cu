// Launchers of the prototype_nce kernels (prototype_nce.cuh), instantiated for fp32, fp16 and bf16
// features (fp32 accumulation) and fp64 features (fp64 accumulation).
#include "launch.h"
#include "prototype_nce.cuh"

namespace mlcontrast {
namespace cuda {
namespace {

template <typename T>
void launch_forward(const PrototypeNceFwdParams& p, cudaStream_t stream) {
  nce::logits_kernel<T, acc_t<T>><<<nce::rows_grid(p.rows), dim3(kThreads), 0, stream>>>(p);
}

template <typename T>
void launch_backward(const PrototypeNceBwdParams& p, cudaStream_t stream) {
  // The prototype pass reads the norms written by the row pass (same stream, in order).
  if (p.rows > 0) {
    nce::grad_rows_kernel<T, acc_t<T>><<<nce::rows_grid(p.rows), dim3(kThreads), 0, stream>>>(p);
  }
  nce::grad_prototypes_kernel<T, acc_t<T>><<<nce::prototypes_grid(p), dim3(kThreads), 0, stream>>>(p);
  if (p.split.splits > 1) {
    nce::sum_partials_kernel<acc_t<T>><<<nce::partials_grid(p), dim3(kThreads), 0, stream>>>(p);
  }
}

}  // namespace

void run_prototype_nce_fwd(const PrototypeNceFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.c == 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      launch_forward<float>(p, stream);
      break;
    case DType::kFloat16:
      launch_forward<__half>(p, stream);
      break;
    case DType::kBFloat16:
      launch_forward<__nv_bfloat16>(p, stream);
      break;
    case DType::kFloat64:
      launch_forward<double>(p, stream);
      break;
  }
}

PrototypeNceSplit prototype_nce_bwd_split(int64_t b, int64_t c, int64_t d, DType dtype) {
  return nce::split_for(b, c, d, dtype);
}

void run_prototype_nce_bwd(const PrototypeNceBwdParams& p, cudaStream_t stream) {
  if (p.c == 0 || p.d == 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      launch_backward<float>(p, stream);
      break;
    case DType::kFloat16:
      launch_backward<__half>(p, stream);
      break;
    case DType::kBFloat16:
      launch_backward<__nv_bfloat16>(p, stream);
      break;
    case DType::kFloat64:
      launch_backward<double>(p, stream);
      break;
  }
}

}  // namespace cuda
}  // namespace mlcontrast
