// prototype_ce on CUDA tensors: device checks, the blocking of the rows and the registration for
// the CUDA dispatch key; the math of a block is shared/prototype_ce.h, run by the CPU backend too.
//
// No custom kernel: the [rows x C] logits are GEMMs that cuBLAS (through at::mm) runs at full
// rate, and everything else is O(N (C + D)). Rows go in chunks so that no [rows, C] or [rows, D]
// buffer exceeds kChunkElements; the features are never normalised in memory (the blocks of
// shared/prototype_ce.h fold the normalisation in), so the backward's only [N, D] buffer is the
// gradient it returns. Chunks run in stream order and every add is a GEMM or meets one entry, so
// results are deterministic.
#include <torch/library.h>

#include <algorithm>

#include "cuda/api_checks.h"
#include "shared/prototype_ce.h"

namespace mlcontrast {
namespace cuda {
namespace {

// Elements of a chunk's largest buffer (64 MiB in fp32).
constexpr int64_t kChunkElements = int64_t(1) << 24;

void check_inputs(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes) {
  MLC_CHECK_CUDA(features);
  MLC_CHECK_CUDA(labels);
  MLC_CHECK_CUDA(prototypes);
  MLC_CHECK_SAME_DEVICE(features, labels);
  MLC_CHECK_SAME_DEVICE(features, prototypes);
  prototype_ce::check_inputs(features, labels, prototypes);
}

int64_t chunk_rows(int64_t c, int64_t d) { return std::max<int64_t>(1, kChunkElements / std::max(c, d)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_ce_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                                 const at::Tensor& prototypes, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  const c10::cuda::CUDAGuard device_guard(features.device());
  const int64_t n = features.size(0), c = prototypes.size(0);
  // A label >= C would index past the logits on the device (a device-side assert, not an error).
  check_labels_below(labels, c);
  const auto dtype = compute_dtype(features, prototypes);
  const auto o = prototype_ce::class_operands(labels, prototypes, temperature, dtype);
  const auto f = prototype_ce::feature_rows(features, dtype);
  auto loss = at::zeros({n}, o.p.options());
  auto lse = at::empty({n}, o.p.options());
  const int64_t step = chunk_rows(c, features.size(1));
  auto scratch = at::empty({std::min(step, n), c}, o.p.options());
  for (int64_t i0 = 0; i0 < n; i0 += step) {
    const int64_t rows = std::min(step, n - i0);
    auto logits = scratch.narrow(0, 0, rows);
    prototype_ce::block_logits(o, f, f.block(i0, rows), i0, logits);
    prototype_ce::forward_block(o, logits, i0, lse, loss);
  }
  return {loss, lse, f.norm.reshape({-1})};
}

std::tuple<at::Tensor, at::Tensor> prototype_ce_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes,
    const at::Tensor& lse, const at::Tensor& norm, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  MLC_CHECK_CUDA(grad_rows);
  MLC_CHECK_CUDA(lse);
  MLC_CHECK_CUDA(norm);
  MLC_CHECK_SAME_DEVICE(features, grad_rows);
  MLC_CHECK_SAME_DEVICE(features, lse);
  MLC_CHECK_SAME_DEVICE(features, norm);
  check_row_inputs(grad_rows, lse, norm, "norm", features.size(0));
  const c10::cuda::CUDAGuard device_guard(features.device());
  const int64_t n = features.size(0), c = prototypes.size(0), d = features.size(1);
  check_labels_below(labels, c);  // the label column's scatter would write past the logits
  const auto dtype = compute_dtype(features, prototypes);
  const auto o = prototype_ce::class_operands(labels, prototypes, temperature, dtype);
  const auto f = prototype_ce::feature_rows(features, norm, dtype);
  const auto r = prototype_ce::row_grads(o, grad_rows, lse);
  auto normalise = [&](const at::Tensor& zb, int64_t i0, at::Tensor& g) {
    prototype_ce::through_normalisation_(f, zb, i0, g);
  };

  auto grad_z = at::empty({n, d}, o.p.options());
  auto grad_p = at::zeros({c, d}, o.p.options());
  const int64_t step = chunk_rows(c, d);
  auto scratch = at::empty({std::min(step, n), c}, o.p.options());
  for (int64_t i0 = 0; i0 < n; i0 += step) {
    const int64_t rows = std::min(step, n - i0);
    auto dlogits = scratch.narrow(0, 0, rows);
    auto out = grad_z.narrow(0, i0, rows);
    prototype_ce::backward_block(o, f, r, i0, dlogits, out, grad_p, normalise);
  }
  return {grad_z.to(features.scalar_type()), prototype_ce::prototype_grad(o, grad_p, temperature, prototypes)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CUDA, m) {
  m.impl("prototype_ce", &prototype_ce_cuda);
  m.impl("prototype_ce_backward", &prototype_ce_backward_cuda);
}

}  // namespace cuda
}  // namespace mlcontrast
