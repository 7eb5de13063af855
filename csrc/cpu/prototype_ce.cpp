// Sample-to-prototype cross-entropy on the CPU: a fused linear cross-entropy with C classes.
//
// u_ic = cos(z_i, p_c) / t,  l_i = LSE_c u_ic - u_{i,y_i}  for rows with y_i >= 0.
// Row blocks are processed in parallel; only a [rows x C] block of logits exists at a time and
// only the row LSE is saved for backward, which recomputes the block.
#include "common.h"

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
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_FLOAT(prototypes);
  MLC_CHECK_INDEX(labels);
  MLC_CHECK_DIM(features, 2);
  MLC_CHECK_DIM(labels, 1);
  MLC_CHECK_DIM(prototypes, 2);
  TORCH_CHECK(labels.size(0) == features.size(0), "labels must have N = ", features.size(0), " entries");
  TORCH_CHECK(prototypes.size(1) == features.size(1), "prototypes must be [C, ", features.size(1), "]");
  TORCH_CHECK(prototypes.size(0) > 0, "prototypes must hold at least one class");
}

std::tuple<at::Tensor, at::Tensor> prototype_ce_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                    const at::Tensor& prototypes, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  const auto dtype = compute_dtype(features, prototypes);
  const int64_t n = features.size(0), c = prototypes.size(0);
  const auto z = unit_rows(to_compute(features, dtype)).unit;
  const auto p = (unit_rows(to_compute(prototypes, dtype)).unit * (1.0 / temperature)).contiguous();
  const auto y = labels.contiguous();
  auto loss = at::zeros({n}, z.options());
  auto lse = at::empty({n}, z.options());

  at::parallel_for(0, (n + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({kRowBlock, c}, z.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kRowBlock, rows = std::min(kRowBlock, n - i0);
      auto logits = scratch.narrow(0, 0, rows);
      at::mm_out(logits, z.narrow(0, i0, rows), p.t());
      auto lse_b = lse.narrow(0, i0, rows);
      at::logsumexp_out(lse_b, logits, {1});
      const auto y_b = y.narrow(0, i0, rows);
      const auto target = logits.gather(1, y_b.clamp_min(0).unsqueeze(1)).squeeze(1);
      loss.narrow(0, i0, rows).copy_(at::where(y_b.ge(0), lse_b - target, at::zeros_like(target)));
    }
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> prototype_ce_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& features,
                                                             const at::Tensor& labels, const at::Tensor& prototypes,
                                                             const at::Tensor& lse, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  const auto dtype = compute_dtype(features, prototypes);
  MLC_CHECK_CPU(grad_rows);
  MLC_CHECK_CPU(lse);
  const int64_t n = features.size(0), c = prototypes.size(0), d = features.size(1);
  const double inv_t = 1.0 / temperature;
  const auto zu = unit_rows(to_compute(features, dtype));
  const auto pu = unit_rows(to_compute(prototypes, dtype));
  const auto p = (pu.unit * inv_t).contiguous();
  const auto y = labels.contiguous();
  const auto g = at::where(y.ge(0), grad_rows.to(dtype), at::zeros({}, zu.unit.options())).contiguous();
  const auto lse_c = lse.to(dtype).contiguous();

  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  auto grad_unit_z = at::empty({n, d}, zu.unit.options());
  // One [C, D] accumulator per worker for the prototype gradient: no shared writes.
  auto grad_unit_p = at::zeros({workers, c, d}, zu.unit.options());

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({kRowBlock, c}, zu.unit.options());
    for (int64_t worker = w0; worker < w1; ++worker) {
      for (int64_t b = worker * blocks / workers; b < (worker + 1) * blocks / workers; ++b) {
        const int64_t i0 = b * kRowBlock, rows = std::min(kRowBlock, n - i0);
        const auto z_b = zu.unit.narrow(0, i0, rows);
        const auto g_b = g.narrow(0, i0, rows).unsqueeze(1);
        // d loss / d logits = g_i (softmax_ic - [c == y_i])
        auto dlogits = scratch.narrow(0, 0, rows);
        at::mm_out(dlogits, z_b, p.t());
        dlogits.sub_(lse_c.narrow(0, i0, rows).unsqueeze(1)).exp_().mul_(g_b);
        dlogits.scatter_add_(1, y.narrow(0, i0, rows).clamp_min(0).unsqueeze(1), -g_b);
        auto out = grad_unit_z.narrow(0, i0, rows);
        at::mm_out(out, dlogits, p);
        grad_unit_p[worker].addmm_(dlogits.t(), z_b, /*beta=*/1, /*alpha=*/inv_t);
      }
    }
  });
  auto grad_z = unit_rows_backward(grad_unit_z, zu).to(features.scalar_type());
  auto grad_p = unit_rows_backward(grad_unit_p.sum(0), pu).to(prototypes.scalar_type());
  return {grad_z, grad_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) {
  m.impl("prototype_ce", &prototype_ce_cpu);
  m.impl("prototype_ce_backward", &prototype_ce_backward_cpu);
}

}  // namespace cpu
}  // namespace mlcontrast
