// Prototype-to-sample NCE (SADCL's PSCL) on the CPU (the loss: shared/prototype_nce.h).
//
// One pass over the features computes the [B, C] logits with the normalisation fused into the dot
// products; backward recomputes the logits in its single pass.
#include "common.h"
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
// d L / d unit_p. Parallel over images, so that each worker reads and writes contiguous [C, D] slabs
// of z and grad_z; each worker adds into its own [C, D] slab of grad_unit_p ([workers, C, D]), so
// no two threads write the same memory, and the caller sums the slabs in a fixed order.
template <typename T>
void cosine_backward(const T* z, const T* unit_p, const T* dlogits, T* grad_z, T* grad_unit_p, int64_t b, int64_t c,
                     int64_t d, double inv_t, int64_t workers) {
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

std::tuple<at::Tensor, at::Tensor> prototype_nce_cpu(const at::Tensor& features, const at::Tensor& prototypes,
                                                     const at::Tensor& targets, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, prototypes, targets);
  const auto dtype = compute_dtype(features, prototypes);
  const auto z = to_compute(features, dtype);
  const auto unit_p = unit_rows(to_compute(prototypes, dtype)).unit.contiguous();
  return prototype_nce::loss_and_stats(logits_of(z, unit_p, 1.0 / temperature), targets);
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
  const auto dlogits = prototype_nce::dlogits(grad, logits_of(z, unit_p, inv_t), targets, stats);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), b));
  auto grad_z = at::empty({b, c, d}, z.options());
  auto grad_unit_p = at::zeros({workers, c, d}, z.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "prototype_nce_backward", [&] {
    cosine_backward<scalar_t>(z.data_ptr<scalar_t>(), unit_p.data_ptr<scalar_t>(), dlogits.data_ptr<scalar_t>(),
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
