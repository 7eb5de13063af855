// Prototype-to-sample NCE (SADCL's PSCL) on the CPU.
//
// s_bc = cos(z_bc, p_c) / t. For each class c, with known rows K_c = {b : t_bc >= 0} and positives
// P_c = {b : t_bc = 1}:  L = -(1 / sum_c |P_c|) sum_{c : K_c not empty} (LSE_{P_c} s - LSE_{K_c} s),
// an LSE over an empty set being 0. One pass over the features computes the [B, C] logits with the
// normalisation fused into the dot products; the per-class LSEs are saved for backward, which
// recomputes the logits in its single pass.
#include "common.h"

#include <torch/library.h>

#include <cmath>
#include <limits>

namespace mlcontrast {
namespace cpu {
namespace {

void check_inputs(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& targets) {
  MLC_CHECK_CPU(features);
  MLC_CHECK_CPU(prototypes);
  MLC_CHECK_CPU(targets);
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_FLOAT(prototypes);
  MLC_CHECK_INDEX(targets);
  MLC_CHECK_DIM(features, 3);
  MLC_CHECK_DIM(prototypes, 2);
  MLC_CHECK_DIM(targets, 2);
  const int64_t b = features.size(0), c = features.size(1), d = features.size(2);
  TORCH_CHECK(prototypes.size(0) == c && prototypes.size(1) == d, "prototypes must be [", c, ", ", d, "]");
  TORCH_CHECK(targets.size(0) == b && targets.size(1) == c, "targets must be [", b, ", ", c, "]");
}

// logits[b, c] = (z_bc / max(|z_bc|, eps)) . unit_p_c / t, one pass over z.
template <typename T>
void cosine_logits(const T* z, const T* unit_p, T* logits, int64_t b, int64_t c, int64_t d, double inv_t) {
  at::parallel_for(0, b * c, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* zr = z + r * d;
      const T* pr = unit_p + (r % c) * d;
      T dot = 0, sq = 0;
#pragma omp simd reduction(+ : dot, sq)
      for (int64_t k = 0; k < d; ++k) {
        dot += zr[k] * pr[k];
        sq += zr[k] * zr[k];
      }
      logits[r] = static_cast<T>(dot / std::max<T>(std::sqrt(sq), static_cast<T>(kNormEps)) * inv_t);
    }
  });
}

// Given d L / d logits, writes d L / d z (through the fused normalisation) and accumulates
// d L / d unit_p. Parallel over classes: each class owns its prototype gradient row, so no two
// threads write the same memory.
template <typename T>
void cosine_backward(const T* z, const T* unit_p, const T* dlogits, T* grad_z, T* grad_unit_p, int64_t b, int64_t c,
                     int64_t d, double inv_t) {
  const T eps = static_cast<T>(kNormEps), it = static_cast<T>(inv_t);
  at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t cls = c0; cls < c1; ++cls) {
      const T* p_row = unit_p + cls * d;
      T* gp_row = grad_unit_p + cls * d;
      for (int64_t row = 0; row < b; ++row) {
        const int64_t r = row * c + cls;
        const T* zr = z + r * d;
        T* gzr = grad_z + r * d;
        T sq = 0, dot = 0;
#pragma omp simd reduction(+ : sq, dot)
        for (int64_t k = 0; k < d; ++k) {
          sq += zr[k] * zr[k];
          dot += zr[k] * p_row[k];
        }
        const T norm = std::sqrt(sq), clamped = std::max(norm, eps);
        const T ds = dlogits[r] * it;
        // The gradient of the unit row is ds * p; its radial part only counts when the norm is
        // not clamped.
        const T radial = norm > eps ? ds * dot / clamped : T(0);
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
          const T u = zr[k] / clamped;
          gzr[k] = (ds * p_row[k] - u * radial) / clamped;
          gp_row[k] += ds * u;
        }
      }
    }
  });
}

at::Tensor logits_of(const at::Tensor& z, const at::Tensor& unit_p, double inv_t) {
  auto logits = at::empty({z.size(0), z.size(1)}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "prototype_nce_logits", [&] {
    cosine_logits<scalar_t>(z.data_ptr<scalar_t>(), unit_p.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(),
                            z.size(0), z.size(1), z.size(2), inv_t);
  });
  return logits;
}

// Column-wise LSE over the rows where `mask` holds, 0 for a column without such rows.
at::Tensor masked_column_lse(const at::Tensor& logits, const at::Tensor& mask) {
  auto lse = logits.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity()).logsumexp(0);
  return at::where(mask.any(0), lse, at::zeros_like(lse));
}

std::tuple<at::Tensor, at::Tensor> prototype_nce_cpu(const at::Tensor& features, const at::Tensor& prototypes,
                                                     const at::Tensor& targets, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, prototypes, targets);
  const auto dtype = compute_dtype(features, prototypes);
  const auto z = to_compute(features, dtype);
  const auto unit_p = unit_rows(to_compute(prototypes, dtype)).unit.contiguous();
  const auto logits = logits_of(z, unit_p, 1.0 / temperature);
  const auto positive = targets.eq(1), known = targets.ge(0);
  auto stats = at::stack({masked_column_lse(logits, positive), masked_column_lse(logits, known)});
  const auto n_pos = positive.sum().to(z.scalar_type());
  // Columns without known rows have both LSEs at 0, so they add nothing to the sum; without any
  // positive the loss is 0 by definition.
  auto loss = at::where(n_pos.gt(0), (stats[1] - stats[0]).sum() / n_pos.clamp_min(1), at::zeros_like(n_pos));
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> prototype_nce_backward_cpu(const at::Tensor& grad, const at::Tensor& features,
                                                              const at::Tensor& prototypes, const at::Tensor& targets,
                                                              const at::Tensor& stats, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, prototypes, targets);
  const auto dtype = compute_dtype(features, prototypes);
  const int64_t b = features.size(0), c = features.size(1), d = features.size(2);
  const double inv_t = 1.0 / temperature;
  const auto z = to_compute(features, dtype);
  const auto pu = unit_rows(to_compute(prototypes, dtype));
  const auto unit_p = pu.unit.contiguous();
  const auto logits = logits_of(z, unit_p, inv_t);
  const auto positive = targets.eq(1), known = targets.ge(0);
  const auto st = stats.to(dtype);
  const auto n_pos = positive.sum().to(dtype);
  const auto coef = at::where(n_pos.gt(0), -grad.to(dtype) / n_pos.clamp_min(1), at::zeros_like(n_pos));
  const auto zero = at::zeros_like(logits);
  // d L / d s_bc = coef * (softmax over P_c - softmax over K_c)
  const auto dlogits = (coef * (at::where(positive, (logits - st[0]).exp(), zero) -
                                at::where(known, (logits - st[1]).exp(), zero)))
                           .contiguous();

  auto grad_z = at::empty({b, c, d}, z.options());
  auto grad_unit_p = at::zeros({c, d}, z.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "prototype_nce_backward", [&] {
    cosine_backward<scalar_t>(z.data_ptr<scalar_t>(), unit_p.data_ptr<scalar_t>(), dlogits.data_ptr<scalar_t>(),
                              grad_z.data_ptr<scalar_t>(), grad_unit_p.data_ptr<scalar_t>(), b, c, d, inv_t);
  });
  auto grad_p = unit_rows_backward(grad_unit_p, pu);
  return {grad_z.to(features.scalar_type()), grad_p.to(prototypes.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) {
  m.impl("prototype_nce", &prototype_nce_cpu);
  m.impl("prototype_nce_backward", &prototype_nce_backward_cpu);
}

}  // namespace cpu
}  // namespace mlcontrast
