// Prototype-to-sample NCE (SADCL's PSCL) on the CPU (the loss: shared/prototype_nce.h).
//
// One pass over the features computes the [B, C] logits and norms with the normalisation fused into
// the dot products; backward takes them from the forward and makes one pass over the features.
#include "class_sums.h"
#include "shared/prototype_nce.h"

#include <torch/library.h>

#include <cmath>

namespace mlcontrast {
namespace cpu {
namespace {

void check_inputs(const at::Tensor& features, const at::Tensor& prototypes, const at::Tensor& targets) {
  MLC_CHECK_CPU(features);
  MLC_CHECK_CPU(prototypes);
  MLC_CHECK_CPU(targets);
  prototype_nce::check_inputs(features, prototypes, targets);
}

// logits[b, c] = (z_bc / max(|z_bc|, eps)) . unit_p_c / t and norm[b, c] = max(|z_bc|, eps), one pass
// over z.
template <typename T>
void cosine_logits(const T* z, const T* unit_p, T* logits, T* norm, int64_t b, int64_t c, int64_t d, double inv_t) {
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
      norm[r] = std::max<T>(std::sqrt(sq), static_cast<T>(kNormEps));
      logits[r] = static_cast<T>(dot / norm[r] * inv_t);
    }
  });
}

// Given d L / d logits and the forward's logits and clamped norms, writes d L / d z (through the
// fused normalisation) and accumulates d L / d unit_p: one pass over z, as u_r . unit_p = logit_r t
// needs no dot product. Parallel over images, so that each worker reads and writes contiguous [C, D]
// slabs of z and grad_z; each worker adds into its own [C, D] slab of grad_unit_p ([workers, C, D]),
// so no two threads write the same memory, and the caller sums the slabs in a fixed order.
template <typename T>
void cosine_backward(const T* z, const T* unit_p, const T* dlogits, const T* logits, const T* norm, T* grad_z,
                     T* grad_unit_p, int64_t b, int64_t c, int64_t d, double inv_t, int64_t workers) {
  const T eps = static_cast<T>(kNormEps), it = static_cast<T>(inv_t);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t worker = w0; worker < w1; ++worker) {
      T* gp = grad_unit_p + worker * c * d;
      for (int64_t row = worker * b / workers; row < (worker + 1) * b / workers; ++row) {
        for (int64_t cls = 0; cls < c; ++cls) {
          const int64_t r = row * c + cls;
          const T* p_row = unit_p + cls * d;
          const T* zr = z + r * d;
          T* gzr = grad_z + r * d;
          T* gp_row = gp + cls * d;
          const T clamped = norm[r];
          const T ds = dlogits[r] * it;
          // The gradient of the unit row is ds * p; its radial part, ds (u . p) = dlogit * logit, only
          // counts when the norm is not clamped.
          const T radial = clamped > eps ? dlogits[r] * logits[r] : T(0);
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) {
            const T u = zr[k] / clamped;
            gzr[k] = (ds * p_row[k] - u * radial) / clamped;
            gp_row[k] += ds * u;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prototype_nce_cpu(const at::Tensor& features,
                                                                             const at::Tensor& prototypes,
                                                                             const at::Tensor& targets,
                                                                             double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, prototypes, targets);
  const auto dtype = compute_dtype(features, prototypes);
  const auto z = to_compute(features, dtype);
  const auto unit_p = unit_rows(to_compute(prototypes, dtype)).unit.contiguous();
  auto logits = at::empty({z.size(0), z.size(1)}, z.options());
  auto norm = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(dtype, "prototype_nce_logits", [&] {
    cosine_logits<scalar_t>(z.data_ptr<scalar_t>(), unit_p.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(),
                            norm.data_ptr<scalar_t>(), z.size(0), z.size(1), z.size(2), 1.0 / temperature);
  });
  auto [loss, stats] = prototype_nce::loss_and_stats(logits, targets);
  return {loss, stats, logits, norm};
}

std::tuple<at::Tensor, at::Tensor> prototype_nce_backward_cpu(const at::Tensor& grad, const at::Tensor& features,
                                                              const at::Tensor& prototypes, const at::Tensor& targets,
                                                              const at::Tensor& stats, const at::Tensor& logits,
                                                              const at::Tensor& norm, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, prototypes, targets);
  MLC_CHECK_CPU(grad);
  MLC_CHECK_CPU(stats);
  MLC_CHECK_CPU(logits);
  MLC_CHECK_CPU(norm);
  const int64_t b = features.size(0), c = features.size(1), d = features.size(2);
  prototype_nce::check_saved(stats, logits, norm, b, c);
  const auto dtype = compute_dtype(features, prototypes);
  const double inv_t = 1.0 / temperature;
  const auto z = to_compute(features, dtype);
  const auto pu = unit_rows(to_compute(prototypes, dtype));
  const auto unit_p = pu.unit.contiguous();
  const auto saved_logits = to_compute(logits, dtype), saved_norm = to_compute(norm, dtype);
  const auto dlogits = prototype_nce::dlogits(grad, saved_logits, targets, stats);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), b));
  auto grad_z = at::empty({b, c, d}, z.options());
  auto grad_unit_p = at::zeros({workers, c, d}, z.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "prototype_nce_backward", [&] {
    cosine_backward<scalar_t>(z.data_ptr<scalar_t>(), unit_p.data_ptr<scalar_t>(), dlogits.data_ptr<scalar_t>(),
                              saved_logits.data_ptr<scalar_t>(), saved_norm.data_ptr<scalar_t>(),
                              grad_z.data_ptr<scalar_t>(), grad_unit_p.data_ptr<scalar_t>(), b, c, d, inv_t, workers);
  });
  auto grad_p = unit_rows_backward(grad_unit_p.sum(0), pu);
  return {grad_z.to(features.scalar_type()), grad_p.to(prototypes.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) {
  m.impl("prototype_nce", &prototype_nce_cpu);
  m.impl("prototype_nce_backward", &prototype_nce_backward_cpu);
}

}  // namespace cpu
}  // namespace mlcontrast
