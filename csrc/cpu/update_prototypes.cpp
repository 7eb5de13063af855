// In-place EMA of class prototypes on the CPU.
//
// For every class c present among the valid rows: p_c <- m p_c + (1 - m) mean_{i : y_i = c} z_i,
// then p_c / max(|p_c|, eps) when normalising. Absent classes are not written at all, so they stay
// bit-for-bit unchanged. Everything is checked before the first write.
#include "common.h"

#include <torch/library.h>

namespace mlcontrast {
namespace cpu {
namespace {

void update_prototypes_cpu(at::Tensor& prototypes, const at::Tensor& features, const at::Tensor& labels,
                           double momentum, bool normalize) {
  MLC_KERNEL_GUARD();
  MLC_CHECK_CPU(prototypes);
  MLC_CHECK_CPU(features);
  MLC_CHECK_CPU(labels);
  MLC_CHECK_FLOAT(prototypes);
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_INDEX(labels);
  MLC_CHECK_DIM(prototypes, 2);
  MLC_CHECK_DIM(features, 2);
  MLC_CHECK_DIM(labels, 1);
  const int64_t c = prototypes.size(0);
  TORCH_CHECK(features.size(1) == prototypes.size(1), "features must be [N, ", prototypes.size(1), "]");
  TORCH_CHECK(labels.size(0) == features.size(0), "labels must have N = ", features.size(0), " entries");
  TORCH_CHECK(momentum >= 0 && momentum <= 1, "momentum must lie in [0, 1]");

  // Rows with label -1 are dropped; when there are none, the features are used without a copy.
  const auto index = valid_rows(labels);
  const auto y = index.defined() ? labels.index_select(0, index) : labels.contiguous();
  if (y.numel() == 0) return;
  TORCH_CHECK(y.max().item<int64_t>() < c, "labels must be < C = ", c);
  const auto z = index.defined() ? to_compute(features).index_select(0, index) : to_compute(features);

  const auto counts = at::bincount(y, {}, c);
  const auto sums = at::zeros({c, z.size(1)}, z.options()).index_add_(0, y, z);
  const auto present = counts.nonzero().squeeze(1);
  const auto mean = sums.index_select(0, present) / counts.index_select(0, present).to(z.scalar_type()).unsqueeze(1);
  auto updated = prototypes.index_select(0, present).to(z.scalar_type()).mul_(momentum).add_(mean, 1.0 - momentum);
  if (normalize) updated = unit_rows(updated).unit;
  prototypes.index_copy_(0, present, updated.to(prototypes.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) { m.impl("update_prototypes_", &update_prototypes_cpu); }

}  // namespace cpu
}  // namespace mlcontrast
