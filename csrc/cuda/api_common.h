// Helpers shared by the CUDA api files (host code, torch headers): device checks, the mapping from
// torch dtypes to the kernels' DType, the current stream, and deterministic per-class statistics
// (a stable sort plus the segmented-sum kernel, where ATen's index_add_ would use float atomics
// and give run-to-run different sums).
//
// What does not depend on the device (compute dtype, unit rows, shape checks) is shared/common.h,
// the CPU backend's too.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.h"
#include "shared/common.h"

namespace mlcontrast {
namespace cuda {

#define MLC_CHECK_CUDA(x) \
  TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor for the CUDA kernels, got one on ", (x).device())
#define MLC_CHECK_SAME_DEVICE(x, y)                                                                            \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", (x).device(), \
              " and ", (y).device())

// The kernels' element type of a torch dtype; anything else is refused with a clear message.
inline DType dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, "the mlcontrast CUDA kernels take float32, float16, bfloat16 or float64 tensors, got ",
                  type);
  }
}

// The stream of the current device (set by the caller's CUDAGuard).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

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
