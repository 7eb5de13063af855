// prototype_ce on CUDA tensors: each row against all C prototypes by cosine, cross-entropy at its
// label. Same math as csrc/cpu/prototype_ce.cpp: u_ic = cos(z_i, p_c) / t, l_i = LSE_c u_ic - u_{i,y_i}
// for rows with y_i >= 0 (0 otherwise); the per-row loss and LSE are returned, the LSE saved for
// backward, which recomputes the logits.
//
// No custom kernel: the [rows x C] logits are GEMMs that cuBLAS (through at::mm) runs at full
// rate, and everything else is O(N (C + D)). Rows go in chunks so that no N x C buffer exists beyond
// kChunkElements, and the gradients use no atomics (the label column is subtracted with a one-hot
// compare, not scatter_add_), so results are deterministic.
#include <torch/library.h>

#include <algorithm>

#include "cuda/api_common.h"

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
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_FLOAT(prototypes);
  MLC_CHECK_INDEX(labels);
  MLC_CHECK_DIM(features, 2);
  MLC_CHECK_DIM(labels, 1);
  MLC_CHECK_DIM(prototypes, 2);
  TORCH_CHECK(labels.size(0) == features.size(0), "labels must have N = ", features.size(0), " entries, got ",
              labels.size(0));
  TORCH_CHECK(prototypes.size(1) == features.size(1), "prototypes must be [C, ", features.size(1), "], got ",
              prototypes.sizes());
  TORCH_CHECK(prototypes.size(0) > 0, "prototypes must hold at least one class");
}

// A label >= C would index past the logits on the device (a device-side assert, not an error):
// refuse it here (one host sync).
void check_label_range(const at::Tensor& labels, int64_t c) {
  if (labels.numel() == 0) return;
  const int64_t top = labels.max().item<int64_t>();
  TORCH_CHECK(top < c, "labels must be < C = ", c, " (the number of prototypes), got ", top);
}

int64_t chunk_rows(int64_t c) { return std::max<int64_t>(1, kChunkElements / c); }

std::tuple<at::Tensor, at::Tensor> prototype_ce_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                     const at::Tensor& prototypes, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  const c10::cuda::CUDAGuard device_guard(features.device());
  const int64_t n = features.size(0), c = prototypes.size(0);
  check_label_range(labels, c);
  const auto dtype = compute_dtype(features, prototypes);
  const auto z = unit_rows(to_compute(features, dtype)).unit;
  const auto p = (unit_rows(to_compute(prototypes, dtype)).unit * (1.0 / temperature)).contiguous();
  const auto y = labels.contiguous();
  auto loss = at::zeros({n}, z.options());
  auto lse = at::empty({n}, z.options());
  const int64_t step = chunk_rows(c);
  for (int64_t i0 = 0; i0 < n; i0 += step) {
    const int64_t rows = std::min(step, n - i0);
    const auto logits = at::mm(z.narrow(0, i0, rows), p.t());
    auto lse_b = lse.narrow(0, i0, rows);
    at::logsumexp_out(lse_b, logits, {1});
    const auto y_b = y.narrow(0, i0, rows);
    const auto target = logits.gather(1, y_b.clamp_min(0).unsqueeze(1)).squeeze(1);
    loss.narrow(0, i0, rows).copy_(at::where(y_b.ge(0), lse_b - target, at::zeros_like(target)));
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
  TORCH_CHECK(grad_rows.numel() == features.size(0) && lse.numel() == features.size(0),
              "grad_rows and lse must have N = ", features.size(0), " entries");
  const c10::cuda::CUDAGuard device_guard(features.device());
  const auto dtype = compute_dtype(features, prototypes);
  const int64_t n = features.size(0), c = prototypes.size(0), d = features.size(1);
  const double inv_t = 1.0 / temperature;
  const auto zu = unit_rows(to_compute(features, dtype));
  const auto pu = unit_rows(to_compute(prototypes, dtype));
  const auto p = (pu.unit * inv_t).contiguous();
  const auto y = labels.contiguous();
  const auto g = at::where(y.ge(0), grad_rows.detach().to(dtype).reshape({-1}), at::zeros({}, zu.unit.options()))
                     .contiguous();
  const auto lse_c = lse.detach().to(dtype).reshape({-1}).contiguous();
  const auto classes = at::arange(c, y.options());

  auto grad_unit_z = at::empty({n, d}, zu.unit.options());
  auto grad_unit_p = at::zeros({c, d}, zu.unit.options());
  const int64_t step = chunk_rows(c);
  for (int64_t i0 = 0; i0 < n; i0 += step) {
    const int64_t rows = std::min(step, n - i0);
    const auto z_b = zu.unit.narrow(0, i0, rows);
    const auto g_b = g.narrow(0, i0, rows).unsqueeze(1);
    // d loss / d logits = g_i (softmax_ic - [c == y_i])
    auto dlogits = at::mm(z_b, p.t());
    dlogits.sub_(lse_c.narrow(0, i0, rows).unsqueeze(1)).exp_().mul_(g_b);
    dlogits.sub_(classes.unsqueeze(0).eq(y.narrow(0, i0, rows).unsqueeze(1)).to(dtype).mul_(g_b));
    auto out = grad_unit_z.narrow(0, i0, rows);
    at::mm_out(out, dlogits, p);
    grad_unit_p.addmm_(dlogits.t(), z_b, /*beta=*/1, /*alpha=*/inv_t);
  }
  auto grad_z = unit_rows_backward(grad_unit_z, zu).to(features.scalar_type());
  auto grad_p = unit_rows_backward(grad_unit_p, pu).to(prototypes.scalar_type());
  return {grad_z, grad_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CUDA, m) {
  m.impl("prototype_ce", &prototype_ce_cuda);
  m.impl("prototype_ce_backward", &prototype_ce_backward_cuda);
}

}  // namespace cuda
}  // namespace mlcontrast
