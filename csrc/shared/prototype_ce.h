// prototype_ce math that both backends run with ATen (csrc/cpu/prototype_ce.cpp,
// csrc/cuda/prototype_ce_api.cpp), block of rows by block of rows; each backend brings its own
// blocking (parallel blocks of 256 rows on the CPU, large chunks in stream order on CUDA) and the
// chain rule of the normalisation in the backward.
//
// u_ic = cos(z_i, p_c) / t,  l_i = LSE_c u_ic - u_{i,y_i}  for rows with y_i >= 0 (0 otherwise).
// Only a block of logits exists at a time, and only the row LSE and the clamped row norm are saved
// for backward, which recomputes the logits.
#pragma once

#include <tuple>

#include "shared/checks_and_rows.h"

namespace mlcontrast {
namespace prototype_ce {

inline void check_inputs(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes) {
  MLC_CHECK_FLOAT(features);
  MLC_CHECK_FLOAT(prototypes);
  MLC_CHECK_INDEX(labels);
  MLC_CHECK_DIM(features, 2);
  MLC_CHECK_DIM(labels, 1);
  MLC_CHECK_DIM(prototypes, 2);
  TORCH_CHECK(labels.size(0) == features.size(0), "labels must have N = ", features.size(0), " entries, got ",
              labels.size(0));
  TORCH_CHECK(prototypes.size(1) == features.size(1), "prototypes must be [C, ", features.size(1), "], got ",
              prototypes.sizes());
  TORCH_CHECK(prototypes.size(0) > 0, "prototypes must hold at least one class");
}

// The prototypes and labels in the compute dtype, with the temperature folded into the prototypes.
struct ClassOperands {
  UnitRows protos;  // the prototypes' unit rows
  at::Tensor p;     // protos.unit / t, contiguous
  at::Tensor y;     // the labels, contiguous
};

inline ClassOperands class_operands(const at::Tensor& labels, const at::Tensor& prototypes, double temperature,
                                    at::ScalarType dtype) {
  ClassOperands o;
  o.protos = unit_rows(to_compute(prototypes, dtype));
  o.p = (o.protos.unit * (1.0 / temperature)).contiguous();
  o.y = labels.contiguous();
  return o;
}

// The features, never normalised in memory: the logits of a block of rows are the GEMM of its raw
// rows with the prototypes, scaled row by row by 1 / max(|z_i|, eps). That saves the [N, D] unit rows
// in the forward and, in the backward, the unit rows and the [N, D] temporaries of their chain rule.
struct FeatureRows {
  at::Tensor z;          // [N, D] the features in their own dtype, contiguous
  at::Tensor norm;       // [N, 1] compute dtype: max(|z_i|, eps), the forward's third output
  at::Tensor inv_norm;   // [N, 1] compute dtype: 1 / max(|z_i|, eps)
  at::Tensor above;      // [N, 1] compute dtype: |z_i| > eps, where the norm depends on z_i
  at::ScalarType dtype;  // the compute dtype

  // Rows i0 .. i0 + rows in the compute dtype: a view of fp32 (fp64) features, a copy of the block for
  // 16-bit ones.
  at::Tensor block(int64_t i0, int64_t rows) const { return z.narrow(0, i0, rows).to(dtype); }
};

// From the clamped norms max(|z_i|, eps) ([N] or [N, 1]): the forward computes them, the backward
// takes the ones the forward saved (no pass over the features). max(|z|, eps) > eps exactly where
// |z| > eps.
inline FeatureRows feature_rows(const at::Tensor& features, const at::Tensor& clamped_norm, at::ScalarType dtype) {
  FeatureRows f;
  f.z = features.detach().contiguous();
  f.dtype = dtype;
  f.norm = clamped_norm.detach().to(dtype).reshape({-1, 1}).contiguous();
  f.inv_norm = f.norm.reciprocal();
  f.above = f.norm.gt(kNormEps).to(dtype);
  return f;
}

inline FeatureRows feature_rows(const at::Tensor& features, at::ScalarType dtype) {
  const auto norm = at::linalg_vector_norm(features.detach(), 2, {-1}, /*keepdim=*/true, dtype);
  return feature_rows(features, norm.clamp_min(kNormEps), dtype);
}

// The logits of rows i0 .. i0 + out.size(0), whose compute-dtype block is zb, into `out`.
inline void block_logits(const ClassOperands& o, const FeatureRows& f, const at::Tensor& zb, int64_t i0,
                         at::Tensor& out) {
  at::mm_out(out, zb, o.p.t());
  out.mul_(f.inv_norm.narrow(0, i0, out.size(0)));
}

// Writes the row LSE and the loss of the rows i0 .. i0 + logits.size(0) from their logits.
inline void forward_block(const ClassOperands& o, const at::Tensor& logits, int64_t i0, const at::Tensor& lse,
                          const at::Tensor& loss) {
  const int64_t rows = logits.size(0);
  auto lse_b = lse.narrow(0, i0, rows);
  at::logsumexp_out(lse_b, logits, {1});
  const auto y_b = o.y.narrow(0, i0, rows);
  const auto target = logits.gather(1, y_b.clamp_min(0).unsqueeze(1)).squeeze(1);
  loss.narrow(0, i0, rows).copy_(at::where(y_b.ge(0), lse_b - target, at::zeros_like(target)));
}

// The backward's per-row inputs in the compute dtype: the incoming gradient, 0 on ignored rows so
// that they contribute nothing, and the saved row LSE.
struct RowGrads {
  at::Tensor g;    // [N]
  at::Tensor lse;  // [N]
};

inline RowGrads row_grads(const ClassOperands& o, const at::Tensor& grad_rows, const at::Tensor& lse) {
  const auto dtype = o.p.scalar_type();
  RowGrads r;
  r.g = at::where(o.y.ge(0), grad_rows.detach().to(dtype).reshape({-1}), at::zeros({}, o.p.options())).contiguous();
  r.lse = lse.detach().to(dtype).reshape({-1}).contiguous();
  return r;
}

// In place on the logits of the rows i0 .. i0 + logits.size(0): g_i softmax_ic, which is
// d loss / d u_ic = g_i (softmax_ic - [c == y_i]) but for the label column, left to the caller.
// Returns g of the block as a column.
inline at::Tensor softmax_part_(const RowGrads& r, at::Tensor& logits, int64_t i0) {
  const int64_t rows = logits.size(0);
  auto g_b = r.g.narrow(0, i0, rows).unsqueeze(1);
  logits.sub_(r.lse.narrow(0, i0, rows).unsqueeze(1)).exp_().mul_(g_b);
  return g_b;
}

// In place on g, the gradient of the unit rows x = z s (s = 1 / max(|z|, eps)) of the block zb at
// rows i0: (g - x (x . g) [|z| > eps]) s, the gradient through the normalisation. ATen form, with two
// block-sized temporaries (the CPU backend has a one-pass loop for it).
inline void through_normalisation_(const FeatureRows& f, const at::Tensor& zb, int64_t i0, at::Tensor& g) {
  const int64_t rows = g.size(0);
  const auto s = f.inv_norm.narrow(0, i0, rows);
  const auto radial = (zb * g).sum(1, /*keepdim=*/true).mul_(s).mul_(f.above.narrow(0, i0, rows));  // x . g
  g.sub_(zb * (s * radial)).mul_(s);
}

// Backward of the block of rows i0 .. i0 + d.size(0): d_ic = d loss / d u_ic from the recomputed
// logits (d is the block's [rows, C] scratch); G = d P, the gradient of the block's unit rows, goes
// through the normalisation straight in grad_z_block (its rows of the features' gradient, compute
// dtype); d loss / d p_c = sum_i d_ic x_i = sum_i (d_ic s_i) z_i (p = unit prototypes / t) is added
// to grad_p. `normalise(zb, i0, g)` applies the normalisation's chain rule in place on g.
template <class Normalise>
void backward_block(const ClassOperands& o, const FeatureRows& f, const RowGrads& r, int64_t i0, at::Tensor& d,
                    at::Tensor& grad_z_block, const at::Tensor& grad_p, Normalise normalise) {
  const int64_t rows = d.size(0);
  const auto zb = f.block(i0, rows);
  block_logits(o, f, zb, i0, d);
  const auto g_b = softmax_part_(r, d, i0);
  // The label column: one entry per row (an ignored row adds its g = 0 to column 0), so no two adds
  // meet and the result does not depend on their order.
  d.scatter_add_(1, o.y.narrow(0, i0, rows).clamp_min(0).unsqueeze(1), -g_b);
  at::mm_out(grad_z_block, d, o.p);
  normalise(zb, i0, grad_z_block);
  grad_p.addmm_(d.mul_(f.inv_norm.narrow(0, i0, rows)).t(), zb);
}

// The gradient of the prototypes, in their dtype, from grad_p = sum over the blocks of the above.
inline at::Tensor prototype_grad(const ClassOperands& o, const at::Tensor& grad_p, double temperature,
                                 const at::Tensor& prototypes) {
  return unit_rows_backward(grad_p * (1.0 / temperature), o.protos).to(prototypes.scalar_type());
}

}  // namespace prototype_ce
}  // namespace mlcontrast
