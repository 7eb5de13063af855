// Helpers shared by the CPU kernels: input checks and the compute dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace mlcontrast {
namespace cpu {

// fp16 and bf16 inputs are computed in fp32; fp64 stays fp64 (gradcheck).
inline at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Detached so that ATen calls on worker threads, where the dispatch guard of the calling thread
// does not reach, never see a tensor that requires grad.
inline at::Tensor to_compute(const at::Tensor& t, at::ScalarType dtype) {
  return t.detach().to(dtype).contiguous();
}

inline at::Tensor to_compute(const at::Tensor& t) { return to_compute(t, compute_dtype(t)); }

// The compute dtype of an op on two floating inputs, which may differ (e.g. fp64 features with
// fp32 prototypes): fp64 if either is.
inline at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return compute_dtype(a) == at::kDouble ? at::kDouble : compute_dtype(b);
}

// Kernels compute with ATen ops on tensors derived from their inputs; autograd is handled by the
// op's own registration, so these inner ops must not record (or refuse) gradients.
#define MLC_KERNEL_GUARD() at::AutoDispatchBelowADInplaceOrView mlc_below_autograd_guard

#define MLC_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define MLC_CHECK_FLOAT(x) TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be floating point")
#define MLC_CHECK_INDEX(x) TORCH_CHECK((x).scalar_type() == at::kLong, #x " must be int64")
#define MLC_CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must have " #d " dimensions, got ", (x).dim())

// Rows whose label is >= 0, as an index tensor, or an undefined tensor when every row is valid
// (the common case, which then needs no gather or scatter).
inline at::Tensor valid_rows(const at::Tensor& labels) {
  auto valid = labels.ge(0);
  if (valid.all().item<bool>()) return at::Tensor();
  return valid.nonzero().squeeze(1);
}

// Per-row class statistics over the valid rows: dense class index of each row, number of
// rows of each class, and the per-class feature sums M_c (fp32/fp64).
struct ClassSums {
  at::Tensor inverse;  // [Nv] int64: dense class index of each row
  at::Tensor counts;   // [K] int64: rows per class
  at::Tensor sums;     // [K, D] compute dtype: sum of the rows of each class
};

inline ClassSums class_sums(const at::Tensor& z, const at::Tensor& labels) {
  auto uniq = at::_unique2(labels, /*sorted=*/false, /*return_inverse=*/true, /*return_counts=*/true);
  ClassSums out;
  out.inverse = std::get<1>(uniq).reshape({-1});
  out.counts = std::get<2>(uniq);
  out.sums = at::zeros({out.counts.size(0), z.size(1)}, z.options()).index_add_(0, out.inverse, z);
  return out;
}

}  // namespace cpu
}  // namespace mlcontrast

namespace mlcontrast {
namespace cpu {

// The eps of torch.nn.functional.normalize / cosine_similarity used by every cosine in the package.
constexpr double kNormEps = 1e-8;

// x / max(||x||, eps) along the last dimension, keeping what the backward needs.
struct UnitRows {
  at::Tensor unit;     // x / max(||x||, eps)
  at::Tensor clamped;  // max(||x||, eps), keepdim
  at::Tensor above;    // ||x|| > eps, keepdim: where the norm depends on x
};

inline UnitRows unit_rows(const at::Tensor& x) {
  auto norm = at::linalg_vector_norm(x, 2, {-1}, /*keepdim=*/true);
  UnitRows r;
  r.clamped = norm.clamp_min(kNormEps);
  r.above = norm.gt(kNormEps);
  r.unit = x / r.clamped;
  return r;
}

// Gradient of x / max(||x||, eps) given the gradient of the unit rows.
inline at::Tensor unit_rows_backward(const at::Tensor& grad_unit, const UnitRows& r) {
  auto radial = (r.unit * grad_unit).sum(-1, /*keepdim=*/true) * r.above;
  return (grad_unit - r.unit * radial) / r.clamped;
}

}  // namespace cpu
}  // namespace mlcontrast
