// label_supcon math that both backends run with ATen (csrc/cpu/label_supcon.cpp,
// csrc/cuda/label_supcon_api.cpp); each backend brings the O(N^2 D) parts (the self-excluded row
// LSE and its gradient) and the per-class sums.
//
// For valid rows i (label >= 0), with s_ij = z_i.z_j / t:
//   l_i = (t / t_base) * (LSE_{j != i} s_ij - mean_{p in P(i)} s_ip)      when P(i) is not empty.
// The positive term goes through per-class feature sums: sum_{p in P(i)} z_p = M_{y_i} - z_i, so it
// costs O(N D).
//
// Anchors: only the rows anchor_start .. anchor_stop get a loss (the others stay in every anchor's
// contrast set, with loss 0). A process_group call makes its own rows the anchors of the gathered
// set, so that each rank pays for its rows against all rows, not for the whole N x N.
#pragma once

#include <limits>
#include <optional>
#include <tuple>

#include "shared/checks_and_rows.h"

namespace mlcontrast {
namespace label_supcon {

// The anchor rows as given to an op: [start, stop), stop = N when absent.
struct AnchorArgs {
  int64_t start = 0;
  std::optional<int64_t> stop;
};

inline void check_inputs(const at::Tensor& features, const at::Tensor& labels, const AnchorArgs& anchors) {
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_INDEX(labels);
  MLC_CHECK_DIM(features, 2);
  MLC_CHECK_DIM(labels, 1);
  const int64_t n = features.size(0);
  TORCH_CHECK(labels.size(0) == n, "labels must have N = ", n, " entries, got ", labels.size(0));
  const int64_t stop = anchors.stop.value_or(n);
  TORCH_CHECK(0 <= anchors.start && anchors.start <= stop && stop <= n,
              "anchor rows must satisfy 0 <= anchor_start <= anchor_stop <= N = ", n, ", got ", anchors.start,
              " and ", stop);
}

// The anchors [begin, end) among the valid rows (the kernels see only those), from the anchor rows
// among all rows. Valid rows keep their order, so the anchors stay one contiguous range.
struct Anchors {
  int64_t begin = 0;
  int64_t end = 0;
};

inline Anchors valid_anchors(const at::Tensor& labels, const at::Tensor& index, int64_t valid_count,
                             const AnchorArgs& args) {
  const int64_t n = labels.size(0), stop = args.stop.value_or(n);
  if (!index.defined()) return {args.start, stop};
  // Valid rows before a position (a host sync, as valid_rows already made one).
  auto before = [&](int64_t position) {
    return position >= n ? valid_count : labels.narrow(0, 0, position).ge(0).sum().item<int64_t>();
  };
  return {before(args.start), before(stop)};
}

// The forward's outputs (loss, lse, n_pos) when every row is ignored: no loss, no positives, and an
// LSE that backward never reads.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs_without_valid_rows(const at::Tensor& features) {
  auto zeros = at::zeros({features.size(0)}, features.options().dtype(compute_dtype(features)));
  return {zeros, zeros.clone(), zeros.clone()};
}

// |P(i)| of each valid row: the other rows of its class.
inline at::Tensor positives(const ClassSums& s, at::ScalarType dtype) {
  return s.counts.index_select(0, s.inverse).sub_(1).to(dtype);
}

// The forward's outputs (loss, lse, n_pos) for all n rows (0 on the rows that `index` leaves out and
// on the valid rows outside the anchors) from the LSE of the anchors, lse[a.begin : a.end] (compute
// dtype), the valid rows' features z (compute dtype, or 16-bit: the ops promote) and class sums; rows
// without positives have no loss.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs(const at::Tensor& lse, const at::Tensor& z,
                                                              const ClassSums& s, const Anchors& a,
                                                              const at::Tensor& index, int64_t n, double temperature,
                                                              double base_temperature) {
  const int64_t count = a.end - a.begin;
  const auto n_pos = positives(s, lse.scalar_type()).narrow(0, a.begin, count);
  const auto z_a = z.narrow(0, a.begin, count);
  // sum_{p in P(i)} s_ip = z_i . (M_{y_i} - z_i) / t, through one [count, D] temporary.
  auto others = s.sums.index_select(0, s.inverse.narrow(0, a.begin, count));
  const auto pos_logit_sum = others.sub_(z_a).mul_(z_a).sum(1).mul_(1.0 / temperature);
  const auto lse_a = lse.narrow(0, a.begin, count);
  const double scale = temperature / base_temperature;
  const auto loss_a =
      at::where(n_pos.gt(0), (lse_a - pos_logit_sum / n_pos.clamp_min(1)) * scale, at::zeros_like(lse_a));
  auto loss = at::zeros_like(lse);
  loss.narrow(0, a.begin, count).copy_(loss_a);
  auto positives_out = at::zeros_like(lse);
  positives_out.narrow(0, a.begin, count).copy_(n_pos);
  return {scatter_rows(loss, index, n), scatter_rows(lse, index, n), scatter_rows(positives_out, index, n)};
}

// A per-row input of the backward (grad_rows, the saved LSE and positive counts) on the valid rows, in
// the compute dtype.
inline at::Tensor valid_values(const at::Tensor& t, const at::Tensor& index, at::ScalarType dtype) {
  return gather_rows(t.detach().to(dtype).reshape({-1}), index);
}

// The incoming gradient of the valid rows, 0 outside the anchors (whose loss is the constant 0).
inline at::Tensor anchor_grads(const at::Tensor& grad_rows, const at::Tensor& index, const Anchors& a,
                               at::ScalarType dtype) {
  auto g = valid_values(grad_rows, index, dtype);
  if (a.begin == 0 && a.end == g.size(0)) return g;
  auto out = at::zeros_like(g);
  out.narrow(0, a.begin, a.end - a.begin).copy_(g.narrow(0, a.begin, a.end - a.begin));
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

// Subtracts the gradient of the positive term from dz (the softmax part's gradient). d/dz_k of
// -sum_i a_i z_i.(M_{y_i} - z_i) is a_k (M_{y_k} - z_k) from row k, plus
// sum_{i in class y_k, i != k} a_i z_i = A_{y_k} - a_k z_k from the rows that have k as a positive;
// `weighted` holds the class sums A_c of a_i z_i, summed by the backend like s.sums. In place, with one
// [Nv, D] scratch in dz's dtype (`scratch`, reused when given); z may be 16-bit (the ops promote).
inline void subtract_positive_term_(at::Tensor& dz, const at::Tensor& z, const at::Tensor& a, const ClassSums& s,
                                    const at::Tensor& weighted, at::Tensor scratch = at::Tensor()) {
  const auto a_column = a.unsqueeze(1);
  if (!scratch.defined()) scratch = at::empty_like(dz);
  at::index_select_out(scratch, s.sums, 0, s.inverse);
  dz.addcmul_(scratch, a_column, -1);  // - a_k M_{y_k}
  dz.addcmul_(z, a_column, 2);         // + 2 a_k z_k
  at::index_select_out(scratch, weighted, 0, s.inverse);
  dz.sub_(scratch);  // - A_{y_k}
}

}  // namespace label_supcon
}  // namespace mlcontrast
