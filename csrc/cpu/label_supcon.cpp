// Label-level supervised contrastive loss on the CPU, without an N x N matrix (the loss and its
// O(N D) positive term: shared/label_supcon.h).
//
// * S is symmetric, so both passes visit, among the anchors that are also contrast rows (and, in the
//   backward, take their contrast role's gradient), only the [128 x 512] tiles on and above the diagonal
//   and use each tile for its rows and its columns (tiles.h). Other columns (a process_group call's other
//   ranks' rows, reference rows) are visited once per anchor block, one-sided, and so are all columns by
//   the other anchors (rows before contrast_start; rows at or past grad_stop in the backward): the
//   rectangular work of a batch against a memory. The backward gives the one-sided tiles' columns their
//   side (H^T Z) only below grad_stop, so a detached memory costs the row side alone.
// * Forward: the log-sum-exp keeps an online max and sum per row, fed by the rows and the columns
//   of each tile: N^2 D flops for all rows as anchors.
// * Backward: recomputes each tile from the saved row LSE; dZ = (H + H^T) Z with
//   H_ij = w_i exp(s_ij - LSE_i), both products from the same tile: 3 N^2 D flops (6 N^2 D
//   without the symmetry). Only O(N) statistics (the LSE and the positive counts) are saved.
// Tile products go to BLAS through ATen (single-threaded inside the parallel region); the
// element-wise work is in vec_math.cpp, on scratch that stays in L2. Scratch is O(tile) per thread
// plus O(N) (forward) or O(N D) (backward) per worker, bounded by tiles::kAccumulatorBudgetBytes.
#include "class_sums.h"
#include "shared/label_supcon.h"
#include "label_supcon_tiles.h"
#include "tiles.h"
#include "vec_math.h"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace mlcontrast {
namespace cpu {
namespace {

using tiles::fill_diagonal;
using tiles::for_each_block;
using tiles::for_each_tile;
using tiles::kColBlock;
using tiles::kRowBlock;
using tiles::meets_diagonal;
using tiles::Plan;
using tiles::similarity_tile;
using tiles::Tile;
using tiles::triangle_workers;

using label_supcon::RoleArgs;
using label_supcon::Roles;

void check_arguments(const at::Tensor& features, const at::Tensor& labels, const RoleArgs& roles) {
  MLC_CHECK_CPU(features);
  MLC_CHECK_CPU(labels);
  label_supcon::check_inputs(features, labels, roles);
}

// LSE_{j in A(i)} z_i.z_j / t for every anchor row (0 on the other rows), A(i) the columns
// [col_begin, n) but i. Among the anchors that are columns, S is symmetric: only the tiles on and above
// the diagonal are computed, and each feeds an online log-sum-exp state of its rows and, through its
// columns, of the rows j it covers (tiles.h). Each worker keeps its own state for all rows; the states are
// merged at the end, exactly (no fixed shift, so no underflow for any temperature).
template <typename T>
void row_lse(const at::Tensor& z, double inv_t, const Plan& plan, const Roles& r, at::Tensor& lse) {
  const int64_t n = z.size(0);
  const int64_t workers = triangle_workers(plan.blocks(), 2 * n * int64_t(sizeof(T)));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> state_max(workers * n, neg_inf), state_sum(workers * n, T(0));

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({kRowBlock, kColBlock}, z.options());
    std::vector<T> col_scratch(2 * kColBlock);
    for (int64_t worker = w0; worker < w1; ++worker) {
      T* run_max = state_max.data() + worker * n;
      T* run_sum = state_sum.data() + worker * n;
      for_each_block(worker, workers, plan, [&](int64_t i0, int64_t rows, bool symmetric) {
        const auto zi = z.narrow(0, i0, rows);
        for_each_tile(i0, rows, symmetric, plan, [&](int64_t j0, int64_t cols, Tile tile) {
          auto s = scratch.narrow(0, 0, rows).narrow(1, 0, cols);
          similarity_tile(s, zi, z.narrow(0, j0, cols), inv_t);
          const T* sp = s.data_ptr<T>();
          if (meets_diagonal(i0, rows, j0, cols)) fill_diagonal(s, i0, j0, neg_inf);
          online_lse_update(sp, rows, cols, scratch.stride(0), run_max + i0, run_sum + i0);
          if (tile == Tile::kSymmetric) {
            online_lse_update_cols(sp, rows, cols, scratch.stride(0), run_max + j0, run_sum + j0, col_scratch.data());
          }
        });
      });
    }
  });

  T* out = lse.data_ptr<T>();
  for (int64_t i = r.begin; i < r.end; ++i) {
    T m = neg_inf;
    for (int64_t w = 0; w < workers; ++w) m = std::max(m, state_max[w * n + i]);
    if (m == neg_inf) {
      out[i] = neg_inf;  // a row with no other row to contrast with
      continue;
    }
    T sum = 0;
    for (int64_t w = 0; w < workers; ++w) sum += state_sum[w * n + i] * std::exp(state_max[w * n + i] - m);
    out[i] = m + std::log(sum);
  }
}

}  // namespace

at::Tensor row_lse(const at::Tensor& z, double inv_t, const Roles& r) {
  auto lse = at::zeros({z.size(0)}, z.options());
  // Every anchor that is a contrast row shares the symmetric tiles.
  const auto plan = tiles::plan(r, r.contrast_begin, z.size(0), z.size(0));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "row_lse", [&] { row_lse<scalar_t>(z, inv_t, plan, r, lse); });
  return lse;
}

namespace {

// dZ = H Z (the anchors' own losses) + H^T Z on the rows below grad_end (their contrast role), with
// H_ij = w_i exp(z_i.z_j / t - lse_i) for the anchors i and their contrast rows j, over the tiles of the
// plan: a symmetric tile holds H + H^T and serves both sides; a one-sided tile gives its columns H^T Z
// only below grad_end. Rows with w_i = 0 must have lse_i = +inf so that their terms vanish, and every row
// outside the anchors must have w_i = 0. Returns the rows that take a gradient, [max(anchor end, grad_end), D]:
// the rows after them (a detached memory) get 0 and cost nothing.
template <typename T>
at::Tensor lse_grad(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& w, double inv_t, const Plan& plan,
                    const Roles& r) {
  const int64_t n = z.size(0), d = z.size(1);
  // Only the anchors and the rows below grad_end take a gradient: the accumulators stop at the last of them.
  const int64_t rows_out = std::min(n, std::max(r.end, r.grad_end));
  const int64_t workers = triangle_workers(plan.blocks(), rows_out * d * z.element_size());
  // Each worker owns whole tile rows and accumulates into its own buffer, so no two threads write the
  // same memory and the result does not depend on scheduling. Worker 0's buffer becomes the result; the
  // others are added to it in order and freed.
  std::vector<at::Tensor> acc(workers);
  for (auto& buffer : acc) buffer = at::zeros({rows_out, d}, z.options());
  const T* lse_p = lse.data_ptr<T>();
  const T* w_p = w.data_ptr<T>();

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    MLC_KERNEL_GUARD();
    auto h_buf = at::empty({kRowBlock, kColBlock}, z.options());
    for (int64_t worker = w0; worker < w1; ++worker) {
      auto& dz = acc[worker];
      for_each_block(worker, workers, plan, [&](int64_t i0, int64_t rows, bool symmetric) {
        const auto zi = z.narrow(0, i0, rows);
        for_each_tile(i0, rows, symmetric, plan, [&](int64_t j0, int64_t cols, Tile tile) {
          const auto zj = z.narrow(0, j0, cols);
          auto h = h_buf.narrow(0, 0, rows).narrow(1, 0, cols);
          similarity_tile(h, zi, zj, inv_t);
          // Only symmetric tiles have column weights; rows outside the anchors have w = 0.
          const bool both_sides = tile == Tile::kSymmetric;
          softmax_weights(h.data_ptr<T>(), rows, cols, h_buf.stride(0), lse_p + i0, w_p + i0,
                          both_sides ? lse_p + j0 : nullptr, both_sides ? w_p + j0 : nullptr);
          if (meets_diagonal(i0, rows, j0, cols)) fill_diagonal(h, i0, j0, 0.0);
          dz.narrow(0, i0, rows).addmm_(h, zj);
          // The columns' side: every column of a symmetric tile; those below grad_end of the others.
          const int64_t side = both_sides ? cols : std::clamp<int64_t>(r.grad_end - j0, 0, cols);
          if (side > 0) dz.narrow(0, j0, side).addmm_(h.narrow(1, 0, side).t(), zi);
        });
      });
    }
  });
  for (int64_t worker = 1; worker < workers; ++worker) {
    acc[0].add_(acc[worker]);
    acc[worker] = at::Tensor();
  }
  return acc[0];
}

}  // namespace

at::Tensor lse_grad(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& w, double inv_t, const Roles& r) {
  // The symmetric anchors are contrast rows that take their contrast role's gradient.
  const auto plan = tiles::plan(r, r.contrast_begin, r.grad_end, z.size(0));
  at::Tensor dz;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "label_supcon_backward",
                             [&] { dz = lse_grad<scalar_t>(z, lse, w, inv_t, plan, r); });
  return dz;
}

namespace {

// The class sums M_c and counts of the contrast rows [contrast_begin, Nv), with the classes of all valid
// rows (an anchor's class may have no contrast row).
ClassSums contrast_class_sums(const at::Tensor& z, const at::Tensor& labels, int64_t contrast_begin) {
  if (contrast_begin == 0) return class_sums(z, labels);
  const int64_t nv = z.size(0);
  auto uniq = at::_unique2(labels, /*sorted=*/false, /*return_inverse=*/true, /*return_counts=*/false);
  ClassSums out;
  out.inverse = std::get<1>(uniq).reshape({-1});
  const int64_t classes = std::get<0>(uniq).size(0);
  out.counts = label_supcon::contrast_counts(out.inverse, classes, contrast_begin);
  out.sums = at::zeros({classes, z.size(1)}, z.options())
                 .index_add_(0, out.inverse.narrow(0, contrast_begin, nv - contrast_begin),
                             z.narrow(0, contrast_begin, nv - contrast_begin));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> label_supcon_cpu(const at::Tensor& features,
                                                                const at::Tensor& labels, double temperature,
                                                                double base_temperature, int64_t anchor_start,
                                                                std::optional<int64_t> anchor_stop,
                                                                int64_t contrast_start,
                                                                std::optional<int64_t> grad_stop) {
  MLC_KERNEL_GUARD();
  const RoleArgs args{anchor_start, anchor_stop, contrast_start, grad_stop};
  check_arguments(features, labels, args);
  const auto v = gather_valid(features, labels);
  if (v.z.size(0) == 0) return label_supcon::outputs_without_valid_rows(features);
  const auto r = label_supcon::valid_roles(labels, v.index, v.z.size(0), args);
  const auto lse = cpu::row_lse(v.z, 1.0 / temperature, r);
  return label_supcon::outputs(lse, v.z, contrast_class_sums(v.z, v.labels, r.contrast_begin), r, v.index,
                               features.size(0), temperature, base_temperature);
}

at::Tensor label_supcon_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& features,
                                     const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& n_pos,
                                     double temperature, double base_temperature, int64_t anchor_start,
                                     std::optional<int64_t> anchor_stop, int64_t contrast_start,
                                     std::optional<int64_t> grad_stop) {
  MLC_KERNEL_GUARD();
  const RoleArgs args{anchor_start, anchor_stop, contrast_start, grad_stop};
  check_arguments(features, labels, args);
  MLC_CHECK_CPU(grad_rows);
  MLC_CHECK_CPU(lse);
  MLC_CHECK_CPU(n_pos);
  check_row_inputs(grad_rows, lse, n_pos, "n_pos", features.size(0));
  const auto dtype = compute_dtype(features);
  const auto v = gather_valid(features, labels);
  if (v.z.size(0) == 0) return at::zeros_like(features);
  const auto r = label_supcon::valid_roles(labels, v.index, v.z.size(0), args);

  const auto g = label_supcon::anchor_grads(grad_rows, v.index, r, dtype);
  const auto sums = contrast_class_sums(v.z, v.labels, r.contrast_begin);
  const auto weights =
      label_supcon::backward_weights(g, label_supcon::valid_values(lse, v.index, dtype),
                                     label_supcon::valid_values(n_pos, v.index, dtype), temperature, base_temperature);
  auto dz = cpu::lse_grad(v.z, weights.lse, weights.w, 1.0 / temperature, r);  // the rows that take a gradient
  return finish_backward(dz, v, weights, sums, r, features);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) {
  m.impl("label_supcon", &label_supcon_cpu);
  m.impl("label_supcon_backward", &label_supcon_backward_cpu);
}

}  // namespace cpu
}  // namespace mlcontrast
