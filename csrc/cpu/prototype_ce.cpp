// Sample-to-prototype cross-entropy on the CPU, a fused linear cross-entropy with C classes (the
// loss and the blocks: shared/prototype_ce.h). Row blocks of 256 are processed in parallel, each on
// its own scratch block of logits; the features' normalisation is folded into the blocks (no [N, D]
// temporaries), and its chain rule is one pass per row here.
#include "class_sums.h"
#include "shared/prototype_ce.h"

#include <torch/library.h>

#include <algorithm>

namespace mlcontrast {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 256;

void check_inputs(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes) {
  MLC_CHECK_CPU(features);
  MLC_CHECK_CPU(labels);
  MLC_CHECK_CPU(prototypes);
  prototype_ce::check_inputs(features, labels, prototypes);
}

using prototype_ce::FeatureRows;

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_ce_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                                const at::Tensor& prototypes, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  const int64_t n = features.size(0), c = prototypes.size(0);
  const auto dtype = compute_dtype(features, prototypes);
  const auto o = prototype_ce::class_operands(labels, prototypes, temperature, dtype);
  const auto f = prototype_ce::feature_rows(features, dtype);
  auto loss = at::zeros({n}, o.p.options());
  auto lse = at::empty({n}, o.p.options());

  at::parallel_for(0, (n + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({kRowBlock, c}, o.p.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kRowBlock, rows = std::min(kRowBlock, n - i0);
      auto logits = scratch.narrow(0, 0, rows);
      prototype_ce::block_logits(o, f, f.block(i0, rows), i0, logits);
      prototype_ce::forward_block(o, logits, i0, lse, loss);
    }
  });
  return {loss, lse, f.norm.reshape({-1})};
}

// prototype_ce::through_normalisation_ in one pass per row: (g - x (x . g) [|z| > eps]) s with x = z s.
template <typename T>
void through_normalisation_(const FeatureRows& f, const at::Tensor& zb, int64_t i0, at::Tensor& out) {
  const int64_t rows = out.size(0), d = out.size(1);
  const T* z = zb.data_ptr<T>();
  const T* inv = f.inv_norm.data_ptr<T>() + i0;
  const T* above = f.above.data_ptr<T>() + i0;
  T* g = out.data_ptr<T>();
  for (int64_t i = 0; i < rows; ++i) {
    const T* zi = z + i * d;
    T* gi = g + i * d;
    const T s = inv[i];
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t k = 0; k < d; ++k) dot += zi[k] * gi[k];
    const T radial = dot * s * above[i];  // x . g
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) gi[k] = (gi[k] - zi[k] * s * radial) * s;
  }
}

std::tuple<at::Tensor, at::Tensor> prototype_ce_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes,
    const at::Tensor& lse, const at::Tensor& norm, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  MLC_CHECK_CPU(grad_rows);
  MLC_CHECK_CPU(lse);
  MLC_CHECK_CPU(norm);
  check_row_inputs(grad_rows, lse, norm, "norm", features.size(0));
  const int64_t n = features.size(0), c = prototypes.size(0), d = features.size(1);
  const auto dtype = compute_dtype(features, prototypes);
  const auto o = prototype_ce::class_operands(labels, prototypes, temperature, dtype);
  const auto f = prototype_ce::feature_rows(features, norm, dtype);
  const auto r = prototype_ce::row_grads(o, grad_rows, lse);
  auto normalise = [&](const at::Tensor& zb, int64_t i0, at::Tensor& g) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "prototype_ce_normalisation_backward",
                               [&] { through_normalisation_<scalar_t>(f, zb, i0, g); });
  };

  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  auto grad_z = at::empty({n, d}, o.p.options());
  // One [C, D] accumulator per worker for the prototype gradient: no shared writes.
  auto grad_p = at::zeros({workers, c, d}, o.p.options());

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({kRowBlock, c}, o.p.options());
    for (int64_t worker = w0; worker < w1; ++worker) {
      for (int64_t b = worker * blocks / workers; b < (worker + 1) * blocks / workers; ++b) {
        const int64_t i0 = b * kRowBlock, rows = std::min(kRowBlock, n - i0);
        auto dl = scratch.narrow(0, 0, rows);
        auto out = grad_z.narrow(0, i0, rows);
        prototype_ce::backward_block(o, f, r, i0, dl, out, grad_p[worker], normalise);
      }
    }
  });
  return {grad_z.to(features.scalar_type()), prototype_ce::prototype_grad(o, grad_p.sum(0), temperature, prototypes)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) {
  m.impl("prototype_ce", &prototype_ce_cpu);
  m.impl("prototype_ce_backward", &prototype_ce_backward_cpu);
}

}  // namespace cpu
}  // namespace mlcontrast
