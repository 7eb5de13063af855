// multihot_supcon maths that a backend runs with ATen around its O(R^2 D) tile passes (the CPU kernel:
// csrc/cpu/multihot_supcon.cpp): the argument checks, the outputs from the row statistics, the weights
// of the backward, and the "mulsupcon" positives through class sums (O(R C D), never R x R).
//
// Rows i of the contrast set (R rows; the anchors are [anchor_start, anchor_stop)), label sets y_i (the
// nonzero entries of the uint8 targets), s_ij = z_i.z_j / t, LSE_i = log sum_{j != i} e^{s_ij}:
//   "jaccard", "any", "all": positive pairs P(i) with weights w_ij (o_ij = |y_i & y_j|, u_ij = |y_i | y_j|:
//       jaccard w = o/u, positive when w >= threshold; any w = 1 when o > 0; all w = 1 when y_j = y_i),
//       count_i = |P(i)|, coef_i = sum_p w_ip / count_i, b_i = sum_p w_ip s_ip / count_i;
//   "mulsupcon": the valid labels c of y_i are those of at least two rows (n_c >= 2),
//       count_i = coef_i = their number, b_i = sum_{valid c} (z_i.M_c - |z_i|^2) / (t (n_c - 1)),
//       M_c = sum_{p : c in y_p} z_p;
//   loss_i = (t / t_base) (coef_i LSE_i - b_i) when count_i > 0, else 0.
#pragma once

#include <c10/util/string_view.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "shared/checks_and_rows.h"

namespace mlcontrast {
namespace multihot_supcon {

enum class Positives { kJaccard, kAny, kAll, kMulSupCon };

inline Positives parse_positives(c10::string_view name) {
  if (name == "jaccard") return Positives::kJaccard;
  if (name == "any") return Positives::kAny;
  if (name == "all") return Positives::kAll;
  if (name == "mulsupcon") return Positives::kMulSupCon;
  TORCH_CHECK(false, "positives must be one of 'jaccard', 'any', 'all', 'mulsupcon', got '", std::string(name), "'");
}

// The scalar arguments of a call, checked, with the anchors resolved to [begin, end).
struct Options {
  double temperature = 1.0;
  double base_temperature = 1.0;
  Positives positives = Positives::kJaccard;
  double threshold = 0.5;
  int64_t begin = 0;
  int64_t end = 0;
  int64_t grad_end = 0;  // rows below it take their contrast role's gradient (grad_stop; R when None)

  bool pairs() const { return positives != Positives::kMulSupCon; }
  int64_t anchors() const { return end - begin; }
  // The rows that take any gradient: the anchors and the rows below grad_end; the rest get 0 and no work.
  int64_t rows_with_grad() const { return std::max(end, grad_end); }
};

inline Options check_inputs(const at::Tensor& features, const at::Tensor& targets, double temperature,
                            double base_temperature, c10::string_view positives, double threshold,
                            int64_t anchor_start, std::optional<int64_t> anchor_stop,
                            std::optional<int64_t> grad_stop) {
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_DIM(features, 2);
  MLC_CHECK_DIM(targets, 2);
  TORCH_CHECK(targets.scalar_type() == at::kByte, "targets must be uint8 (1 = label present), got ",
              targets.scalar_type());
  const int64_t n = features.size(0);
  TORCH_CHECK(targets.size(0) == n, "targets must have R = ", n, " rows, got ", targets.size(0));
  TORCH_CHECK(temperature > 0 && base_temperature > 0, "temperature and base_temperature must be > 0, got ",
              temperature, " and ", base_temperature);
  Options o;
  o.temperature = temperature;
  o.base_temperature = base_temperature;
  o.positives = parse_positives(positives);
  o.threshold = threshold;
  TORCH_CHECK(o.positives != Positives::kJaccard || (threshold > 0 && threshold <= 1),
              "threshold must lie in (0, 1], got ", threshold);
  o.begin = anchor_start;
  o.end = anchor_stop.value_or(n);
  TORCH_CHECK(0 <= o.begin && o.begin <= o.end && o.end <= n,
              "anchor rows must satisfy 0 <= anchor_start <= anchor_stop <= R = ", n, ", got ", anchor_start, " and ",
              o.end);
  o.grad_end = grad_stop.value_or(n);
  TORCH_CHECK(0 <= o.grad_end && o.grad_end <= n, "grad_stop must satisfy 0 <= grad_stop <= R = ", n, ", got ",
              o.grad_end);
  return o;
}

// The backward's per-row inputs must cover the R rows.
inline void check_backward_rows(const at::Tensor& grad_rows, const at::Tensor& lse, const at::Tensor& coef,
                                const at::Tensor& count, int64_t n) {
  check_row_inputs(grad_rows, lse, coef, "coef", n);
  TORCH_CHECK(count.numel() == n, "count must have R = ", n, " entries, got ", count.numel());
}

// (loss, lse, coef, count), each [R], from the row statistics (all [R], 0 outside the anchors; lse -inf
// for an anchor with nothing to contrast with, where count is 0 too).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs(const at::Tensor& lse, const at::Tensor& coef,
                                                                          const at::Tensor& count, const at::Tensor& b,
                                                                          const Options& o) {
  // where(), not a product with the mask: coef * lse is NaN (0 * -inf) for a row with nothing to contrast.
  auto loss = at::where(count.gt(0), (coef * lse - b).mul_(o.temperature / o.base_temperature), at::zeros_like(lse));
  return {loss, lse, coef, count};
}

// The class sums of "mulsupcon": O(R C + C D) memory.
struct ClassTerms {
  at::Tensor y;     // [R, C] compute dtype: 1 where row i has label c
  at::Tensor inv;   // [C] 1 / (n_c - 1) for the labels of at least two rows, 0 for the others
  at::Tensor sums;  // [C, D] M_c = sum_{p : c in y_p} z_p
};

inline ClassTerms class_terms(const at::Tensor& z, const at::Tensor& targets) {
  ClassTerms k;
  k.y = targets.ne(0).to(z.scalar_type());
  const auto n = k.y.sum(0);
  k.inv = at::where(n.ge(2), n.sub(1).clamp_min(1).reciprocal(), at::zeros_like(n));
  k.sums = at::matmul(k.y.t(), z);
  return k;
}

// "mulsupcon"'s (count, b) of every row, 0 outside the anchors:
//   b_i = (1 / t) sum_c y_ic v_c (z_i.M_c - |z_i|^2), v_c = inv[c], through one [K, C] product Z_a M^T.
inline std::tuple<at::Tensor, at::Tensor> mulsupcon_positives(const ClassTerms& k, const at::Tensor& z,
                                                              const Options& o) {
  auto count = at::zeros({z.size(0)}, z.options());
  auto b = at::zeros_like(count);
  if (o.anchors() == 0) return {count, b};
  const auto y_a = k.y.narrow(0, o.begin, o.anchors());
  const auto z_a = z.narrow(0, o.begin, o.anchors());
  const auto yv = y_a * k.inv;  // y_ic / (n_c - 1) on the valid labels
  count.narrow(0, o.begin, o.anchors()).copy_(y_a.mv(k.inv.gt(0).to(z.scalar_type())));
  const auto logits = (yv * at::mm(z_a, k.sums.t())).sum(1);
  const auto self = yv.sum(1) * z_a.square().sum(1);
  b.narrow(0, o.begin, o.anchors()).copy_((logits - self).mul_(1.0 / o.temperature));
  return {count, b};
}

// The incoming gradient on the R rows, 0 outside the anchors (whose loss is the constant 0).
inline at::Tensor anchor_grads(const at::Tensor& grad_rows, const Options& o, at::ScalarType dtype) {
  auto g = grad_rows.detach().to(dtype).reshape({-1});
  if (o.begin == 0 && o.end == g.size(0)) return g.contiguous();
  auto out = at::zeros_like(g, at::MemoryFormat::Contiguous);
  out.narrow(0, o.begin, o.anchors()).copy_(g.narrow(0, o.begin, o.anchors()));
  return out;
}

// Row weights of the backward, dL/ds_ij = a_i (coef_i e^{s_ij - LSE_i} - beta_ij), a_i = g_i (t / t_b) / t
// on the rows with positives (the 1/t of ds/dz included).
struct BackwardWeights {
  at::Tensor a;     // a_i, 0 where count_i = 0
  at::Tensor soft;  // a_i coef_i: the weight of row i's softmax term
  at::Tensor lse;   // the LSE, +inf where soft = 0 so that the softmax terms of row i vanish exactly
  at::Tensor pair;  // a_i / count_i: beta_ij = w_ij / count_i for the pair modes
};

inline BackwardWeights backward_weights(const at::Tensor& g, const at::Tensor& lse, const at::Tensor& coef,
                                        const at::Tensor& count, const Options& o) {
  const auto has_pos = count.gt(0);
  const auto zero = at::zeros_like(g);
  BackwardWeights w;
  w.a = at::where(has_pos, g * (1.0 / o.base_temperature), zero).contiguous();
  w.soft = (w.a * coef).contiguous();
  w.lse = at::where(w.soft.ne(0), lse, at::full_like(lse, std::numeric_limits<double>::infinity())).contiguous();
  w.pair = (w.a / count.clamp_min(1)).contiguous();
  return w;
}

// d/dZ of sum_i a_i t b_i for "mulsupcon" (subtracted from the softmax part). With B_ip = sum_c y_ic y_pc v_c,
// t b_i = sum_{p != i} B_ip z_i.z_p, so the gradient at row k is
//   a_k (((Y v) M)_k - q_k z_k)   (its own loss; a = 0 off the anchors)
//   + ((Y v) A)_k - a_k q_k z_k   (its contrast role, only below grad_end),
// A_c = sum_i y_ic a_i z_i, q_k = sum_c y_kc v_c.
inline at::Tensor mulsupcon_positive_grad(const ClassTerms& k, const at::Tensor& z, const at::Tensor& a,
                                          int64_t grad_end) {
  const auto yv = k.y * k.inv;
  const auto a_column = a.unsqueeze(1);
  const auto self_weight = (a * yv.sum(1)).unsqueeze(1);
  auto grad = at::mm(yv, k.sums).mul_(a_column);
  grad.addcmul_(z, self_weight, -1);
  if (grad_end > 0) {
    const auto weighted = at::matmul(k.y.t(), z * a_column);  // A: [C, D]
    auto side = grad.narrow(0, 0, grad_end);
    side.add_(at::mm(yv.narrow(0, 0, grad_end), weighted));
    side.addcmul_(z.narrow(0, 0, grad_end), self_weight.narrow(0, 0, grad_end), -1);
  }
  return grad;
}

}  // namespace multihot_supcon
}  // namespace mlcontrast
