// In-place EMA of class prototypes on the CPU (the update: shared/update_prototypes.h).
#include "class_sums.h"
#include "shared/update_prototypes.h"

#include <torch/library.h>

namespace mlcontrast {
namespace cpu {
namespace {

// index_add_ sums in the dtype of its operands: 16-bit rows are converted to fp32 first.
std::tuple<at::Tensor, at::Tensor> class_totals(const at::Tensor& y, const at::Tensor& z, int64_t c) {
  const auto zc = to_compute(z);
  return {at::bincount(y, {}, c), at::zeros({c, zc.size(1)}, zc.options()).index_add_(0, y, zc)};
}

void update_prototypes_cpu(at::Tensor& prototypes, const at::Tensor& features, const at::Tensor& labels,
                           double momentum, bool normalize) {
  MLC_KERNEL_GUARD();
  MLC_CHECK_CPU(prototypes);
  MLC_CHECK_CPU(features);
  MLC_CHECK_CPU(labels);
  update_prototypes::check_inputs(prototypes, features, labels, momentum);
  update_prototypes::ema_(prototypes, features, labels, momentum, normalize, class_totals);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) { m.impl("update_prototypes_", &update_prototypes_cpu); }

}  // namespace cpu
}  // namespace mlcontrast
