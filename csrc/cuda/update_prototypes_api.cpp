// update_prototypes_ on CUDA tensors: in-place EMA of the class prototypes towards the mean of each
// present class's rows. Same semantics as csrc/cpu/update_prototypes.cpp:
//   p_c <- m p_c + (1 - m) mean_{i : y_i = c} z_i, then p_c / max(|p_c|, eps) when normalising,
// for the classes present among the rows with y_i >= 0. Absent classes are never written (bit-for-bit
// unchanged), and every check, including labels < C, happens before the first write.
//
// The class sums come from the deterministic segmented-sum kernel over the rows stably sorted by
// label (ATen's index_add_ would use float atomics); the rest is O(C D) ATen work.
#include <torch/library.h>

#include "cuda/api_common.h"

namespace mlcontrast {
namespace cuda {
namespace {

void update_prototypes_cuda(at::Tensor& prototypes, const at::Tensor& features, const at::Tensor& labels,
                            double momentum, bool normalize) {
  MLC_KERNEL_GUARD();
  MLC_CHECK_CUDA(prototypes);
  MLC_CHECK_CUDA(features);
  MLC_CHECK_CUDA(labels);
  MLC_CHECK_SAME_DEVICE(prototypes, features);
  MLC_CHECK_SAME_DEVICE(prototypes, labels);
  MLC_CHECK_FLOAT(prototypes);
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_INDEX(labels);
  MLC_CHECK_DIM(prototypes, 2);
  MLC_CHECK_DIM(features, 2);
  MLC_CHECK_DIM(labels, 1);
  const int64_t c = prototypes.size(0);
  TORCH_CHECK(features.size(1) == prototypes.size(1), "features must be [N, ", prototypes.size(1), "], got ",
              features.sizes());
  TORCH_CHECK(labels.size(0) == features.size(0), "labels must have N = ", features.size(0), " entries, got ",
              labels.size(0));
  TORCH_CHECK(momentum >= 0 && momentum <= 1, "momentum must lie in [0, 1], got ", momentum);
  const c10::cuda::CUDAGuard device_guard(prototypes.device());

  const auto valid = labels.ge(0);
  const auto y = labels.masked_select(valid);
  if (y.numel() == 0) return;
  TORCH_CHECK(y.max().item<int64_t>() < c, "labels must be < C = ", c, " (the number of prototypes)");
  const auto z = to_compute(features).index_select(0, valid.nonzero().squeeze(1)).contiguous();

  // Rows stably sorted by class; class k owns order[offsets[k] : offsets[k + 1]] (possibly empty).
  const auto sorted = at::sort(y, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto& sorted_y = std::get<0>(sorted);
  const auto& order = std::get<1>(sorted);
  const auto offsets = at::searchsorted(sorted_y, at::arange(c + 1, y.options()));
  const auto counts = offsets.narrow(0, 1, c) - offsets.narrow(0, 0, c);
  const auto sums = segment_sum(z, at::Tensor(), order, offsets);

  const auto present = counts.nonzero().squeeze(1);
  const auto mean = sums.index_select(0, present) / counts.index_select(0, present).to(z.scalar_type()).unsqueeze(1);
  auto updated = prototypes.index_select(0, present).to(z.scalar_type()).mul_(momentum).add_(mean, 1.0 - momentum);
  if (normalize) updated = unit_rows(updated).unit;
  prototypes.index_copy_(0, present, updated.to(prototypes.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CUDA, m) { m.impl("update_prototypes_", &update_prototypes_cuda); }

}  // namespace cuda
}  // namespace mlcontrast
