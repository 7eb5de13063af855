// Sample-to-prototype cross-entropy on the CPU, a fused linear cross-entropy with C classes (the
// loss: shared/prototype_ce.h). Row blocks are processed in parallel, each on its own scratch block
// of logits; the features' normalisation is folded into the blocks (no [N, D] temporaries).
#include "common.h"
#include "shared/prototype_ce.h"

#include <torch/library.h>

#include <algorithm>

namespace mlcontrast {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 256;

void check_inputs(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes) {
  MLC_CHECK_CPU(features);
  MLC_CHECK_CPU(labels);
  MLC_CHECK_CPU(prototypes);
  prototype_ce::check_inputs(features, labels, prototypes);
}

// The features' unit rows are never materialised: a block's logits are the GEMM of its raw rows with
// the prototypes, scaled row by row by 1 / max(|z_i|, eps). That saves the [N, D] unit rows in the
// forward and, in the backward, the unit rows and the [N, D] temporaries of their chain rule.
struct Inputs {
  prototype_ce::ClassOperands o;  // the prototypes and the labels
  at::Tensor z;                   // [N, D] the features in the compute dtype, contiguous
  at::Tensor inv_norm;            // [N, 1] 1 / max(|z_i|, eps)
  at::Tensor above;               // [N, 1] |z_i| > eps, in the compute dtype: where the norm depends on z_i
};

Inputs inputs(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& prototypes, double temperature) {
  const auto dtype = compute_dtype(features, prototypes);
  Inputs in;
  in.z = to_compute(features, dtype);
  const auto norm = at::linalg_vector_norm(in.z, 2, {-1}, /*keepdim=*/true);
  in.inv_norm = norm.clamp_min(kNormEps).reciprocal_();
  in.above = norm.gt(kNormEps).to(dtype);
  in.o = prototype_ce::class_operands(labels, prototypes, temperature, dtype);
  return in;
}

// The logits u of rows i0 .. i0 + out.size(0) into `out`: (z_i . p_c) / max(|z_i|, eps).
void block_logits(const Inputs& in, int64_t i0, at::Tensor& out) {
  const int64_t rows = out.size(0);
  at::mm_out(out, in.z.narrow(0, i0, rows), in.o.p.t());
  out.mul_(in.inv_norm.narrow(0, i0, rows));
}

std::tuple<at::Tensor, at::Tensor> prototype_ce_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                    const at::Tensor& prototypes, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  const int64_t n = features.size(0), c = prototypes.size(0);
  const auto in = inputs(features, labels, prototypes, temperature);
  auto loss = at::zeros({n}, in.o.p.options());
  auto lse = at::empty({n}, in.o.p.options());

  at::parallel_for(0, (n + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({kRowBlock, c}, in.o.p.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kRowBlock, rows = std::min(kRowBlock, n - i0);
      auto logits = scratch.narrow(0, 0, rows);
      block_logits(in, i0, logits);
      prototype_ce::forward_block(in.o, logits, i0, lse, loss);
    }
  });
  return {loss, lse};
}

// In place on the block's rows of grad_z, which hold G, the gradient of their unit rows x = z s:
// (G - x (x . G) [|z_i| > eps]) s, the gradient through x = z / max(|z|, eps), in one pass per row.
template <typename T>
void through_normalisation_(const Inputs& in, int64_t i0, at::Tensor& out) {
  const int64_t rows = out.size(0), d = out.size(1);
  const T* z = in.z.data_ptr<T>() + i0 * d;
  const T* inv = in.inv_norm.data_ptr<T>() + i0;
  const T* above = in.above.data_ptr<T>() + i0;
  T* g = out.data_ptr<T>();
  for (int64_t i = 0; i < rows; ++i) {
    const T* zi = z + i * d;
    T* gi = g + i * d;
    const T s = inv[i];
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t k = 0; k < d; ++k) dot += zi[k] * gi[k];
    const T radial = dot * s * above[i];  // x . G
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) gi[k] = (gi[k] - zi[k] * s * radial) * s;
  }
}

// Backward of one block: d_ic = d loss / d u_ic from the recomputed logits; G = d P, the gradient of
// the block's unit rows, taken through the normalisation straight in the block's rows of grad_z;
// d loss / d p_c = sum_i d_ic x_i = sum_i (d_ic s_i) z_i (p = unit prototypes / t) added to the
// worker's grad_p.
void backward_block(const Inputs& in, const prototype_ce::RowGrads& r, int64_t i0, at::Tensor& u, at::Tensor& d,
                    at::Tensor& grad_z, const at::Tensor& grad_p) {
  const int64_t rows = u.size(0);
  block_logits(in, i0, u);
  d.copy_(u);
  const auto g_b = prototype_ce::softmax_part_(r, d, i0);
  d.scatter_add_(1, in.o.y.narrow(0, i0, rows).clamp_min(0).unsqueeze(1), -g_b);
  auto out = grad_z.narrow(0, i0, rows);
  at::mm_out(out, d, in.o.p);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "prototype_ce_normalisation_backward",
                             [&] { through_normalisation_<scalar_t>(in, i0, out); });
  grad_p.addmm_(d.mul_(in.inv_norm.narrow(0, i0, rows)).t(), in.z.narrow(0, i0, rows));
}

std::tuple<at::Tensor, at::Tensor> prototype_ce_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& features,
                                                             const at::Tensor& labels, const at::Tensor& prototypes,
                                                             const at::Tensor& lse, double temperature) {
  MLC_KERNEL_GUARD();
  check_inputs(features, labels, prototypes);
  MLC_CHECK_CPU(grad_rows);
  MLC_CHECK_CPU(lse);
  check_row_inputs(grad_rows, lse, features.size(0));
  const int64_t n = features.size(0), c = prototypes.size(0), d = features.size(1);
  const auto in = inputs(features, labels, prototypes, temperature);
  const auto r = prototype_ce::row_grads(in.o, grad_rows, lse);

  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  auto grad_z = at::empty({n, d}, in.o.p.options());
  // One [C, D] accumulator per worker for the prototype gradient: no shared writes.
  auto grad_p = at::zeros({workers, c, d}, in.o.p.options());

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({2, kRowBlock, c}, in.o.p.options());
    for (int64_t worker = w0; worker < w1; ++worker) {
      for (int64_t b = worker * blocks / workers; b < (worker + 1) * blocks / workers; ++b) {
        const int64_t i0 = b * kRowBlock, rows = std::min(kRowBlock, n - i0);
        auto u = scratch[0].narrow(0, 0, rows), dl = scratch[1].narrow(0, 0, rows);
        backward_block(in, r, i0, u, dl, grad_z, grad_p[worker]);
      }
    }
  });
  auto grad_unit_p = grad_p.sum(0).mul_(1.0 / temperature);
  return {grad_z.to(features.scalar_type()),
          unit_rows_backward(grad_unit_p, in.o.protos).to(prototypes.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) {
  m.impl("prototype_ce", &prototype_ce_cpu);
  m.impl("prototype_ce_backward", &prototype_ce_backward_cpu);
}

}  // namespace cpu
}  // namespace mlcontrast
