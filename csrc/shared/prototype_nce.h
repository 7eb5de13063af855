// prototype_nce (SADCL's PSCL) math that both backends run with ATen on the [B, C] logits, O(B C)
// and no D (csrc/cpu/prototype_nce.cpp, csrc/cuda/prototype_nce_api.cpp); each backend brings the
// passes over the features: the logits and, given d loss / d logits, the gradients.
//
// s_bc = cos(z_bc, p_c) / t. For each class c, with known rows K_c = {b : t_bc >= 0} and positives
// P_c = {b : t_bc = 1}:  L = -(1 / sum_c |P_c|) sum_{c : K_c not empty} (LSE_{P_c} s - LSE_{K_c} s),
// an LSE over an empty set being 0, and L = 0 without positives. The per-class LSEs, the [B, C]
// logits and the clamped norms max(|z_bc|, eps) are saved for backward (O(B C)), which then needs
// one pass over the features.
#pragma once

#include <limits>
#include <tuple>

#include "shared/checks_and_rows.h"

namespace mlcontrast {
namespace prototype_nce {

inline void check_inputs(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& targets) {
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
}

// The statistics a backward gets back from the forward: stats [2, C], logits and norm [B, C].
inline void check_saved(const at::Tensor& stats, const at::Tensor& logits, const at::Tensor& norm, int64_t b,
                        int64_t c) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == c, "stats must be [2, ", c, "], got ",
              stats.sizes());
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == b && logits.size(1) == c, "logits must be [", b, ", ", c,
              "], got ", logits.sizes());
  TORCH_CHECK(norm.dim() == 2 && norm.size(0) == b && norm.size(1) == c, "norm must be [", b, ", ", c, "], got ",
              norm.sizes());
}

// Column-wise LSE over the rows where `mask` holds, 0 for a column without such rows.
inline at::Tensor masked_column_lse(const at::Tensor& logits, const at::Tensor& mask) {
  auto lse = logits.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity()).logsumexp(0);
  return at::where(mask.any(0), lse, at::zeros_like(lse));
}

// The scalar loss and the per-class statistics [2, C] (LSE over P_c, LSE over K_c) saved for
// backward, from the [B, C] logits in the compute dtype.
inline std::tuple<at::Tensor, at::Tensor> loss_and_stats(const at::Tensor& logits, const at::Tensor& targets) {
  const auto positive = targets.eq(1), known = targets.ge(0);
  auto stats = at::stack({masked_column_lse(logits, positive), masked_column_lse(logits, known)});
  const auto n_pos = positive.sum().to(logits.scalar_type());
  // Columns without known rows have both LSEs at 0, so they add nothing to the sum; without any
  // positive the loss is 0 by definition.
  auto loss = at::where(n_pos.gt(0), (stats[1] - stats[0]).sum() / n_pos.clamp_min(1), at::zeros_like(n_pos));
  return {loss, stats};
}

// d L / d s_bc = coef * (softmax over P_c - softmax over K_c), coef = -grad / sum_c |P_c|: [B, C] in
// the logits' dtype, contiguous.
inline at::Tensor dlogits(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                          const at::Tensor& stats) {
  const auto dtype = logits.scalar_type();
  const auto positive = targets.eq(1), known = targets.ge(0);
  const auto st = stats.detach().to(dtype);
  const auto n_pos = positive.sum().to(dtype);
  const auto coef = at::where(n_pos.gt(0), -grad.detach().to(dtype) / n_pos.clamp_min(1), at::zeros_like(n_pos));
  const auto zero = at::zeros_like(logits);
  return (coef * (at::where(positive, (logits - st[0]).exp(), zero) - at::where(known, (logits - st[1]).exp(), zero)))
      .contiguous();
}

}  // namespace prototype_nce
}  // namespace mlcontrast
