// update_prototypes_ on CUDA tensors: device checks, the class sums, and the registration for the
// CUDA dispatch key; the update itself is shared/update_prototypes.h, run by the CPU backend too.
//
// The class sums come from the deterministic segmented-sum kernel over the rows stably sorted by
// label (ATen's index_add_ would use float atomics).
#include <torch/library.h>

#include "cuda/class_sums.h"
#include "shared/update_prototypes.h"

namespace mlcontrast {
namespace cuda {
namespace {

// Rows stably sorted by class; class k owns order[offsets[k] : offsets[k + 1]] (possibly empty).
std::tuple<at::Tensor, at::Tensor> class_totals(const at::Tensor& y, const at::Tensor& z, int64_t c) {
  const auto sorted = at::sort(y, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto& sorted_y = std::get<0>(sorted);
  const auto& order = std::get<1>(sorted);
  const auto offsets = at::searchsorted(sorted_y, at::arange(c + 1, y.options()));
  const auto counts = offsets.narrow(0, 1, c) - offsets.narrow(0, 0, c);
  return {counts, segment_sum(z, at::Tensor(), order, offsets)};
}

void update_prototypes_cuda(at::Tensor& prototypes, const at::Tensor& features, const at::Tensor& labels,
                            double momentum, bool normalize) {
  MLC_KERNEL_GUARD();
  MLC_CHECK_CUDA(prototypes);
  MLC_CHECK_CUDA(features);
  MLC_CHECK_CUDA(labels);
  MLC_CHECK_SAME_DEVICE(prototypes, features);
  MLC_CHECK_SAME_DEVICE(prototypes, labels);
  update_prototypes::check_inputs(prototypes, features, labels, momentum);
  const c10::cuda::CUDAGuard device_guard(prototypes.device());
  update_prototypes::ema_(prototypes, features, labels, momentum, normalize, class_totals);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CUDA, m) { m.impl("update_prototypes_", &update_prototypes_cuda); }

}  // namespace cuda
}  // namespace mlcontrast
