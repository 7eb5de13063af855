// What label_supcon's CPU kernels (label_supcon.cpp) share with label_supcon_queue's (label_supcon_queue.cpp,
// which runs them on the batch part of a batch-and-queue set): the valid rows, the two O(N^2 D) tile passes
// over them with their roles r, and the backward's last steps.
#pragma once

#include <ATen/ATen.h>

#include "shared/label_supcon.h"

namespace mlcontrast {
namespace cpu {

// LSE_{j in A(i)} z_i.z_j / t of the anchors, A(i) the contrast rows [contrast_begin, Nv) but i; -inf for an
// anchor with no such row, 0 on the other rows. [Nv].
at::Tensor row_lse(const at::Tensor& z, double inv_t, const label_supcon::Roles& r);

// The softmax part of the gradient, H Z + H^T Z (the columns' side below grad_end), with
// H_ij = w_i exp(z_i.z_j / t - lse_i) over the same pairs; rows with w_i = 0 need lse_i = +inf. Returns the
// rows [0, max(anchor end, grad_end)) that take a gradient.
at::Tensor lse_grad(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& w, double inv_t,
                    const label_supcon::Roles& r);

// The valid rows (label >= 0) of an op's input, in the compute dtype.
struct ValidSet {
  at::Tensor index;   // undefined when all rows are valid
  at::Tensor z;       // [Nv, D] compute dtype
  at::Tensor labels;  // [Nv]
};

inline ValidSet gather_valid(const at::Tensor& features, const at::Tensor& labels) {
  ValidSet v;
  v.index = valid_rows(labels);
  v.z = gather_rows(to_compute(features), v.index);
  v.labels = gather_rows(labels, v.index);
  return v;
}

// The backward's last steps: the positive term subtracted from dz (the softmax part of the rows that take a
// gradient, lse_grad's rows), zero rows for the others (one fill, no work), and the gradient of the op's
// input rows in its dtype. `sums`: the class sums of the contrast rows.
inline at::Tensor finish_backward(at::Tensor dz, const ValidSet& v, const label_supcon::BackwardWeights& weights,
                                  const ClassSums& sums, const label_supcon::Roles& r, const at::Tensor& features) {
  const int64_t rows = dz.size(0);
  // The class sums A_c of a_i z_i (a = 0 off the anchors, which lie among those rows), through one scratch
  // that the positive term reuses.
  auto scratch = at::mul(v.z.narrow(0, 0, rows), weights.a.narrow(0, 0, rows).unsqueeze(1));
  const auto weighted = at::zeros_like(sums.sums).index_add_(0, sums.inverse.narrow(0, 0, rows), scratch);
  label_supcon::subtract_positive_term_(dz, v.z, weights.a, sums, weighted, r, scratch);
  if (rows < v.z.size(0)) {  // one zero fill for the rows without a gradient (a detached memory)
    auto full = at::empty({v.z.size(0), dz.size(1)}, dz.options());
    full.narrow(0, 0, rows).copy_(dz);
    full.narrow(0, rows, v.z.size(0) - rows).zero_();
    dz = full;
  }
  return scatter_rows(dz, v.index, features.size(0)).to(features.scalar_type());
}

}  // namespace cpu
}  // namespace mlcontrast
