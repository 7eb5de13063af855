// prototype_nce (SADCL's PSCL) on CUDA tensors: input checks, the per-class log-sum-exps with ATen
// on the [B, C] logits (O(N), no D), the launches of the row kernels (prototype_nce.cuh) and the
// registration for the CUDA dispatch key. Same math as csrc/cpu/prototype_nce.cpp:
//   s_bc = cos(z_bc, p_c) / t,  L = -(1 / sum_c |P_c|) sum_c (LSE_{P_c} s - LSE_{K_c} s),
// an LSE over an empty set being 0, L = 0 without positives.
#include <torch/library.h>

#include <limits>

#include "cuda/api_common.h"

namespace mlcontrast {
namespace cuda {
namespace {

void check_inputs(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& targets) {
  MLC_CHECK_CUDA(features);
  MLC_CHECK_CUDA(prototypes);
  MLC_CHECK_CUDA(targets);
  MLC_CHECK_SAME_DEVICE(features, prototypes);
  MLC_CHECK_SAME_DEVICE(features, targets);
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_FLOAT(prototypes);
  MLC_CHECK_INDEX(targets);
  MLC_CHECK_DIM(features, 3);
  MLC_CHECK_DIM(prototypes, 2);
  MLC_CHECK_DIM(targets, 2);
  const int64_t b = features.size(0), c = features.size(1), d = features.size(2);
  TORCH_CHECK(prototypes.size(0) == c && prototypes.size(1) == d, "prototypes must be [", c, ", ", d, "], got ",
              prototypes.sizes());
  TORCH_CHECK(targets.size(0) == b && targets.size(1) == c, "targets must be [", b, ", ", c, "], got ",
              targets.sizes());
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

// [B, C] logits z_bc . unit_p_c / max(|z_bc|, eps) / t in the compute dtype.
at::Tensor logits_of(const at::Tensor& z, const at::Tensor& unit_p, at::ScalarType dtype, double inv_t) {
  const int64_t b = z.size(0), c = z.size(1), d = z.size(2);
  auto logits = at::empty({b, c}, z.options().dtype(dtype));
  PrototypeNceFwdParams p;
  p.z = z.data_ptr();
  p.unit_p = unit_p.data_ptr();
  p.logits = logits.data_ptr();
  p.rows = b * c;
  p.c = c;
  p.d = d;
  p.inv_temperature = inv_t;
  p.eps = kNormEps;
  p.dtype = dtype_of(z.scalar_type());
  run_prototype_nce_fwd(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return logits;
}

// Column-wise LSE over the rows where `mask` holds, 0 for a column without such rows.
at::Tensor masked_column_lse(const at::Tensor& logits, const at::Tensor& mask) {
  auto lse = logits.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity()).logsumexp(0);
  return at::where(mask.any(0), lse, at::zeros_like(lse));
}

std::tuple<at::Tensor, at::Tensor> prototype_nce_cuda(const at::Tensor& features, const at::Tensor& prototypes,
                                                      const at::Tensor& targets, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, prototypes, targets);
  const c10::cuda::CUDAGuard device_guard(features.device());
  const auto dtype = compute_dtype(features, prototypes);
  const auto z = kernel_features(features, dtype);
  const auto unit_p = unit_rows(to_compute(prototypes, dtype)).unit.contiguous();
  const auto logits = logits_of(z, unit_p, dtype, 1.0 / temperature);
  const auto positive = targets.eq(1), known = targets.ge(0);
  auto stats = at::stack({masked_column_lse(logits, positive), masked_column_lse(logits, known)});
  const auto n_pos = positive.sum().to(dtype);
  auto loss = at::where(n_pos.gt(0), (stats[1] - stats[0]).sum() / n_pos.clamp_min(1), at::zeros_like(n_pos));
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> prototype_nce_backward_cuda(const at::Tensor& grad, const at::Tensor& features,
                                                               const at::Tensor& prototypes, const at::Tensor& targets,
                                                               const at::Tensor& stats, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, prototypes, targets);
  MLC_CHECK_CUDA(grad);
  MLC_CHECK_CUDA(stats);
  MLC_CHECK_SAME_DEVICE(features, grad);
  MLC_CHECK_SAME_DEVICE(features, stats);
  const c10::cuda::CUDAGuard device_guard(features.device());
  const auto dtype = compute_dtype(features, prototypes);
  const int64_t b = features.size(0), c = features.size(1), d = features.size(2);
  const double inv_t = 1.0 / temperature;
  const auto z = kernel_features(features, dtype);
  const auto pu = unit_rows(to_compute(prototypes, dtype));
  const auto unit_p = pu.unit.contiguous();
  const auto logits = logits_of(z, unit_p, dtype, inv_t);
  const auto positive = targets.eq(1), known = targets.ge(0);
  const auto st = stats.detach().to(dtype);
  const auto n_pos = positive.sum().to(dtype);
  const auto coef =
      at::where(n_pos.gt(0), -grad.detach().to(dtype) / n_pos.clamp_min(1), at::zeros_like(n_pos));
  const auto zero = at::zeros_like(logits);
  // d L / d s_bc = coef * (softmax over P_c - softmax over K_c)
  const auto dlogits = (coef * (at::where(positive, (logits - st[0]).exp(), zero) -
                                at::where(known, (logits - st[1]).exp(), zero)))
                           .contiguous();

  auto grad_z = at::empty_like(z);
  auto grad_unit_p = at::zeros({c, d}, z.options().dtype(dtype));
  auto norm = at::empty({b * c}, z.options().dtype(dtype));
  PrototypeNceBwdParams p;
  p.z = z.data_ptr();
  p.unit_p = unit_p.data_ptr();
  p.dlogits = dlogits.data_ptr();
  p.norm = norm.data_ptr();
  p.grad_z = grad_z.data_ptr();
  p.grad_unit_p = grad_unit_p.data_ptr();
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
