// Deterministic per-class statistics of the CUDA backend: a stable sort of the rows by class plus
// the segmented-sum kernel (segment_sum.cuh), where ATen's index_add_ would use float atomics and
// give run-to-run different sums. The CPU backend's counterpart is cpu/class_sums.h.
#pragma once

#include "cuda/api_checks.h"

namespace mlcontrast {
namespace cuda {

// Classes of a label vector, for deterministic per-class sums.
struct ClassStats {
  at::Tensor inverse;  // [rows] int64: dense class index of each row
  at::Tensor counts;   // [K] int64: rows per class
  at::Tensor order;    // [rows] int64: the rows, stably sorted by class
  at::Tensor offsets;  // [K + 1] int64: class k owns order[offsets[k] : offsets[k + 1]]
};

inline ClassStats class_stats(const at::Tensor& labels) {
  ClassStats s;
  auto uniq = at::_unique2(labels, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/true);
  s.inverse = std::get<1>(uniq).reshape({-1});
  s.counts = std::get<2>(uniq);
  s.order = std::get<1>(at::sort(s.inverse, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  s.offsets = at::cat({at::zeros({1}, s.counts.options()), s.counts.cumsum(0)});
  return s;
}

// out[k] = sum over the rows t of class k (in order) of weight[t] * x[t]; weight may be undefined
// (all ones). x: [rows, D] in any float dtype, contiguous, read as it is; returns [K, D] in its
// compute dtype (fp64 for fp64, else fp32).
inline at::Tensor segment_sum(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& order,
                              const at::Tensor& offsets) {
  TORCH_INTERNAL_ASSERT(x.is_contiguous());
  const int64_t segments = offsets.size(0) - 1, d = x.size(1);
  const auto acc = compute_dtype(x);
  auto out = at::zeros({segments, d}, x.options().dtype(acc));
  if (segments == 0 || d == 0) return out;
  at::Tensor w = weight.defined() ? weight.to(acc).contiguous() : weight;
  const auto order_c = order.contiguous(), offsets_c = offsets.contiguous();
  SegmentSumParams p;
  p.x = x.data_ptr();
  p.weight = w.defined() ? w.data_ptr() : nullptr;
  p.order = order_c.data_ptr<int64_t>();
  p.offsets = offsets_c.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.segments = segments;
  p.d = d;
  p.ld_x = d;
  p.x_dtype = dtype_of(x.scalar_type());
  p.dtype = dtype_of(acc);
  run_segment_sum(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

inline at::Tensor class_sums(const at::Tensor& x, const ClassStats& s, const at::Tensor& weight = at::Tensor()) {
  return segment_sum(x, weight, s.order, s.offsets);
}

}  // namespace cuda
}  // namespace mlcontrast
