// Host side (ATen) of the flash-style supcon kernels' fixed logit shift, for every op that runs them
// (label_supcon's kernels, multihot_supcon's pair kernels): the bound c, the redo of the rows whose
// shifted sum underflowed, and the backward's parameters (one exp per pair with alpha, fp16 G scaling).
// The rows are all rows of `native` (the features in their own dtype, contiguous); the anchors are
// [begin, end).
#pragma once

#include <algorithm>

#include "cuda/api_checks.h"
#include "cuda/tf32.h"

namespace mlcontrast {
namespace cuda {

// A row whose sum of exp(s_ij - c) falls below 2^-60 may have lost terms to underflow (each below
// 2^-126 flushes; N of them stay under fp32's rounding of the sum for N < 2^40): its LSE is redone
// with the online max. With unit rows this happens only for temperatures below 2 / (60 ln 2) = 0.048.
constexpr double kLogShiftedSumFloor = -60.0 * 0.69314718055994531;

// c = max_i |z_i|^2 / t >= s_ij for every pair (Cauchy-Schwarz), as a one-element device tensor.
inline at::Tensor logit_bound(const at::Tensor& native, at::ScalarType dtype, double inv_t) {
  const auto largest = at::linalg_vector_norm(native, 2, at::IntArrayRef{1}, false, dtype).max();
  return (largest * largest * inv_t).reshape({1});
}

// The fields that the forward's and the backward's parameters share: the rows of `native`, the
// temperature, the tile configuration (dtype, TF32 as torch's matmul switch).
template <class Params>
void set_rows(Params& p, const at::Tensor& native, double inv_t) {
  p.z = native.data_ptr();
  p.n = native.size(0);
  p.d = native.size(1);
  p.ld_z = native.size(1);
  p.inv_temperature = inv_t;
  p.dtype = dtype_of(native.scalar_type());
  p.allow_tf32 = mlcontrast::tf32_allowed();
}

// The forward's LSE parameters with the fixed shift `bound`; `lse` ([n], compute dtype) is written for
// the anchors only.
inline LabelSupconFwdParams lse_params(const at::Tensor& native, at::Tensor& lse, const at::Tensor& bound,
                                       double inv_t, int64_t begin, int64_t end) {
  LabelSupconFwdParams p;
  set_rows(p, native, inv_t);
  p.lse = lse.data_ptr();
  p.row_begin = begin;
  p.row_end = end;
  p.shift = bound.data_ptr();
  return p;
}

// After a fixed-shift forward with `p`: when an anchor's lse_i - c = log of its shifted sum is below the
// floor, label_supcon's forward with the online max rewrites the anchors' LSE (a host sync).
inline void redo_underflowed_rows(LabelSupconFwdParams p, const at::Tensor& lse, const at::Tensor& bound) {
  const auto anchors = lse.narrow(0, p.row_begin, p.row_end - p.row_begin);
  if (anchors.numel() > 0 && (anchors - bound).lt(kLogShiftedSumFloor).any().item<bool>()) {
    p.shift = nullptr;
    run_label_supcon_fwd(p, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The parameters of a softmax-gradient backward, and the device tensors they point into.
struct SoftmaxGrad {
  LabelSupconBwdParams params;
  at::Tensor bound, alpha, g_scale;
};

// dz = G Z with the softmax part G_ij = w_i exp(s_ij - lse_i) + w_j exp(s_ij - lse_j) (i != j), in the
// compute dtype of w; rows with w_i = 0 must have lse_i = +inf, rows outside the anchors w_i = 0. Unless a
// row with a weight lies far below the logit bound c (the forward redid it), G takes one exp per pair:
// exp(s_ij - c) (alpha_i + alpha_j) with alpha = w exp(c - lse) <= w 2^60. `extra` (or undefined): the
// weights of another term of G that the kernel adds, |G_ij| <= 2 (max|w| + max|extra|), for fp16's scale.
inline SoftmaxGrad softmax_grad(const at::Tensor& native, const at::Tensor& w, const at::Tensor& lse, at::Tensor& dz,
                                double inv_t, int64_t begin, int64_t end, const at::Tensor& extra = at::Tensor()) {
  const int64_t n = native.size(0);
  SoftmaxGrad out;
  auto& p = out.params;
  if (native.scalar_type() == at::kHalf) {
    // A typical |G_ij| is ~ max|w| / N, which for large N sits in fp16's subnormals (bf16 has fp32's
    // exponent range: no scaling). Scaled by min(N, 2^14) / (max|w| + max|extra|), typical entries are ~1
    // and none exceeds 2^15 (fp16 max 65504). The factor stays on the device (no host sync); the kernel
    // divides the fp32 result by it.
    const double target = static_cast<double>(std::min<int64_t>(n, int64_t(1) << 14));
    auto largest = w.abs().max();
    if (extra.defined()) largest = largest + extra.abs().max();
    out.g_scale = (target / largest.clamp_min(1e-30)).to(at::kFloat);
    p.g_scale = out.g_scale.data_ptr<float>();
  }
  out.bound = logit_bound(native, w.scalar_type(), inv_t);
  const auto below_bound = out.bound - lse;  // -inf where w = 0 (lse = +inf)
  if (!(below_bound.gt(-kLogShiftedSumFloor) & w.ne(0)).any().item<bool>()) {
    out.alpha = at::where(w.ne(0), w * below_bound.exp(), at::zeros({}, w.options()));
    p.shift = out.bound.data_ptr();
    p.alpha = out.alpha.data_ptr();
  }
  set_rows(p, native, inv_t);
  p.w = w.data_ptr();
  p.lse = lse.data_ptr();
  p.dz = dz.data_ptr();
  p.anchor_begin = begin;
  p.anchor_end = end;
  p.ld_dz = native.size(1);
  return out;
}

}  // namespace cuda
}  // namespace mlcontrast
