// prototype_ce math that both backends run with ATen (csrc/cpu/prototype_ce.cpp,
// csrc/cuda/prototype_ce_api.cpp), block of rows by block of rows; each backend brings its own
// blocking, the logits GEMM of a block and the subtraction of the label column in the backward.
//
// u_ic = cos(z_i, p_c) / t,  l_i = LSE_c u_ic - u_{i,y_i}  for rows with y_i >= 0 (0 otherwise).
// Only a block of logits exists at a time, and only the row LSE is saved for backward, which
// recomputes the logits.
#pragma once

#include <tuple>

#include "shared/common.h"

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

// With the features' unit rows too: the logits of rows i0 .. i0 + rows are z.unit[i0 : i0 + rows] p^T.
struct Operands : ClassOperands {
  UnitRows z;  // the features' unit rows
};

inline Operands operands(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes,
                         double temperature) {
  const auto dtype = compute_dtype(features, prototypes);
  Operands o;
  static_cast<ClassOperands&>(o) = class_operands(labels, prototypes, temperature, dtype);
  o.z = unit_rows(to_compute(features, dtype));
  return o;
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

// From d loss / d u of the rows i0 .. i0 + dlogits.size(0): writes their rows of the gradient of
// the features' unit rows and adds their part of the gradient of the prototypes' unit rows.
inline void backward_block(const Operands& o, const at::Tensor& dlogits, int64_t i0, double temperature,
                           const at::Tensor& grad_unit_z, const at::Tensor& grad_unit_p) {
  const int64_t rows = dlogits.size(0);
  auto out = grad_unit_z.narrow(0, i0, rows);
  at::mm_out(out, dlogits, o.p);
  grad_unit_p.addmm_(dlogits.t(), o.z.unit.narrow(0, i0, rows), /*beta=*/1, /*alpha=*/1.0 / temperature);
}

// The gradients of the features and the prototypes, in their dtypes, from those of their unit rows.
inline std::tuple<at::Tensor, at::Tensor> input_grads(const Operands& o, const at::Tensor& grad_unit_z,
                                                      const at::Tensor& grad_unit_p, const at::Tensor& features,
                                                      const at::Tensor& prototypes) {
  return {unit_rows_backward(grad_unit_z, o.z).to(features.scalar_type()),
          unit_rows_backward(grad_unit_p, o.protos).to(prototypes.scalar_type())};
}

}  // namespace prototype_ce
}  // namespace mlcontrast
