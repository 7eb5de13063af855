// Label-level SupCon of a batch against a detached queue on the CPU (the op label_supcon_queue), without an
// N x (N + M) matrix and without a copy of the queue.
//
// An anchor's contrast set is the other valid rows of the batch and the valid rows of the queue; the
// positives are those of its label (the loss: shared/label_supcon.h, with the queue's rows added to the
// class sums of the contrast rows).
// * The batch part runs on label_supcon's symmetric tiles (label_supcon_tiles.h).
// * The queue part is one-sided: each tile S = Z_a Q^T / t of the anchors against a block of queue rows
//   feeds an online log-sum-exp of its rows and, as in flash attention, the running softmax-weighted sum
//   of the queue rows, O_i = sum_j p_ij q_j with p_ij = e^{s_ij - LSE_i} (LSE over batch and queue). The
//   forward saves O ([N, D], the op's queue_mean): the backward's queue share of an anchor's gradient is
//   then w_i O_i, with no second pass over the queue, which gets no gradient (4 N M D flops in all, where
//   recomputing the tiles would take 6).
// * With normalize_queue the queue rows are normalised in the kernel: their inverse norms scale the tiles'
//   columns, so the queue is read as given and never copied.
// Workers own blocks of queue columns, each with its own online state for all anchors, merged at the end
// in a fixed order: the result does not depend on scheduling.
#include "class_sums.h"
#include "label_supcon_tiles.h"
#include "shared/label_supcon.h"
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

using label_supcon::RoleArgs;
using label_supcon::Roles;
using tiles::kColBlock;
using tiles::kRowBlock;

void check_arguments(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& queue,
                     const at::Tensor& queue_labels, const RoleArgs& roles) {
  MLC_CHECK_CPU(features);
  MLC_CHECK_CPU(labels);
  MLC_CHECK_CPU(queue);
  MLC_CHECK_CPU(queue_labels);
  label_supcon::check_inputs(features, labels, roles);
  MLC_CHECK_FLOAT(queue);
  MLC_CHECK_INDEX(queue_labels);
  MLC_CHECK_DIM(queue, 2);
  MLC_CHECK_DIM(queue_labels, 1);
  TORCH_CHECK(queue.size(1) == features.size(1), "queue must have D = ", features.size(1), " columns, got ",
              queue.size(1));
  TORCH_CHECK(queue_labels.size(0) == queue.size(0), "queue_labels must have M = ", queue.size(0),
              " entries, got ", queue_labels.size(0));
}

// The queue as the tiles read it: its rows (compute dtype; the input itself when it is already so) and per
// column the factor of the tile's entries (1 / (t |q_j|), or 1 / t), their bias (0, or -inf for a row with
// label < 0) and the weight that makes p_ij q_j the softmax-weighted unit row (1 / |q_j|, or 1).
struct Queue {
  at::Tensor rows;
  at::Tensor scale;
  at::Tensor bias;
  at::Tensor weight;
  at::Tensor labels;
};

Queue queue_columns(const at::Tensor& queue, const at::Tensor& queue_labels, double temperature, bool normalize,
                    at::ScalarType dtype) {
  Queue q;
  q.rows = to_compute(queue, dtype);
  const auto options = q.rows.options();
  q.weight = normalize ? at::linalg_vector_norm(q.rows, 2, {1}).clamp_min_(kNormEps).reciprocal_()
                       : at::ones({q.rows.size(0)}, options);
  q.scale = q.weight * (1.0 / temperature);
  q.bias = at::zeros({q.rows.size(0)}, options)
               .masked_fill_(queue_labels.lt(0), -std::numeric_limits<double>::infinity());
  q.labels = queue_labels.contiguous();
  return q;
}

// Adds each queue row of a class among `ids` (-1: none) times its weight to that class's sum, in one pass
// over the queue; workers own ranges of rows with their own [K, D] sums, added in order.
template <typename T>
void add_queue_class_sums(at::Tensor& sums, const Queue& q, const at::Tensor& ids) {
  const int64_t m = q.rows.size(0), d = q.rows.size(1), k = sums.size(0);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m / 4096));
  std::vector<at::Tensor> part(workers);
  const T* rows = q.rows.data_ptr<T>();
  const T* weight = q.weight.data_ptr<T>();
  const int64_t* id = ids.data_ptr<int64_t>();
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    MLC_KERNEL_GUARD();
    for (int64_t worker = w0; worker < w1; ++worker) {
      part[worker] = at::zeros({k, d}, sums.options());
      T* acc = part[worker].data_ptr<T>();
      for (int64_t j = m * worker / workers; j < m * (worker + 1) / workers; ++j) {
        if (id[j] < 0) continue;
        T* sum = acc + id[j] * d;
        const T* row = rows + j * d;
        const T x = weight[j];
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) sum[e] += x * row[e];
      }
    }
  });
  for (const auto& p : part) sums.add_(p);
}

// The class sums and counts of the whole contrast set (the valid batch rows z, then the valid queue rows,
// as unit rows when normalised), by the classes of the valid batch rows: a queue row of another class is
// no anchor's positive.
ClassSums contrast_class_sums(const at::Tensor& z, const at::Tensor& labels, const Queue& q) {
  auto uniq = at::_unique2(labels, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/true);
  const auto classes = std::get<0>(uniq);
  const int64_t k = classes.size(0);
  ClassSums out;
  out.inverse = std::get<1>(uniq).reshape({-1});
  out.sums = at::zeros({k, z.size(1)}, z.options()).index_add_(0, out.inverse, z);
  const auto at_class = at::searchsorted(classes, q.labels).clamp_max_(k - 1);
  const auto ids = at::where(classes.index_select(0, at_class).eq(q.labels), at_class, -1).contiguous();
  out.counts = std::get<2>(uniq) + at::bincount(ids.masked_select(ids.ge(0)), {}, k);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "label_supcon_queue",
                             [&] { add_queue_class_sums<scalar_t>(out.sums, q, ids); });
  return out;
}

// The online state of the queue part for every anchor: running max, sum of e^{s - max} and the
// e^{s - max}-weighted sum of the (unit) queue rows.
struct QueueState {
  at::Tensor max;  // [A]
  at::Tensor sum;  // [A]
  at::Tensor acc;  // [A, D]
};

// The queue part of the anchors za ([A, D]): workers own contiguous blocks of queue columns; within a block,
// each column tile serves every anchor block while it is in cache.
template <typename T>
QueueState queue_pass(const at::Tensor& za, const Queue& q) {
  const int64_t a = za.size(0), m = q.rows.size(0), d = za.size(1);
  const int64_t col_tiles = (m + kColBlock - 1) / kColBlock;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), col_tiles));
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<QueueState> states(workers);
  const T* scale = q.scale.data_ptr<T>();
  const T* bias = q.bias.data_ptr<T>();
  const T* weight = q.weight.data_ptr<T>();

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({kRowBlock, kColBlock}, za.options());
    std::vector<T> tile_max(kRowBlock), shift(kRowBlock);
    for (int64_t worker = w0; worker < w1; ++worker) {
      auto& st = states[worker];
      st.max = at::full({a}, -inf, za.options());
      st.sum = at::zeros({a}, za.options());
      st.acc = at::zeros({a, d}, za.options());
      T* run_max = st.max.data_ptr<T>();
      T* run_sum = st.sum.data_ptr<T>();
      T* acc = st.acc.data_ptr<T>();
      for (int64_t t = col_tiles * worker / workers; t < col_tiles * (worker + 1) / workers; ++t) {
        const int64_t j0 = t * kColBlock, cols = std::min(kColBlock, m - j0);
        const auto qj = q.rows.narrow(0, j0, cols);
        for (int64_t i0 = 0; i0 < a; i0 += kRowBlock) {
          const int64_t rows = std::min(kRowBlock, a - i0);
          auto s = scratch.narrow(0, 0, rows).narrow(1, 0, cols);
          tiles::similarity_tile(s, za.narrow(0, i0, rows), qj, 1.0);  // the columns' scale comes next
          T* sp = s.data_ptr<T>();
          queue_tile_max(sp, rows, cols, scratch.stride(0), scale + j0, bias + j0, tile_max.data());
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = i0 + r;
            const T m_new = std::max(run_max[i], tile_max[r]);
            if (m_new == -inf) {
              shift[r] = inf;  // nothing but ignored columns so far: the row takes no terms
              continue;
            }
            if (m_new > run_max[i]) {  // rescale the row's state to the new max
              const T f = run_max[i] == -inf ? T(0) : std::exp(run_max[i] - m_new);
              run_sum[i] *= f;
              for (int64_t e = 0; e < d; ++e) acc[i * d + e] *= f;
              run_max[i] = m_new;
            }
            shift[r] = m_new;
          }
          queue_tile_exp(sp, rows, cols, scratch.stride(0), shift.data(), weight + j0, run_sum + i0);
          st.acc.narrow(0, i0, rows).addmm_(s, qj);
        }
      }
    }
  });

  // Merge the workers' states in order: each rescaled to the common max (a row no worker saw stays empty).
  QueueState out = states[0];
  for (int64_t worker = 1; worker < workers; ++worker) {
    const auto& st = states[worker];
    const auto top = at::maximum(out.max, st.max);
    const auto seen = top.gt(-inf);
    const auto f_out = at::where(seen, (out.max - top).exp(), 0.0);
    const auto f_st = at::where(seen, (st.max - top).exp(), 0.0);
    out.sum = out.sum * f_out + st.sum * f_st;
    out.acc = out.acc * f_out.unsqueeze(1) + st.acc * f_st.unsqueeze(1);
    out.max = top;
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> label_supcon_queue_cpu(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& queue, const at::Tensor& queue_labels,
    double temperature, double base_temperature, bool normalize_queue, int64_t anchor_start,
    std::optional<int64_t> anchor_stop, std::optional<int64_t> grad_stop) {
  MLC_KERNEL_GUARD();
  const RoleArgs args{anchor_start, anchor_stop, 0, grad_stop};
  check_arguments(features, labels, queue, queue_labels, args);
  const int64_t n = features.size(0), d = features.size(1);
  const auto v = gather_valid(features, labels);
  if (v.z.size(0) == 0) {
    auto [loss, lse, n_pos] = label_supcon::outputs_without_valid_rows(features);
    return {loss, lse, n_pos, at::zeros({n, d}, loss.options())};
  }
  const auto r = label_supcon::valid_roles(labels, v.index, v.z.size(0), args);
  const auto q = queue_columns(queue, queue_labels, temperature, normalize_queue, v.z.scalar_type());
  auto lse = cpu::row_lse(v.z, 1.0 / temperature, r);  // the batch part
  const int64_t count = r.end - r.begin;
  const auto za = v.z.narrow(0, r.begin, count);
  QueueState st;
  AT_DISPATCH_FLOATING_TYPES(v.z.scalar_type(), "label_supcon_queue", [&] { st = queue_pass<scalar_t>(za, q); });
  auto lse_a = lse.narrow(0, r.begin, count);
  const auto has_queue = st.sum.gt(0);
  const auto both = at::where(has_queue, at::logaddexp(lse_a, st.max + st.sum.log()), lse_a);
  lse_a.copy_(both);
  auto queue_mean = at::zeros_like(v.z);
  queue_mean.narrow(0, r.begin, count)
      .copy_(st.acc * at::where(has_queue, (st.max - both).exp(), 0.0).unsqueeze(1));
  auto [loss, lse_out, n_pos] = label_supcon::outputs(lse, v.z, contrast_class_sums(v.z, v.labels, q), r, v.index, n,
                                                      temperature, base_temperature);
  return {loss, lse_out, n_pos, scatter_rows(queue_mean, v.index, n)};
}

at::Tensor label_supcon_queue_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& features,
                                           const at::Tensor& labels, const at::Tensor& queue,
                                           const at::Tensor& queue_labels, const at::Tensor& lse,
                                           const at::Tensor& n_pos, const at::Tensor& queue_mean, double temperature,
                                           double base_temperature, bool normalize_queue, int64_t anchor_start,
                                           std::optional<int64_t> anchor_stop, std::optional<int64_t> grad_stop) {
  MLC_KERNEL_GUARD();
  const RoleArgs args{anchor_start, anchor_stop, 0, grad_stop};
  check_arguments(features, labels, queue, queue_labels, args);
  MLC_CHECK_CPU(grad_rows);
  MLC_CHECK_CPU(lse);
  MLC_CHECK_CPU(n_pos);
  MLC_CHECK_CPU(queue_mean);
  check_row_inputs(grad_rows, lse, n_pos, "n_pos", features.size(0));
  TORCH_CHECK(queue_mean.sizes() == features.sizes(), "queue_mean must have the shape of features");
  const auto dtype = compute_dtype(features);
  const auto v = gather_valid(features, labels);
  if (v.z.size(0) == 0) return at::zeros_like(features);
  const auto r = label_supcon::valid_roles(labels, v.index, v.z.size(0), args);
  const auto q = queue_columns(queue, queue_labels, temperature, normalize_queue, dtype);

  const auto g = label_supcon::anchor_grads(grad_rows, v.index, r, dtype);
  const auto sums = contrast_class_sums(v.z, v.labels, q);
  const auto weights =
      label_supcon::backward_weights(g, label_supcon::valid_values(lse, v.index, dtype),
                                     label_supcon::valid_values(n_pos, v.index, dtype), temperature, base_temperature);
  auto dz = cpu::lse_grad(v.z, weights.lse, weights.w, 1.0 / temperature, r);  // the batch part
  // The queue part of the anchors' own gradient: w_i sum_j p_ij q_j = w_i O_i.
  const int64_t count = r.end - r.begin;
  const auto mean = gather_rows(to_compute(queue_mean, dtype), v.index).narrow(0, r.begin, count);
  dz.narrow(0, r.begin, count).addcmul_(mean, weights.w.narrow(0, r.begin, count).unsqueeze(1));
  return finish_backward(dz, v, weights, sums, r, features);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) {
  m.impl("label_supcon_queue", &label_supcon_queue_cpu);
  m.impl("label_supcon_queue_backward", &label_supcon_queue_backward_cpu);
}

}  // namespace cpu
}  // namespace mlcontrast
