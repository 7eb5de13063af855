// Sample-to-prototype cross-entropy on the CPU, a fused linear cross-entropy with C classes (the
// loss: shared/prototype_ce.h). Row blocks are processed in parallel, each on its own scratch block
// of logits.
#include "common.h"
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

std::tuple<at::Tensor, at::Tensor> prototype_ce_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                    const at::Tensor& prototypes, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  const int64_t n = features.size(0), c = prototypes.size(0);
  const auto o = prototype_ce::operands(features, labels, prototypes, temperature);
  auto loss = at::zeros({n}, o.p.options());
  auto lse = at::empty({n}, o.p.options());

  at::parallel_for(0, (n + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({kRowBlock, c}, o.p.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kRowBlock, rows = std::min(kRowBlock, n - i0);
      auto logits = scratch.narrow(0, 0, rows);
      at::mm_out(logits, o.z.unit.narrow(0, i0, rows), o.p.t());
      prototype_ce::forward_block(o, logits, i0, lse, loss);
    }
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> prototype_ce_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& features,
                                                             const at::Tensor& labels, const at::Tensor& prototypes,
                                                             const at::Tensor& lse, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  MLC_CHECK_CPU(grad_rows);
  MLC_CHECK_CPU(lse);
  check_row_inputs(grad_rows, lse, features.size(0));
  const int64_t n = features.size(0), c = prototypes.size(0), d = features.size(1);
  const auto o = prototype_ce::operands(features, labels, prototypes, temperature);
  const auto r = prototype_ce::row_grads(o, grad_rows, lse);

  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  auto grad_unit_z = at::empty({n, d}, o.p.options());
  // One [C, D] accumulator per worker for the prototype gradient: no shared writes.
  auto grad_unit_p = at::zeros({workers, c, d}, o.p.options());

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({kRowBlock, c}, o.p.options());
    for (int64_t worker = w0; worker < w1; ++worker) {
      for (int64_t b = worker * blocks / workers; b < (worker + 1) * blocks / workers; ++b) {
        const int64_t i0 = b * kRowBlock, rows = std::min(kRowBlock, n - i0);
        auto dlogits = scratch.narrow(0, 0, rows);
        at::mm_out(dlogits, o.z.unit.narrow(0, i0, rows), o.p.t());
        const auto g_b = prototype_ce::softmax_part_(r, dlogits, i0);
        dlogits.scatter_add_(1, o.y.narrow(0, i0, rows).clamp_min(0).unsqueeze(1), -g_b);
        prototype_ce::backward_block(o, dlogits, i0, temperature, grad_unit_z, grad_unit_p[worker]);
      }
    }
  });
  return prototype_ce::input_grads(o, grad_unit_z, grad_unit_p.sum(0), features, prototypes);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) {
  m.impl("prototype_ce", &prototype_ce_cpu);
  m.impl("prototype_ce_backward", &prototype_ce_backward_cpu);
}

}  // namespace cpu
}  // namespace mlcontrast
