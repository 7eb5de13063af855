// prototype_ce on CUDA tensors: device checks, the blocking of the rows and the registration for
// the CUDA dispatch key; the math of a block is shared/prototype_ce.h, run by the CPU backend too.
//
// No custom kernel: the [rows x C] logits are GEMMs that cuBLAS (through at::mm) runs at full
// rate, and everything else is O(N (C + D)). Rows go in chunks so that no N x C buffer exists beyond
// kChunkElements, and the gradients use no atomics (the label column is subtracted with a one-hot
// compare, not scatter_add_), so results are deterministic.
#include <torch/library.h>

#include <algorithm>

#include "cuda/api_common.h"
#include "shared/prototype_ce.h"

namespace mlcontrast {
namespace cuda {
namespace {

// Elements of one chunk of logits (64 MiB in fp32).
constexpr int64_t kChunkElements = int64_t(1) << 24;

void check_inputs(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes) {
  MLC_CHECK_CUDA(features);
  MLC_CHECK_CUDA(labels);
  MLC_CHECK_CUDA(prototypes);
  MLC_CHECK_SAME_DEVICE(features, labels);
  MLC_CHECK_SAME_DEVICE(features, prototypes);
  prototype_ce::check_inputs(features, labels, prototypes);
}

int64_t chunk_rows(int64_t c) { return std::max<int64_t>(1, kChunkElements / c); }

std::tuple<at::Tensor, at::Tensor> prototype_ce_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                     const at::Tensor& prototypes, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  const c10::cuda::CUDAGuard device_guard(features.device());
  const int64_t n = features.size(0), c = prototypes.size(0);
  // A label >= C would index past the logits on the device (a device-side assert, not an error).
  check_labels_below(labels, c);
  const auto o = prototype_ce::operands(features, labels, prototypes, temperature);
  auto loss = at::zeros({n}, o.p.options());
  auto lse = at::empty({n}, o.p.options());
  const int64_t step = chunk_rows(c);
  for (int64_t i0 = 0; i0 < n; i0 += step) {
    const int64_t rows = std::min(step, n - i0);
    prototype_ce::forward_block(o, at::mm(o.z.unit.narrow(0, i0, rows), o.p.t()), i0, lse, loss);
  }
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> prototype_ce_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& features,
                                                              const at::Tensor& labels, const at::Tensor& prototypes,
                                                              const at::Tensor& lse, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  MLC_CHECK_CUDA(grad_rows);
  MLC_CHECK_CUDA(lse);
  MLC_CHECK_SAME_DEVICE(features, grad_rows);
  MLC_CHECK_SAME_DEVICE(features, lse);
  check_row_inputs(grad_rows, lse, features.size(0));
  const c10::cuda::CUDAGuard device_guard(features.device());
  const int64_t n = features.size(0), c = prototypes.size(0), d = features.size(1);
  const auto o = prototype_ce::operands(features, labels, prototypes, temperature);
  const auto r = prototype_ce::row_grads(o, grad_rows, lse);
  const auto classes = at::arange(c, o.y.options());

  auto grad_unit_z = at::empty({n, d}, o.p.options());
  auto grad_unit_p = at::zeros({c, d}, o.p.options());
  const int64_t step = chunk_rows(c);
  for (int64_t i0 = 0; i0 < n; i0 += step) {
    const int64_t rows = std::min(step, n - i0);
    auto dlogits = at::mm(o.z.unit.narrow(0, i0, rows), o.p.t());
    const auto g_b = prototype_ce::softmax_part_(r, dlogits, i0);
    const auto label_column = classes.unsqueeze(0).eq(o.y.narrow(0, i0, rows).unsqueeze(1));
    dlogits.sub_(label_column.to(o.p.scalar_type()).mul_(g_b));
    prototype_ce::backward_block(o, dlogits, i0, temperature, grad_unit_z, grad_unit_p);
  }
  return prototype_ce::input_grads(o, grad_unit_z, grad_unit_p, features, prototypes);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CUDA, m) {
  m.impl("prototype_ce", &prototype_ce_cuda);
  m.impl("prototype_ce_backward", &prototype_ce_backward_cuda);
}

}  // namespace cuda
}  // namespace mlcontrast
