// Launchers of the multihot_supcon kernels (multihot_supcon.cuh): the label-mask packing, and the
// forward and backward of the pair modes with label_supcon's choice of tile configuration per dtype
// (fp16 / bf16 on tensor cores, SIMT where the binary predates sm_80; fp32 on TF32 tensor cores when
// torch allows TF32 matmuls, SIMT otherwise; fp64 SIMT), so that the backward recomputes exactly the
// similarity tiles of the forward.
#include "launch.h"
#include "multihot_supcon.cuh"

namespace mlcontrast {
namespace cuda {
namespace {

struct Forward {
  using Params = MultihotSupconFwdParams;
  template <class Cfg>
  static bool tensor_cores_compiled() {
    return compiled_for_sm80(multihot::pairs_fwd_kernel<Cfg>);
  }
  template <class Cfg>
  static void launch(const Params& p, cudaStream_t stream) {
    multihot::pairs_fwd_kernel<Cfg><<<supcon::lse_grid<Cfg>(p.lse), dim3(kThreads), 0, stream>>>(p);
  }
};

struct Backward {
  using Params = MultihotSupconBwdParams;
  template <class Cfg>
  static bool tensor_cores_compiled() {
    return compiled_for_sm80(multihot::pairs_grad_kernel<Cfg>);
  }
  template <class Cfg>
  static void launch(const Params& p, cudaStream_t stream) {
    multihot::pairs_grad_kernel<Cfg><<<supcon::lse_grad_grid<Cfg>(p.softmax), dim3(kThreads), 0, stream>>>(p);
  }
};

template <class Kernel, typename T>
void launch_tensor_cores(const typename Kernel::Params& p, cudaStream_t stream) {
  using Tc = supcon::KernelConfig<T, true>;
  if (Kernel::template tensor_cores_compiled<Tc>()) {
    Kernel::template launch<Tc>(p, stream);
  } else {
    Kernel::template launch<supcon::KernelConfig<T, false>>(p, stream);
  }
}

template <class Kernel>
void launch_for_dtype(DType dtype, bool allow_tf32, const typename Kernel::Params& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      launch_tensor_cores<Kernel, __half>(p, stream);
      break;
    case DType::kBFloat16:
      launch_tensor_cores<Kernel, __nv_bfloat16>(p, stream);
      break;
    case DType::kFloat32:
      if (allow_tf32) {
        launch_tensor_cores<Kernel, float>(p, stream);
      } else {
        Kernel::template launch<supcon::KernelConfig<float, false>>(p, stream);
      }
      break;
    case DType::kFloat64:
      Kernel::template launch<supcon::KernelConfig<double, false>>(p, stream);
      break;
  }
}

}  // namespace

void run_pack_label_masks(const PackLabelMasksParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  multihot::pack_masks_kernel<<<multihot::pack_grid(p), dim3(kThreads), 0, stream>>>(p);
}

void run_multihot_supcon_fwd(const MultihotSupconFwdParams& p, cudaStream_t stream) {
  if (p.lse.row_end <= p.lse.row_begin) return;  // no anchors
  launch_for_dtype<Forward>(p.lse.dtype, p.lse.allow_tf32, p, stream);
}

void run_multihot_supcon_bwd(const MultihotSupconBwdParams& p, cudaStream_t stream) {
  if (p.softmax.n == 0 || p.softmax.d == 0) return;  // nothing to write
  launch_for_dtype<Backward>(p.softmax.dtype, p.softmax.allow_tf32, p, stream);
}

}  // namespace cuda
}  // namespace mlcontrast
