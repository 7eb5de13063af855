// label_supcon on CUDA tensors: device checks, the launches of the flash-style kernels
// (label_supcon.cuh) for the self-excluded row LSE and its gradient, which stream the N x N tiles
// without storing them, and the registration for the CUDA dispatch key. The O(N D) rest is
// shared/label_supcon.h, run by the CPU backend too. The per-class sums use the deterministic
// segmented-sum kernel, so two runs give the same bits.
#include <torch/library.h>

#include <optional>

#include "cuda/class_sums.h"
#include "cuda/supcon_shift.h"
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

// LSE_{j != i, j >= contrast_begin} z_i.z_j / t over the rows of `native` for the anchors (0 on the other
// rows), in the compute dtype: the fixed-shift pass of supcon_shift.h, redone with the online max for
// rows whose shifted sum underflowed.
at::Tensor row_lse(const at::Tensor& native, at::ScalarType dtype, double inv_t, const Roles& a) {
  auto lse = at::zeros({native.size(0)}, native.options().dtype(dtype));
  const auto bound = logit_bound(native, dtype, inv_t);
  auto p = lse_params(native, lse, bound, inv_t, a.begin, a.end);
  p.col_begin = a.contrast_begin;
  run_label_supcon_fwd(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  redo_underflowed_rows(p, lse, bound);
  return lse;
}

// dZ = G Z with G_ij = w_i exp(s_ij - lse_i) + w_j exp(s_ij - lse_j) (i != j; each term within the roles,
// see LabelSupconBwdParams), in the compute dtype; the parameters (one exp per pair, fp16 G scaling) are
// supcon_shift.h's softmax_grad.
at::Tensor lse_grad(const at::Tensor& native, const at::Tensor& w, const at::Tensor& lse, double inv_t,
                    const Roles& a) {
  auto dz = at::empty({native.size(0), native.size(1)}, w.options());
  if (native.size(1) == 0) return dz;
  auto grad = softmax_grad(native, w, lse, dz, inv_t, a.begin, a.end);
  grad.params.col_begin = a.contrast_begin;
  grad.params.grad_end = a.grad_end;
  run_label_supcon_bwd(grad.params, current_stream());
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
