// The per-class sums of the CPU kernels, and their device check (MLC_CHECK_CPU). The device-agnostic
// code (compute dtype, unit rows, shape checks) is the CUDA backend's too, in shared/checks_and_rows.h;
// the CUDA backend's per-class sums are cuda/class_sums.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "shared/checks_and_rows.h"

namespace mlcontrast {
namespace cpu {

#define MLC_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")

// The classes of the valid rows and their feature sums M_c, with ATen's index_add_ (the CUDA
// backend sums with its own kernel instead, because the CUDA index_add_ uses float atomics).
inline ClassSums class_sums(const at::Tensor& z, const at::Tensor& labels) {
  auto uniq = at::_unique2(labels, /*sorted=*/false, /*return_inverse=*/true, /*return_counts=*/true);
  ClassSums out;
  out.inverse = std::get<1>(uniq).reshape({-1});
  out.counts = std::get<2>(uniq);
  out.sums = at::zeros({out.counts.size(0), z.size(1)}, z.options()).index_add_(0, out.inverse, z);
  return out;
}

}  // namespace cpu
}  // namespace mlcontrast
