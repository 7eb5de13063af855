// label_supcon on CUDA tensors: device checks, the launches of the flash-style kernels
// (label_supcon.cuh) for the self-excluded row LSE and its gradient, which stream the N x N tiles
// without storing them, and the registration for the CUDA dispatch key. The O(N D) rest is
// shared/label_supcon.h, run by the CPU backend too. The per-class sums use the deterministic
// segmented-sum kernel, so two runs give the same bits.
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cuda/class_sums.h"
#include "cuda/tf32.h"
#include "shared/label_supcon.h"

namespace mlcontrast {
namespace cuda {
namespace {

using label_supcon::RoleArgs;
using label_supcon::Roles;

void check_arguments(const at::Tensor& features, const at::Tensor& labels, const RoleArgs& roles) {
  MLC_CHECK_CUDA(features);
  MLC_CHECK_CUDA(labels);
  MLC_CHECK_SAME_DEVICE(features, labels);
  label_supcon::check_inputs(features, labels, roles);
  dtype_of(features.scalar_type());
}

// The valid rows in the features' own dtype: the kernels, the class sums and the O(N D) ATen steps
// (mixed-dtype ops, fp32 results) all read them as they are, so 16-bit features get no fp32 copy.
struct ValidSet {
  at::Tensor index;   // undefined when every row is valid
  at::Tensor z;       // [Nv, D] in the features' dtype, contiguous
  at::Tensor labels;  // [Nv]
};

ValidSet gather_valid(const at::Tensor& features, const at::Tensor& labels) {
  ValidSet v;
  v.index = valid_rows(labels);
  v.z = gather_rows(features.detach(), v.index);
  v.labels = gather_rows(labels, v.index);
  return v;
}

// The class sums M_c and counts of the contrast rows [contrast_begin, Nv) as shared/label_supcon.h takes
// them, with the classes of all valid rows; the caller keeps `stats`, whose sorted order the backward's
// weighted sums reuse.
ClassSums class_sums_of(const ValidSet& v, const ClassStats& stats, int64_t contrast_begin) {
  if (contrast_begin == 0) return {stats.inverse, stats.counts, class_sums(v.z, stats)};
  // The same deterministic segmented sum, each row weighted 1 from contrast_begin on and 0 before.
  const auto position = at::arange(v.z.size(0), stats.inverse.options());
  const auto in_contrast = position.ge(contrast_begin).to(compute_dtype(v.z));
  return {stats.inverse, label_supcon::contrast_counts(stats.inverse, stats.counts.size(0), contrast_begin),
          class_sums(v.z, stats, in_contrast)};
}

// A row whose sum of exp(s_ij - c) falls below 2^-60 may have lost terms to underflow (each below
// 2^-126 flushes; N of them stay under fp32's rounding of the sum for N < 2^40): its LSE is redone
// with the online max. With unit rows this happens only for temperatures below 2 / (60 ln 2) = 0.048.
constexpr double kLogShiftedSumFloor = -60.0 * 0.69314718055994531;

// c = max_i |z_i|^2 / t >= s_ij for every pair (Cauchy-Schwarz), as a one-element device tensor.
at::Tensor logit_bound(const at::Tensor& native, at::ScalarType dtype, double inv_t) {
  const auto largest = at::linalg_vector_norm(native, 2, at::IntArrayRef{1}, false, dtype).max();
  return (largest * largest * inv_t).reshape({1});
}

// LSE_{j != i, j >= contrast_begin} z_i.z_j / t over the rows of `native` for the anchors (0 on the other
// rows), in the compute dtype.
at::Tensor row_lse(const at::Tensor& native, at::ScalarType dtype, double inv_t, const Roles& a) {
  auto lse = at::zeros({native.size(0)}, native.options().dtype(dtype));
  LabelSupconFwdParams p;
  p.z = native.data_ptr();
  p.lse = lse.data_ptr();
  p.n = native.size(0);
  p.row_begin = a.begin;
  p.row_end = a.end;
  p.col_begin = a.contrast_begin;
  p.d = native.size(1);
  p.ld_z = native.size(1);
  p.inv_temperature = inv_t;
  p.dtype = dtype_of(native.scalar_type());
  p.allow_tf32 = mlcontrast::tf32_allowed();
  const auto bound = logit_bound(native, dtype, inv_t);
  p.shift = bound.data_ptr();
  run_label_supcon_fwd(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // lse_i - c = log of row i's shifted sum (a host sync, as the valid rows already made one).
  const auto anchors = lse.narrow(0, a.begin, a.end - a.begin);
  if (anchors.numel() > 0 && (anchors - bound).lt(kLogShiftedSumFloor).any().item<bool>()) {
    p.shift = nullptr;
    run_label_supcon_fwd(p, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return lse;
}

// dZ = G Z with G_ij = w_i exp(s_ij - lse_i) + w_j exp(s_ij - lse_j) (i != j; each term within the roles,
// see LabelSupconBwdParams), in the compute dtype.
// Rows with w_i = 0 must have lse_i = +inf, and rows outside the anchors w_i = 0. Unless a row with a
// weight lies far below the logit bound c (the forward redid it), G takes one exp per pair:
// exp(s_ij - c) (alpha_i + alpha_j) with alpha = w exp(c - lse) <= w 2^60.
at::Tensor lse_grad(const at::Tensor& native, const at::Tensor& w, const at::Tensor& lse, double inv_t,
                    const Roles& a) {
  const int64_t n = native.size(0), d = native.size(1);
  auto dz = at::empty({n, d}, w.options());
  if (d == 0) return dz;
  at::Tensor g_scale;
  if (native.scalar_type() == at::kHalf) {
    // |G_ij| <= 2 max|w| and a typical entry is ~ max|w| / N, which for large N sits in fp16's
    // subnormals (bf16 has fp32's exponent range: no scaling). Scaled by min(N, 2^14) / max|w|,
    // typical entries are ~1 and none exceeds 2^15 (fp16 max 65504). The factor stays on the device
    // (no host sync); the kernel divides the fp32 result by it.
    const double target = static_cast<double>(std::min<int64_t>(n, int64_t(1) << 14));
    g_scale = (target / w.abs().max().clamp_min(1e-30)).to(at::kFloat);
  }
  LabelSupconBwdParams p;
  p.z = native.data_ptr();
  p.w = w.data_ptr();
  p.lse = lse.data_ptr();
  p.g_scale = g_scale.defined() ? g_scale.data_ptr<float>() : nullptr;
  const auto dtype = w.scalar_type();
  const auto bound = logit_bound(native, dtype, inv_t);
  const auto below_bound = bound - lse;  // -inf where w = 0 (lse = +inf)
  at::Tensor alpha;
  if (!(below_bound.gt(-kLogShiftedSumFloor) & w.ne(0)).any().item<bool>()) {
    alpha = at::where(w.ne(0), w * below_bound.exp(), at::zeros({}, w.options()));
    p.shift = bound.data_ptr();
    p.alpha = alpha.data_ptr();
  }
  p.dz = dz.data_ptr();
  p.n = n;
  p.anchor_begin = a.begin;
  p.anchor_end = a.end;
  p.col_begin = a.contrast_begin;
  p.grad_end = a.grad_end;
  p.d = d;
  p.ld_z = d;
  p.ld_dz = d;
  p.inv_temperature = inv_t;
  p.dtype = dtype_of(native.scalar_type());
  p.allow_tf32 = mlcontrast::tf32_allowed();
  run_label_supcon_bwd(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_supcon_cuda(const at::Tensor& features,
                                                                 const at::Tensor& labels, double temperature,
                                                                 double base_temperature, int64_t anchor_start,
                                                                 std::optional<int64_t> anchor_stop,
                                                                 int64_t contrast_start,
                                                                 std::optional<int64_t> grad_stop) {
  MLC_KERNEL_GUARD();
  const RoleArgs args{anchor_start, anchor_stop, contrast_start, grad_stop};
  check_arguments(features, labels, args);
  const c10::cuda::CUDAGuard device_guard(features.device());
  const auto v = gather_valid(features, labels);
  if (v.z.size(0) == 0) return label_supcon::outputs_without_valid_rows(features);
  const auto r = label_supcon::valid_roles(labels, v.index, v.z.size(0), args);
  const auto lse = row_lse(v.z, compute_dtype(features), 1.0 / temperature, r);
  return label_supcon::outputs(lse, v.z, class_sums_of(v, class_stats(v.labels), r.contrast_begin), r, v.index,
                               features.size(0), temperature, base_temperature);
}

at::Tensor label_supcon_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& features,
                                      const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& n_pos,
                                      double temperature, double base_temperature, int64_t anchor_start,
                                      std::optional<int64_t> anchor_stop, int64_t contrast_start,
                                      std::optional<int64_t> grad_stop) {
  MLC_KERNEL_GUARD();
  const RoleArgs args{anchor_start, anchor_stop, contrast_start, grad_stop};
  check_arguments(features, labels, args);
  MLC_CHECK_CUDA(grad_rows);
  MLC_CHECK_CUDA(lse);
  MLC_CHECK_CUDA(n_pos);
  MLC_CHECK_SAME_DEVICE(features, grad_rows);
  MLC_CHECK_SAME_DEVICE(features, lse);
  MLC_CHECK_SAME_DEVICE(features, n_pos);
  check_row_inputs(grad_rows, lse, n_pos, "n_pos", features.size(0));
  const c10::cuda::CUDAGuard device_guard(features.device());
  const auto dtype = compute_dtype(features);
  const auto v = gather_valid(features, labels);
  if (v.z.size(0) == 0) return at::zeros_like(features);
  const auto r = label_supcon::valid_roles(labels, v.index, v.z.size(0), args);

  const auto g = label_supcon::anchor_grads(grad_rows, v.index, r, dtype);
  const auto stats = class_stats(v.labels);
  const auto sums = class_sums_of(v, stats, r.contrast_begin);
  const auto weights =
      label_supcon::backward_weights(g, label_supcon::valid_values(lse, v.index, dtype),
                                     label_supcon::valid_values(n_pos, v.index, dtype), temperature, base_temperature);
  auto dz = lse_grad(v.z, weights.w, weights.lse, 1.0 / temperature, r);
  label_supcon::subtract_positive_term_(dz, v.z, weights.a, sums, class_sums(v.z, stats, weights.a), r);
  return scatter_rows(dz, v.index, features.size(0)).to(features.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CUDA, m) {
  m.impl("label_supcon", &label_supcon_cuda);
  m.impl("label_supcon_backward", &label_supcon_backward_cuda);
}

}  // namespace cuda
}  // namespace mlcontrast
