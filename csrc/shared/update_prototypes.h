// update_prototypes_ as both backends run it with ATen (csrc/cpu/update_prototypes.cpp,
// csrc/cuda/update_prototypes_api.cpp); each backend brings the per-class counts and sums.
//
// For every class c present among the valid rows: p_c <- m p_c + (1 - m) mean_{i : y_i = c} z_i,
// then p_c / max(|p_c|, eps) when normalising. Absent classes are not written at all, so they stay
// bit-for-bit unchanged. Everything, labels < C included, is checked before the first write.
#pragma once

#include <tuple>

#include "shared/checks_and_rows.h"

namespace mlcontrast {
namespace update_prototypes {

inline void check_inputs(const at::Tensor& prototypes, const at::Tensor& features, const at::Tensor& labels,
                         double momentum) {
  MLC_CHECK_FLOAT(prototypes);
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_INDEX(labels);
  MLC_CHECK_DIM(prototypes, 2);
  MLC_CHECK_DIM(features, 2);
  MLC_CHECK_DIM(labels, 1);
  TORCH_CHECK(features.size(1) == prototypes.size(1), "features must be [N, ", prototypes.size(1), "], got ",
              features.sizes());
  TORCH_CHECK(labels.size(0) == features.size(0), "labels must have N = ", features.size(0), " entries, got ",
              labels.size(0));
  TORCH_CHECK(momentum >= 0 && momentum <= 1, "momentum must lie in [0, 1], got ", momentum);
}

// The update, given class_totals(y, z, C) -> (counts [C] int64, sums [C, D] in the compute dtype) of
// the valid rows' labels y and features z (in their own dtype, contiguous: the CUDA sums read 16-bit
// rows without an fp32 copy).
template <class ClassTotals>
void ema_(at::Tensor& prototypes, const at::Tensor& features, const at::Tensor& labels, double momentum, bool normalize,
          ClassTotals class_totals) {
  const int64_t c = prototypes.size(0);
  // Rows with label -1 are dropped; when there are none, the features are used without a copy.
  const auto index = valid_rows(labels);
  const auto y = gather_rows(labels, index);
  if (y.numel() == 0) return;
  check_labels_below(y, c);
  const auto z = gather_rows(features.detach(), index);

  at::Tensor counts, sums;
  std::tie(counts, sums) = class_totals(y, z, c);
  const auto dtype = sums.scalar_type();
  const auto present = counts.nonzero().squeeze(1);
  const auto mean = sums.index_select(0, present) / counts.index_select(0, present).to(dtype).unsqueeze(1);
  auto updated = prototypes.index_select(0, present).to(dtype).mul_(momentum).add_(mean, 1.0 - momentum);
  if (normalize) updated = unit_rows(updated).unit;
  prototypes.index_copy_(0, present, updated.to(prototypes.scalar_type()));
}

}  // namespace update_prototypes
}  // namespace mlcontrast
