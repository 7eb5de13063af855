// label_supcon math that both backends run with ATen (csrc/cpu/label_supcon.cpp,
// csrc/cuda/label_supcon_api.cpp); each backend brings the O(N^2 D) parts (the self-excluded row
// LSE and its gradient) and the per-class sums.
//
// For valid anchor rows i (label >= 0), with s_ij = z_i.z_j / t and A(i), P(i) as below:
//   l_i = (t / t_base) * (LSE_{j in A(i)} s_ij - mean_{p in P(i)} s_ip)      when P(i) is not empty.
// The positive term goes through per-class feature sums of the contrast rows:
// sum_{p in P(i)} z_p = M_{y_i} - [i a contrast row] z_i, so it costs O(N D).
//
// Roles of the rows (R rows, the contrast set of a process_group call plus any reference rows):
// * anchors: only the rows anchor_start .. anchor_stop get a loss. A process_group call makes its own
//   rows the anchors of the gathered set, so that each rank pays for its rows against all rows, not for
//   the whole R x R.
// * contrast rows: the valid rows from contrast_start on; A(i) = the contrast rows j != i, P(i) = those
//   of i's label. Rows before contrast_start may still be anchors (rectangular work: a batch against a
//   memory).
// * gradients: the anchors get the gradient of their own loss (through z_i); a row j gets the gradient
//   of its terms in the other anchors' losses (its contrast role) only if j < grad_stop. Rows that are
//   neither get 0 and cost no work (a detached queue costs no gradient FLOPs).
#pragma once

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "shared/checks_and_rows.h"

namespace mlcontrast {
namespace label_supcon {

// The roles as given to an op (stops: N when absent).
struct RoleArgs {
  int64_t anchor_start = 0;
  std::optional<int64_t> anchor_stop;
  int64_t contrast_start = 0;
  std::optional<int64_t> grad_stop;
};

inline void check_inputs(const at::Tensor& features, const at::Tensor& labels, const RoleArgs& roles) {
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_INDEX(labels);
  MLC_CHECK_DIM(features, 2);
  MLC_CHECK_DIM(labels, 1);
  const int64_t n = features.size(0);
  TORCH_CHECK(labels.size(0) == n, "labels must have N = ", n, " entries, got ", labels.size(0));
  const int64_t stop = roles.anchor_stop.value_or(n);
  TORCH_CHECK(0 <= roles.anchor_start && roles.anchor_start <= stop && stop <= n,
              "anchor rows must satisfy 0 <= anchor_start <= anchor_stop <= N = ", n, ", got ", roles.anchor_start,
              " and ", stop);
  TORCH_CHECK(0 <= roles.contrast_start && roles.contrast_start <= n,
              "contrast_start must satisfy 0 <= contrast_start <= N = ", n, ", got ", roles.contrast_start);
  const int64_t grad_stop = roles.grad_stop.value_or(n);
  TORCH_CHECK(0 <= grad_stop && grad_stop <= n, "grad_stop must satisfy 0 <= grad_stop <= N = ", n, ", got ",
              grad_stop);
}

// The roles among the valid rows (the kernels see only those), from the roles among all rows. Valid rows
// keep their order, so every role stays one contiguous range: anchors [begin, end), contrast rows
// [contrast_begin, Nv), rows with a contrast-role gradient [0, grad_end).
struct Roles {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t contrast_begin = 0;
  int64_t grad_end = 0;
};

inline Roles valid_roles(const at::Tensor& labels, const at::Tensor& index, int64_t valid_count,
                         const RoleArgs& args) {
  const int64_t n = labels.size(0), stop = args.anchor_stop.value_or(n), grad_stop = args.grad_stop.value_or(n);
  if (!index.defined()) return {args.anchor_start, stop, args.contrast_start, grad_stop};
  // Valid rows before a position (a host sync, as valid_rows already made one).
  auto before = [&](int64_t position) {
    if (position <= 0) return int64_t(0);
    return position >= n ? valid_count : labels.narrow(0, 0, position).ge(0).sum().item<int64_t>();
  };
  return {before(args.anchor_start), before(stop), before(args.contrast_start), before(grad_stop)};
}

// Per-class sums and counts of the contrast rows [contrast_begin, Nv) from the classes of all valid rows
// (`inverse`, K classes): counts by class; a class without contrast rows counts 0.
inline at::Tensor contrast_counts(const at::Tensor& inverse, int64_t classes, int64_t contrast_begin) {
  const int64_t nv = inverse.size(0);
  return at::bincount(inverse.narrow(0, contrast_begin, nv - contrast_begin), {}, classes);
}

// The forward's outputs (loss, lse, n_pos) when every row is ignored: no loss, no positives, and an
// LSE that backward never reads.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs_without_valid_rows(const at::Tensor& features) {
  auto zeros = at::zeros({features.size(0)}, features.options().dtype(compute_dtype(features)));
  return {zeros, zeros.clone(), zeros.clone()};
}

// The rows first .. last of t (dim 0), clamped to the rows there are.
inline at::Tensor row_range(const at::Tensor& t, int64_t first, int64_t last) {
  first = std::clamp<int64_t>(first, 0, t.size(0));
  return t.narrow(0, first, std::clamp<int64_t>(last, first, t.size(0)) - first);
}

// |P(i)| of the anchors: the contrast rows of their class but themselves. `s`: the sums and counts of the
// contrast rows (classes of all valid rows).
inline at::Tensor positives(const ClassSums& s, const Roles& r, at::ScalarType dtype) {
  auto counts = s.counts.index_select(0, s.inverse.narrow(0, r.begin, r.end - r.begin));
  row_range(counts, r.contrast_begin - r.begin, r.end - r.begin).sub_(1);  // the anchors among the contrast rows
  return counts.to(dtype);
}

// The forward's outputs (loss, lse, n_pos) for all n rows (0 on the rows that `index` leaves out and
// on the valid rows outside the anchors) from the LSE of the anchors, lse[r.begin : r.end] (compute
// dtype), the valid rows' features z (compute dtype, or 16-bit: the ops promote) and the class sums of
// the contrast rows; rows without positives have no loss.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs(const at::Tensor& lse, const at::Tensor& z,
                                                              const ClassSums& s, const Roles& r,
                                                              const at::Tensor& index, int64_t n, double temperature,
                                                              double base_temperature) {
  const int64_t count = r.end - r.begin;
  const auto n_pos = positives(s, r, lse.scalar_type());
  const auto z_a = z.narrow(0, r.begin, count);
  // sum_{p in P(i)} s_ip = z_i . (M_{y_i} - [i a contrast row] z_i) / t, through one [count, D] temporary.
  auto others = s.sums.index_select(0, s.inverse.narrow(0, r.begin, count));
  const int64_t own = r.contrast_begin - r.begin;
  row_range(others, own, count).sub_(row_range(z_a, own, count));
  const auto pos_logit_sum = others.mul_(z_a).sum(1).mul_(1.0 / temperature);
  const auto lse_a = lse.narrow(0, r.begin, count);
  const double scale = temperature / base_temperature;
  const auto loss_a =
      at::where(n_pos.gt(0), (lse_a - pos_logit_sum / n_pos.clamp_min(1)) * scale, at::zeros_like(lse_a));
  auto loss = at::zeros_like(lse);
  loss.narrow(0, r.begin, count).copy_(loss_a);
  auto positives_out = at::zeros_like(lse);
  positives_out.narrow(0, r.begin, count).copy_(n_pos);
  return {scatter_rows(loss, index, n), scatter_rows(lse, index, n), scatter_rows(positives_out, index, n)};
}

// A per-row input of the backward (grad_rows, the saved LSE and positive counts) on the valid rows, in
// the compute dtype.
inline at::Tensor valid_values(const at::Tensor& t, const at::Tensor& index, at::ScalarType dtype) {
  return gather_rows(t.detach().to(dtype).reshape({-1}), index);
}

// The incoming gradient of the valid rows, 0 outside the anchors (whose loss is the constant 0).
inline at::Tensor anchor_grads(const at::Tensor& grad_rows, const at::Tensor& index, const Roles& r,
                               at::ScalarType dtype) {
  auto g = valid_values(grad_rows, index, dtype);
  if (r.begin == 0 && r.end == g.size(0)) return g;
  auto out = at::zeros_like(g);
  out.narrow(0, r.begin, r.end - r.begin).copy_(g.narrow(0, r.begin, r.end - r.begin));
  return out;
}

// Row weights of the backward, from the valid rows' incoming gradient g and saved LSE.
struct BackwardWeights {
  at::Tensor w;    // weight of row i in the softmax part G_ij = w_i exp(s_ij - lse_i) + w_j exp(s_ij - lse_j)
  at::Tensor a;    // weight of each positive pair of row i
  at::Tensor lse;  // the LSE, +inf where w_i = 0 so that the softmax part's terms of row i vanish exactly
};

// n_pos: the forward's positive counts of the valid rows (0 outside the anchors, where g is 0 too).
inline BackwardWeights backward_weights(const at::Tensor& g, const at::Tensor& lse, const at::Tensor& n_pos,
                                        double temperature, double base_temperature) {
  const double inv_t = 1.0 / temperature, scale = temperature / base_temperature;
  const auto has_pos = n_pos.gt(0);
  const auto zero = at::zeros_like(g);
  BackwardWeights out;
  out.w = at::where(has_pos, g * (scale * inv_t), zero).contiguous();
  out.a = at::where(has_pos, g * (scale * inv_t) / n_pos.clamp_min(1), zero);
  out.lse = at::where(out.w.ne(0), lse, at::full_like(lse, std::numeric_limits<double>::infinity())).contiguous();
  return out;
}

// Subtracts the gradient of the positive term from dz (the softmax part's gradient of the first dz.size(0)
// valid rows, which must hold the anchors and the rows below grad_end: the others take none). With C the
// contrast rows and s their class sums M_c, d/dz_k of -sum_i a_i z_i.(M_{y_i} - [i in C] z_i) is
// a_k (M_{y_k} - [k in C] z_k) from row k's own loss (a = 0 off the anchors), plus, for the rows k in C
// below grad_end (those that take their contrast role's gradient),
// sum_{i in class y_k, i != k} a_i z_i = A_{y_k} - a_k z_k from the anchors that have k as a positive;
// `weighted` holds the class sums A_c of a_i z_i over all valid rows, summed by the backend like s.sums.
// In place, with one scratch of dz's shape and dtype (`scratch`, reused when given); z may be 16-bit (the
// ops promote).
inline void subtract_positive_term_(at::Tensor& dz, const at::Tensor& all_z, const at::Tensor& all_a,
                                    const ClassSums& s, const at::Tensor& weighted, const Roles& r,
                                    at::Tensor scratch = at::Tensor()) {
  const int64_t rows = dz.size(0), first = r.contrast_begin, last = std::max(first, std::min(r.grad_end, rows));
  const auto z = all_z.narrow(0, 0, rows);
  const auto a_column = all_a.narrow(0, 0, rows).unsqueeze(1);
  const auto inverse = s.inverse.narrow(0, 0, rows);
  if (!scratch.defined()) scratch = at::empty_like(dz);
  at::index_select_out(scratch, s.sums, 0, inverse);
  dz.addcmul_(scratch, a_column, -1);  // - a_k M_{y_k}
  // + a_k z_k twice on the contrast rows with a contrast-role gradient, once on the other contrast rows.
  row_range(dz, first, last).addcmul_(row_range(z, first, last), row_range(a_column, first, last), 2);
  row_range(dz, last, rows).addcmul_(row_range(z, last, rows), row_range(a_column, last, rows), 1);
  if (last == first) return;
  auto part = row_range(scratch, first, last);
  at::index_select_out(part, weighted, 0, row_range(inverse, first, last));
  row_range(dz, first, last).sub_(part);  // - A_{y_k}
}

}  // namespace label_supcon
}  // namespace mlcontrast
