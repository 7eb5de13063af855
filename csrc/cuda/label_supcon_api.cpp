// label_supcon on CUDA tensors: input checks, the O(N D) parts with ATen, the launches of the
// flash-style kernels (label_supcon.cuh), and the registration for the CUDA dispatch key.
//
// Same math and return conventions as csrc/cpu/label_supcon.cpp: rows with label -1 are dropped
// first; the positive term goes through per-class sums (sum_{p in P(i)} z_p = M_{y_i} - z_i), so only
// the self-excluded row LSE needs the N x N tiles, which the kernels stream without storing. The
// per-class sums use the deterministic segmented-sum kernel, so two runs give the same bits.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda/api_common.h"

namespace mlcontrast {
namespace cuda {
namespace {

void check_inputs(const at::Tensor& features, const at::Tensor& labels) {
  MLC_CHECK_CUDA(features);
  MLC_CHECK_CUDA(labels);
  MLC_CHECK_SAME_DEVICE(features, labels);
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_INDEX(labels);
  MLC_CHECK_DIM(features, 2);
  MLC_CHECK_DIM(labels, 1);
  TORCH_CHECK(labels.size(0) == features.size(0), "labels must have N = ", features.size(0), " entries, got ",
              labels.size(0));
  dtype_of(features.scalar_type());
}

struct ValidSet {
  at::Tensor index;   // undefined when every row is valid
  at::Tensor native;  // [Nv, D] in the features' dtype, contiguous: what the kernels read
  at::Tensor z;       // [Nv, D] in the compute dtype (fp32, or fp64 for fp64)
  at::Tensor labels;  // [Nv]
};

ValidSet gather_valid(const at::Tensor& features, const at::Tensor& labels) {
  ValidSet v;
  const auto f = features.detach();
  v.index = cpu::valid_rows(labels);
  v.native = v.index.defined() ? f.index_select(0, v.index) : f.contiguous();
  v.z = v.native.to(compute_dtype(features)).contiguous();
  v.labels = v.index.defined() ? labels.index_select(0, v.index) : labels.contiguous();
  return v;
}

at::Tensor scatter_rows(const at::Tensor& values, const at::Tensor& index, int64_t n) {
  if (!index.defined()) return values;
  auto sizes = values.sizes().vec();
  sizes[0] = n;
  return at::zeros(sizes, values.options()).index_copy_(0, index, values);
}

bool allow_tf32() { return at::globalContext().allowTF32CuBLAS(); }

// LSE_{j != i} z_i.z_j / t over the rows of `native`, in the compute dtype.
at::Tensor row_lse(const at::Tensor& native, at::ScalarType dtype, double inv_t) {
  auto lse = at::empty({native.size(0)}, native.options().dtype(dtype));
  LabelSupconFwdParams p;
  p.z = native.data_ptr();
  p.lse = lse.data_ptr();
  p.n = native.size(0);
  p.d = native.size(1);
  p.ld_z = native.size(1);
  p.inv_temperature = inv_t;
  p.dtype = dtype_of(native.scalar_type());
  p.allow_tf32 = allow_tf32();
  run_label_supcon_fwd(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return lse;
}

// dZ = G Z with G_ij = w_i exp(s_ij - lse_i) + w_j exp(s_ij - lse_j) (i != j), in the compute dtype.
// Rows with w_i = 0 must have lse_i = +inf.
at::Tensor lse_grad(const at::Tensor& native, const at::Tensor& w, const at::Tensor& lse, double inv_t) {
  const int64_t n = native.size(0), d = native.size(1);
  auto dz = at::empty({n, d}, w.options());
  if (d == 0) return dz;
  at::Tensor g_scale;
  if (native.scalar_type() == at::kHalf || native.scalar_type() == at::kBFloat16) {
    // |G_ij| <= 2 max|w| and a typical entry is ~ max|w| / N, which for large N sits in fp16's
    // subnormals. Scaled by min(N, 2^14) / max|w|, typical entries are ~1 and none exceeds 2^15
    // (fp16 max 65504). The factor stays on the device (no host sync); the kernel divides the
    // fp32 result by it.
    const double target = static_cast<double>(std::min<int64_t>(n, int64_t(1) << 14));
    g_scale = (target / w.abs().max().clamp_min(1e-30)).to(at::kFloat);
  }
  LabelSupconBwdParams p;
  p.z = native.data_ptr();
  p.w = w.data_ptr();
  p.lse = lse.data_ptr();
  p.g_scale = g_scale.defined() ? g_scale.data_ptr<float>() : nullptr;
  p.dz = dz.data_ptr();
  p.n = n;
  p.d = d;
  p.ld_z = d;
  p.ld_dz = d;
  p.inv_temperature = inv_t;
  p.dtype = dtype_of(native.scalar_type());
  p.allow_tf32 = allow_tf32();
  run_label_supcon_bwd(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

std::tuple<at::Tensor, at::Tensor> label_supcon_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                     double temperature, double base_temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels);
  const c10::cuda::CUDAGuard device_guard(features.device());
  const int64_t n = features.size(0);
  const auto dtype = compute_dtype(features);
  const auto v = gather_valid(features, labels);
  if (v.z.size(0) == 0) {
    auto zeros = at::zeros({n}, features.options().dtype(dtype));
    return {zeros, zeros.clone()};
  }
  const double inv_t = 1.0 / temperature;
  auto lse = row_lse(v.native, dtype, inv_t);

  const auto stats = class_stats(v.labels);
  const auto sums = class_sums(v.z, stats);
  const auto n_pos = stats.counts.index_select(0, stats.inverse).sub_(1).to(dtype);
  const auto pos_logit_sum = (v.z * (sums.index_select(0, stats.inverse) - v.z)).sum(1).mul_(inv_t);
  auto loss = at::where(n_pos.gt(0), (lse - pos_logit_sum / n_pos.clamp_min(1)) * (temperature / base_temperature),
                        at::zeros_like(lse));
  return {scatter_rows(loss, v.index, n), scatter_rows(lse, v.index, n)};
}

at::Tensor label_supcon_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& features,
                                      const at::Tensor& labels, const at::Tensor& lse, double temperature,
                                      double base_temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels);
  MLC_CHECK_CUDA(grad_rows);
  MLC_CHECK_CUDA(lse);
  MLC_CHECK_SAME_DEVICE(features, grad_rows);
  MLC_CHECK_SAME_DEVICE(features, lse);
  TORCH_CHECK(grad_rows.numel() == features.size(0) && lse.numel() == features.size(0),
              "grad_rows and lse must have N = ", features.size(0), " entries");
  const c10::cuda::CUDAGuard device_guard(features.device());
  const int64_t n = features.size(0);
  const auto dtype = compute_dtype(features);
  const auto v = gather_valid(features, labels);
  if (v.z.size(0) == 0) return at::zeros_like(features);

  auto select = [&](const at::Tensor& t) {
    auto c = t.detach().to(dtype).reshape({-1});
    return v.index.defined() ? c.index_select(0, v.index) : c.contiguous();
  };
  const auto g = select(grad_rows), lse_v = select(lse);
  const double inv_t = 1.0 / temperature, scale = temperature / base_temperature;

  const auto stats = class_stats(v.labels);
  const auto sums = class_sums(v.z, stats);
  const auto n_pos = stats.counts.index_select(0, stats.inverse).sub_(1).to(dtype);
  const auto has_pos = n_pos.gt(0);
  const auto zero = at::zeros_like(g);
  // LSE part: weight of row i in G; positive part: weight of each of its positive pairs.
  const auto w = at::where(has_pos, g * (scale * inv_t), zero).contiguous();
  const auto a = at::where(has_pos, g * (scale * inv_t) / n_pos.clamp_min(1), zero);
  const auto lse_eff =
      at::where(w.ne(0), lse_v, at::full_like(lse_v, std::numeric_limits<double>::infinity())).contiguous();

  auto dz = lse_grad(v.native, w, lse_eff, inv_t);
  // d/dz_k of -sum_i a_i z_i.(M_{y_i} - z_i): a_k (M_{y_k} - z_k) from row k, plus
  // sum_{i in class y_k, i != k} a_i z_i = A_{y_k} - a_k z_k from the rows that have k as a positive.
  const auto a_col = a.unsqueeze(1);
  const auto weighted = class_sums(v.z, stats, a);
  dz.sub_(a_col * (sums.index_select(0, stats.inverse) - 2 * v.z) + weighted.index_select(0, stats.inverse));
  return scatter_rows(dz, v.index, n).to(features.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CUDA, m) {
  m.impl("label_supcon", &label_supcon_cuda);
  m.impl("label_supcon_backward", &label_supcon_backward_cuda);
}

}  // namespace cuda
}  // namespace mlcontrast
