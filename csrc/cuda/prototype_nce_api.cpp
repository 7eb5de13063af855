// prototype_nce (SADCL's PSCL) on CUDA tensors: device checks, the launches of the row kernels
// (prototype_nce.cuh) with their scratch (the partial sums of the split prototype gradient) and the
// registration for the CUDA dispatch key. The loss and the per-class log-sum-exps on the [B, C] logits
// are shared/prototype_nce.h, run by the CPU backend too.
#include <torch/library.h>

#include "cuda/api_checks.h"
#include "shared/prototype_nce.h"

namespace mlcontrast {
namespace cuda {
namespace {

void check_inputs(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& targets) {
  MLC_CHECK_CUDA(features);
  MLC_CHECK_CUDA(prototypes);
  MLC_CHECK_CUDA(targets);
  MLC_CHECK_SAME_DEVICE(features, prototypes);
  MLC_CHECK_SAME_DEVICE(features, targets);
  prototype_nce::check_inputs(features, prototypes, targets);
  dtype_of(features.scalar_type());
  dtype_of(prototypes.scalar_type());
}

// The features as the kernels read them: contiguous, in their own dtype unless the computation is
// fp64 (fp64 prototypes with fp32 features), then in fp64.
at::Tensor kernel_features(const at::Tensor& features, at::ScalarType dtype) {
  auto z = features.detach();
  if (dtype == at::kDouble) z = z.to(at::kDouble);
  return z.contiguous();
}

// [B, C] logits z_bc . unit_p_c / max(|z_bc|, eps) / t and norms max(|z_bc|, eps), in the compute dtype.
std::tuple<at::Tensor, at::Tensor> logits_of(const at::Tensor& z, const at::Tensor& unit_p, at::ScalarType dtype,
                                             double inv_t) {
  const int64_t b = z.size(0), c = z.size(1), d = z.size(2);
  auto logits = at::empty({b, c}, z.options().dtype(dtype));
  auto norm = at::empty({b, c}, z.options().dtype(dtype));
  PrototypeNceFwdParams p;
  p.z = z.data_ptr();
  p.unit_p = unit_p.data_ptr();
  p.logits = logits.data_ptr();
  p.norm = norm.data_ptr();
  p.rows = b * c;
  p.c = c;
  p.d = d;
  p.inv_temperature = inv_t;
  p.eps = kNormEps;
  p.dtype = dtype_of(z.scalar_type());
  run_prototype_nce_fwd(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logits, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prototype_nce_cuda(const at::Tensor& features,
                                                                              const at::Tensor& prototypes,
                                                                              const at::Tensor& targets,
                                                                              double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, prototypes, targets);
  const c10::cuda::CUDAGuard device_guard(features.device());
  const auto dtype = compute_dtype(features, prototypes);
  const auto z = kernel_features(features, dtype);
  const auto unit_p = unit_rows(to_compute(prototypes, dtype)).unit.contiguous();
  auto [logits, norm] = logits_of(z, unit_p, dtype, 1.0 / temperature);
  auto [loss, stats] = prototype_nce::loss_and_stats(logits, targets);
  return {loss, stats, logits, norm};
}

// The backward takes the forward's logits (no second logits pass); its row kernel re-reads each row,
// which it needs for the gradient anyway, and recomputes the norms on the way into its scratch.
std::tuple<at::Tensor, at::Tensor> prototype_nce_backward_cuda(const at::Tensor& grad, const at::Tensor& features,
                                                               const at::Tensor& prototypes, const at::Tensor& targets,
                                                               const at::Tensor& stats, const at::Tensor& logits,
                                                               const at::Tensor& norm, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, prototypes, targets);
  MLC_CHECK_CUDA(grad);
  MLC_CHECK_CUDA(stats);
  MLC_CHECK_CUDA(logits);
  MLC_CHECK_CUDA(norm);
  MLC_CHECK_SAME_DEVICE(features, grad);
  MLC_CHECK_SAME_DEVICE(features, stats);
  MLC_CHECK_SAME_DEVICE(features, logits);
  MLC_CHECK_SAME_DEVICE(features, norm);
  const int64_t b = features.size(0), c = features.size(1), d = features.size(2);
  prototype_nce::check_saved(stats, logits, norm, b, c);
  const c10::cuda::CUDAGuard device_guard(features.device());
  const auto dtype = compute_dtype(features, prototypes);
  const double inv_t = 1.0 / temperature;
  const auto z = kernel_features(features, dtype);
  const auto pu = unit_rows(to_compute(prototypes, dtype));
  const auto unit_p = pu.unit.contiguous();
  const auto dlogits = prototype_nce::dlogits(grad, to_compute(logits, dtype), targets, stats);
  auto grad_z = at::empty_like(z);
  auto grad_unit_p = at::empty({c, d}, z.options().dtype(dtype));  // every entry written (c, d > 0)
  auto norm_scratch = at::empty({b * c}, z.options().dtype(dtype));
  const auto split = prototype_nce_bwd_split(b, c, d, dtype_of(z.scalar_type()));
  // Scratch for the per-run partial sums of the prototype gradient (none with one run).
  auto partials = at::empty({split.splits > 1 ? split.splits : 0, c, d}, z.options().dtype(dtype));
  PrototypeNceBwdParams p;
  p.z = z.data_ptr();
  p.unit_p = unit_p.data_ptr();
  p.dlogits = dlogits.data_ptr();
  p.norm = norm_scratch.data_ptr();
  p.grad_z = grad_z.data_ptr();
  p.grad_unit_p = grad_unit_p.data_ptr();
  p.partials = split.splits > 1 ? partials.data_ptr() : nullptr;
  p.split = split;
  p.rows = b * c;
  p.c = c;
  p.d = d;
  p.inv_temperature = inv_t;
  p.eps = kNormEps;
  p.dtype = dtype_of(z.scalar_type());
  run_prototype_nce_bwd(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto grad_p = unit_rows_backward(grad_unit_p, pu);
  return {grad_z.to(features.scalar_type()), grad_p.to(prototypes.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CUDA, m) {
  m.impl("prototype_nce", &prototype_nce_cuda);
  m.impl("prototype_nce_backward", &prototype_nce_backward_cuda);
}

}  // namespace cuda
}  // namespace mlcontrast
