// The two O(N^2 D) passes of label_supcon on the CPU (label_supcon.cpp), over the valid rows z (compute
// dtype) with their roles r; label_supcon_queue.cpp runs them on the batch part of a batch-and-queue set.
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

}  // namespace cpu
}  // namespace mlcontrast
