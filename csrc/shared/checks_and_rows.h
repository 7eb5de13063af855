// Host code of both backends that does not depend on the device: the compute dtype, input checks,
// selection of the valid rows, unit rows. The CPU kernels (cpu/class_sums.h) and the CUDA api files
// (cuda/api_checks.h) add their device checks on top, and shared/<op>.h holds the math of each op
// that both run with ATen, so that the two backends cannot drift apart.
//
// Everything here is in namespace mlcontrast, which encloses both mlcontrast::cpu and
// mlcontrast::cuda, so the backends use these names unqualified.
#pragma once

#include <ATen/ATen.h>

namespace mlcontrast {

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

#define MLC_CHECK_FLOAT(x) TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be floating point")
#define MLC_CHECK_INDEX(x) TORCH_CHECK((x).scalar_type() == at::kLong, #x " must be int64")
#define MLC_CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must have " #d " dimensions, got ", (x).dim())

// The per-row inputs of a backward (the incoming gradient and the two statistics saved by the
// forward, e.g. the row LSE and the positive counts) must cover the N rows of the features.
inline void check_row_inputs(const at::Tensor& grad_rows, const at::Tensor& lse, const at::Tensor& stat,
                             const char* stat_name, int64_t n) {
  TORCH_CHECK(grad_rows.numel() == n && lse.numel() == n && stat.numel() == n, "grad_rows, lse and ", stat_name,
              " must have N = ", n, " entries, got ", grad_rows.numel(), ", ", lse.numel(), " and ", stat.numel());
}

// Checked before anything is written or indexed: a label >= C would index past the C prototypes.
inline void check_labels_below(const at::Tensor& labels, int64_t c) {
  if (labels.numel() == 0) return;
  const int64_t top = labels.max().item<int64_t>();
  TORCH_CHECK(top < c, "labels must be < C = ", c, " (the number of prototypes), got ", top);
}

// Rows whose label is >= 0, as an index tensor, or an undefined tensor when every row is valid
// (the common case, which then needs no gather or scatter).
inline at::Tensor valid_rows(const at::Tensor& labels) {
  auto valid = labels.ge(0);
  if (valid.all().item<bool>()) return at::Tensor();
  return valid.nonzero().squeeze(1);
}

// The rows of t at `index` (from valid_rows), or all of them when it is undefined; contiguous.
inline at::Tensor gather_rows(const at::Tensor& t, const at::Tensor& index) {
  return index.defined() ? t.index_select(0, index) : t.contiguous();
}

// The inverse of gather_rows for an output of n rows: the rows not gathered are 0.
inline at::Tensor scatter_rows(const at::Tensor& values, const at::Tensor& index, int64_t n) {
  if (!index.defined()) return values;
  auto sizes = values.sizes().vec();
  sizes[0] = n;
  return at::zeros(sizes, values.options()).index_copy_(0, index, values);
}

// Per-class statistics of the valid rows. How the sums are accumulated is the backend's choice
// (the CUDA one avoids float atomics to stay deterministic).
struct ClassSums {
  at::Tensor inverse;  // [Nv] int64: dense class index of each row
  at::Tensor counts;   // [K] int64: rows per class
  at::Tensor sums;     // [K, D] compute dtype: sum of the rows of each class
};

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

}  // namespace mlcontrast
