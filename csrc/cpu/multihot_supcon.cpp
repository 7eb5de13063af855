// Multi-hot (image-level) supervised contrastive loss on the CPU, without an R x R matrix (the maths
// around the tile passes: shared/multihot_supcon.h).
//
// * Label masks: each row's label set as ceil(C / 64) bit words, built once (O(R C / 64) memory); a
//   pair's overlap o_ij = popcount(m_i & m_j) and u_ij = |y_i| + |y_j| - o_ij decide whether it is a
//   positive and its weight, a few instructions per pair next to the D of the tile's product.
// * Forward: one pass over the symmetric tiles of S (tiles.h, as label_supcon): every anchor's online
//   log-sum-exp and, for "jaccard" / "any" / "all", the count, sum w and sum w s of its positives, read
//   from the same tile while it is in cache. "mulsupcon" takes its positives through class sums instead
//   (O(R C D)), so its pass is label_supcon's.
// * Backward: recomputes each tile from the saved LSE; G_ij = a_i (coef_i e^{s_ij - LSE_i} - beta_ij),
//   and dZ = (G + G^T) Z from the tile's rows and columns. Only O(R) statistics are saved.
// Scratch: O(tile) per thread plus O(R) (forward) or O(R D) (backward) per worker (tiles.h).
#include "class_sums.h"
#include "shared/multihot_supcon.h"
#include "tiles.h"
#include "vec_math.h"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// The overlap counts are compiled for AVX-512 VPOPCNTDQ (eight words a cycle), for the POPCNT
// instruction and for the baseline (a bit-trick sequence); the first call picks the best one the CPU
// has, so one build runs everywhere.
#define MLC_POPCOUNT_DISPATCH 1
#endif

namespace mlcontrast {
namespace cpu {
namespace {

using multihot_supcon::Options;
using multihot_supcon::Positives;
using tiles::kColBlock;
using tiles::kRowBlock;
using tiles::Range;
using tiles::Tile;

// ------------------------------------------------------------------------------------------------
// Label sets as bit masks, and the positive pairs of a tile
// ------------------------------------------------------------------------------------------------

struct LabelMasks {
  int64_t rows = 0;
  int64_t words = 1;
  std::vector<uint64_t> bits;  // [words, R]: word k of every row together, so a tile's columns are contiguous
  std::vector<int32_t> sizes;  // |y_i|
};

LabelMasks label_masks(const at::Tensor& targets) {
  const auto t = targets.contiguous();
  const int64_t n = t.size(0), c = t.size(1);
  LabelMasks m;
  m.rows = n;
  m.words = std::max<int64_t>(1, (c + 63) / 64);
  m.bits.assign(m.words * n, 0);
  m.sizes.assign(n, 0);
  const uint8_t* p = t.data_ptr<uint8_t>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int32_t size = 0;
      for (int64_t k = 0; k < c; ++k) {
        const bool present = p[i * c + k] != 0;
        m.bits[(k / 64) * n + i] |= uint64_t(present) << (k % 64);
        size += present;
      }
      m.sizes[i] = size;
    }
  });
  return m;
}

// overlap[c] = |y_i & y_{j0 + c}| for c < cols: per mask word, one loop over the tile's columns that
// vectorises (words of row i without labels are skipped: most are, for a few labels among many classes).
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline void overlap_counts_impl(const LabelMasks& m, int64_t i, int64_t j0, int64_t cols, int32_t* overlap) {
  for (int64_t c = 0; c < cols; ++c) overlap[c] = 0;
  for (int64_t k = 0; k < m.words; ++k) {
    const uint64_t word = m.bits[k * m.rows + i];
    if (word == 0) continue;
    const uint64_t* col = m.bits.data() + k * m.rows + j0;
    for (int64_t c = 0; c < cols; ++c) overlap[c] += int32_t(__builtin_popcountll(word & col[c]));
  }
}

using OverlapCounts = void (*)(const LabelMasks&, int64_t, int64_t, int64_t, int32_t*);

void overlap_counts_baseline(const LabelMasks& m, int64_t i, int64_t j0, int64_t cols, int32_t* overlap) {
  overlap_counts_impl(m, i, j0, cols, overlap);
}

#ifdef MLC_POPCOUNT_DISPATCH
__attribute__((target("popcnt"))) void overlap_counts_popcnt(const LabelMasks& m, int64_t i, int64_t j0,
                                                             int64_t cols, int32_t* overlap) {
  overlap_counts_impl(m, i, j0, cols, overlap);
}

__attribute__((target("popcnt,avx512f,avx512vl,avx512vpopcntdq"))) void overlap_counts_avx512(
    const LabelMasks& m, int64_t i, int64_t j0, int64_t cols, int32_t* overlap) {
  overlap_counts_impl(m, i, j0, cols, overlap);
}
#endif

OverlapCounts pick_overlap_counts() {
#ifdef MLC_POPCOUNT_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512vl")) return overlap_counts_avx512;
  if (__builtin_cpu_supports("popcnt")) return overlap_counts_popcnt;
#endif
  return overlap_counts_baseline;
}

void overlap_counts(const LabelMasks& m, int64_t i, int64_t j0, int64_t cols, int32_t* overlap) {
  static const OverlapCounts best = pick_overlap_counts();
  best(m, i, j0, cols, overlap);
}

// The columns c < cols with overlap[c] != 0 into index[0 .. returned count), without a branch per column.
int64_t overlapping_columns(const int32_t* overlap, int64_t cols, int32_t* index) {
  int64_t found = 0;
  for (int64_t c = 0; c < cols; ++c) {
    index[found] = int32_t(c);
    found += overlap[c] != 0;
  }
  return found;
}

// The positive test of a pair and its weight w, from its overlap o > 0 and the sizes of the two sets.
struct JaccardRule {
  static constexpr bool kPairs = true;
  double threshold;
  template <typename T>
  bool operator()(int32_t o, int32_t ni, int32_t nj, T& w) const {
    const int32_t u = ni + nj - o;
    // Decided in double on the exact ratio of two integers, so an overlap exactly at the threshold counts.
    if (double(o) / double(u) < threshold) return false;
    w = T(o) / T(u);
    return true;
  }
};

struct AnyRule {
  static constexpr bool kPairs = true;
  template <typename T>
  bool operator()(int32_t, int32_t, int32_t, T& w) const {
    w = T(1);
    return true;
  }
};

struct AllRule {  // y_j = y_i: the overlap is both sets
  static constexpr bool kPairs = true;
  template <typename T>
  bool operator()(int32_t o, int32_t ni, int32_t nj, T& w) const {
    w = T(1);
    return o == ni && o == nj;
  }
};

struct NoPairs {  // "mulsupcon": positives through class sums, none from the tiles
  static constexpr bool kPairs = false;
};

template <class F>
void with_rule(const Options& o, F f) {
  switch (o.positives) {
    case Positives::kJaccard: return f(JaccardRule{o.threshold});
    case Positives::kAny: return f(AnyRule{});
    case Positives::kAll: return f(AllRule{});
    case Positives::kMulSupCon: return f(NoPairs{});
  }
}

// Scratch of for_each_positive, one per thread.
struct PairScratch {
  std::vector<int32_t> overlap = std::vector<int32_t>(kColBlock);
  std::vector<int32_t> index = std::vector<int32_t>(kColBlock);
};

// Calls visit(r, c, w) for every positive pair (i0 + r, j0 + c) of a tile, self-pairs excluded.
template <typename T, class Rule, class Visit>
void for_each_positive(const LabelMasks& m, const Rule& rule, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                       PairScratch& scratch, Visit visit) {
  const int32_t* sizes = m.sizes.data();
  int32_t* overlap = scratch.overlap.data();
  int32_t* index = scratch.index.data();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const int32_t ni = sizes[i];
    if (ni == 0) continue;  // no labels: no positives in any mode
    overlap_counts(m, i, j0, cols, overlap);
    const int64_t found = overlapping_columns(overlap, cols, index);
    for (int64_t q = 0; q < found; ++q) {
      const int64_t c = index[q];
      if (j0 + c == i) continue;
      T w;
      if (rule(overlap[c], ni, sizes[j0 + c], w)) visit(r, c, w);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Forward: row LSE and the positives' sums, one pass over the tiles
// ------------------------------------------------------------------------------------------------

// One worker's running statistics of all R rows (it updates those of its tiles' rows and columns).
template <typename T>
struct RowState {
  std::vector<T> run_max, run_sum;              // online log-sum-exp
  std::vector<double> count, weight, weighted;  // |P(i)|, sum_p w_ip, sum_p w_ip s_ip

  RowState(int64_t n, bool pairs)
      : run_max(n, -std::numeric_limits<T>::infinity()), run_sum(n, T(0)),
        count(pairs ? n : 0, 0.0), weight(pairs ? n : 0, 0.0), weighted(pairs ? n : 0, 0.0) {}

  void add_pair(int64_t i, double w, double s) {
    count[i] += 1;
    weight[i] += w;
    weighted[i] += w * s;
  }
};

// The forward's row statistics, [R] each in the compute dtype, 0 outside the anchors.
struct RowStats {
  at::Tensor lse, count, coef, b;
};

template <typename T, class Rule>
void forward_tiles(const at::Tensor& z, const LabelMasks& masks, const Rule& rule, double inv_t, const Range& a,
                   std::vector<RowState<T>>& states) {
  const int64_t n = z.size(0), workers = int64_t(states.size());
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    MLC_KERNEL_GUARD();
    auto scratch = at::empty({kRowBlock, kColBlock}, z.options());
    const int64_t ld = scratch.stride(0);
    std::vector<T> col_scratch(2 * kColBlock);
    PairScratch pairs;
    for (int64_t worker = w0; worker < w1; ++worker) {
      auto& st = states[worker];
      tiles::for_each_block(worker, workers, a, [&](int64_t i0, int64_t rows) {
        const auto zi = z.narrow(0, i0, rows);
        tiles::for_each_tile(i0, rows, a, n, [&](int64_t j0, int64_t cols, Tile tile) {
          auto s = scratch.narrow(0, 0, rows).narrow(1, 0, cols);
          tiles::similarity_tile(s, zi, z.narrow(0, j0, cols), inv_t);
          if (tile == Tile::kDiagonal) tiles::fill_diagonal(s, i0, j0, -std::numeric_limits<double>::infinity());
          const T* sp = s.data_ptr<T>();
          online_lse_update(sp, rows, cols, ld, st.run_max.data() + i0, st.run_sum.data() + i0);
          const bool both = tile == Tile::kSymmetric;
          if (both) {
            online_lse_update_cols(sp, rows, cols, ld, st.run_max.data() + j0, st.run_sum.data() + j0,
                                   col_scratch.data());
          }
          if constexpr (Rule::kPairs) {
            for_each_positive<T>(masks, rule, i0, rows, j0, cols, pairs, [&](int64_t r, int64_t c, T w) {
              const double logit = sp[r * ld + c];
              st.add_pair(i0 + r, w, logit);
              if (both) st.add_pair(j0 + c, w, logit);  // s and w are symmetric
            });
          }
        });
      });
    }
  });
}

// Merges the workers' states into the anchors' statistics (exactly: no fixed shift in the LSE).
template <typename T>
void merge_states(const std::vector<RowState<T>>& states, const Range& a, bool pairs, RowStats& out) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T* lse = out.lse.data_ptr<T>();
  T* count = out.count.data_ptr<T>();
  T* coef = out.coef.data_ptr<T>();
  T* b = out.b.data_ptr<T>();
  for (int64_t i = a.begin; i < a.end; ++i) {
    T m = neg_inf;
    for (const auto& st : states) m = std::max(m, st.run_max[i]);
    if (m == neg_inf) {
      lse[i] = neg_inf;  // a row with no other row to contrast with
    } else {
      T sum = 0;
      for (const auto& st : states) sum += st.run_sum[i] * std::exp(st.run_max[i] - m);
      lse[i] = m + std::log(sum);
    }
    if (!pairs) continue;
    double c = 0, w = 0, ws = 0;
    for (const auto& st : states) {
      c += st.count[i];
      w += st.weight[i];
      ws += st.weighted[i];
    }
    count[i] = T(c);
    coef[i] = c > 0 ? T(w / c) : T(0);
    b[i] = c > 0 ? T(ws / c) : T(0);
  }
}

template <typename T, class Rule>
void forward_stats(const at::Tensor& z, const LabelMasks& masks, const Rule& rule, const Options& o, RowStats& out) {
  const Range a{o.begin, o.end};
  const int64_t n = z.size(0);
  const int64_t per_worker = n * int64_t(2 * sizeof(T) + (Rule::kPairs ? 3 * sizeof(double) : 0));
  const int64_t workers = tiles::triangle_workers(tiles::row_blocks(a), per_worker);
  std::vector<RowState<T>> states;
  states.reserve(workers);
  for (int64_t w = 0; w < workers; ++w) states.emplace_back(n, Rule::kPairs);
  forward_tiles<T>(z, masks, rule, 1.0 / o.temperature, a, states);
  merge_states(states, a, Rule::kPairs, out);
}

// ------------------------------------------------------------------------------------------------
// Backward: dZ = (G + G^T) Z over the same tiles
// ------------------------------------------------------------------------------------------------

// G_ij = soft_i e^{s_ij - lse_i} - pair_i w_ij [j in P(i)] (i != j) over the tiles of for_each_tile; rows
// with soft_i = 0 must have lse_i = +inf, rows outside the anchors soft = pair = 0.
template <typename T, class Rule>
at::Tensor backward_tiles(const at::Tensor& z, const LabelMasks& masks, const Rule& rule,
                          const multihot_supcon::BackwardWeights& wts, double inv_t, const Range& a,
                          int64_t grad_end) {
  const int64_t n = z.size(0), d = z.size(1);
  // The anchors below grad_end share the symmetric tiles; the others (and every column from grad_end on)
  // get one-sided tiles, whose columns take their side only below grad_end (tiles.h, as label_supcon).
  const auto plan = tiles::plan(a, 0, grad_end, n);
  const int64_t rows_out = std::min(n, std::max(a.end, grad_end));  // the rows that take a gradient
  const int64_t workers = tiles::triangle_workers(plan.blocks(), rows_out * d * z.element_size());
  // Worker 0's buffer becomes the result; the others are added to it in order and freed.
  std::vector<at::Tensor> acc(workers);
  for (auto& buffer : acc) buffer = at::zeros({rows_out, d}, z.options());
  const T* lse = wts.lse.data_ptr<T>();
  const T* soft = wts.soft.data_ptr<T>();
  const T* pair = wts.pair.data_ptr<T>();

  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    MLC_KERNEL_GUARD();
    auto h_buf = at::empty({kRowBlock, kColBlock}, z.options());
    const int64_t ld = h_buf.stride(0);
    PairScratch pairs;
    for (int64_t worker = w0; worker < w1; ++worker) {
      auto& dz = acc[worker];
      tiles::for_each_block(worker, workers, plan, [&](int64_t i0, int64_t rows, bool symmetric) {
        const auto zi = z.narrow(0, i0, rows);
        tiles::for_each_tile(i0, rows, symmetric, plan, [&](int64_t j0, int64_t cols, Tile tile) {
          const auto zj = z.narrow(0, j0, cols);
          auto h = h_buf.narrow(0, 0, rows).narrow(1, 0, cols);
          tiles::similarity_tile(h, zi, zj, inv_t);
          // Only symmetric tiles carry their columns' terms; rows outside the anchors have weight 0.
          const bool both = tile == Tile::kSymmetric;
          T* hp = h.data_ptr<T>();
          softmax_weights(hp, rows, cols, ld, lse + i0, soft + i0, both ? lse + j0 : nullptr, both ? soft + j0 : nullptr);
          if (tiles::meets_diagonal(i0, rows, j0, cols)) tiles::fill_diagonal(h, i0, j0, 0.0);
          if constexpr (Rule::kPairs) {
            for_each_positive<T>(masks, rule, i0, rows, j0, cols, pairs, [&](int64_t r, int64_t c, T w) {
              hp[r * ld + c] -= w * (pair[i0 + r] + (both ? pair[j0 + c] : T(0)));
            });
          }
          dz.narrow(0, i0, rows).addmm_(h, zj);
          // The columns' side: every column of a symmetric tile; those below grad_end of the others.
          const int64_t side = both ? cols : std::clamp<int64_t>(grad_end - j0, 0, cols);
          if (side > 0) dz.narrow(0, j0, side).addmm_(h.narrow(1, 0, side).t(), zi);
        });
      });
    }
  });
  for (int64_t worker = 1; worker < workers; ++worker) {
    acc[0].add_(acc[worker]);
    acc[worker] = at::Tensor();
  }
  if (rows_out == n) return acc[0];
  auto full = at::zeros({n, d}, z.options());  // the rows past them (a detached memory): 0, no work
  full.narrow(0, 0, rows_out).copy_(acc[0]);
  return full;
}

// ------------------------------------------------------------------------------------------------
// The ops
// ------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multihot_supcon_cpu(
    const at::Tensor& features, const at::Tensor& targets, double temperature, double base_temperature,
    c10::string_view positives, double threshold, int64_t anchor_start, std::optional<int64_t> anchor_stop,
    std::optional<int64_t> grad_stop) {
  MLC_KERNEL_GUARD();
  MLC_CHECK_CPU(features);
  MLC_CHECK_CPU(targets);
  const auto o = multihot_supcon::check_inputs(features, targets, temperature, base_temperature, positives, threshold,
                                               anchor_start, anchor_stop, grad_stop);
  const auto z = to_compute(features);
  RowStats stats;
  stats.lse = at::zeros({z.size(0)}, z.options());
  stats.count = at::zeros_like(stats.lse);
  stats.coef = at::zeros_like(stats.lse);
  stats.b = at::zeros_like(stats.lse);
  if (o.anchors() == 0) return multihot_supcon::outputs(stats.lse, stats.coef, stats.count, stats.b, o);

  const auto masks = o.pairs() ? label_masks(targets) : LabelMasks{};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "multihot_supcon", [&] {
    with_rule(o, [&](const auto& rule) { forward_stats<scalar_t>(z, masks, rule, o, stats); });
  });
  if (!o.pairs()) {
    std::tie(stats.count, stats.b) = multihot_supcon::mulsupcon_positives(multihot_supcon::class_terms(z, targets), z, o);
    stats.coef = stats.count.clone();
  }
  return multihot_supcon::outputs(stats.lse, stats.coef, stats.count, stats.b, o);
}

at::Tensor multihot_supcon_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& features,
                                        const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& coef,
                                        const at::Tensor& count, double temperature, double base_temperature,
                                        c10::string_view positives, double threshold, int64_t anchor_start,
                                        std::optional<int64_t> anchor_stop, std::optional<int64_t> grad_stop) {
  MLC_KERNEL_GUARD();
  for (const auto* t : {&grad_rows, &features, &targets, &lse, &coef, &count}) MLC_CHECK_CPU(*t);
  const auto o = multihot_supcon::check_inputs(features, targets, temperature, base_temperature, positives, threshold,
                                               anchor_start, anchor_stop, grad_stop);
  multihot_supcon::check_backward_rows(grad_rows, lse, coef, count, features.size(0));
  // Contiguous, whatever the features' strides (the fake kernel says so).
  if (o.anchors() == 0) return at::zeros(features.sizes(), features.options());

  const auto dtype = compute_dtype(features);
  const auto z = to_compute(features);
  auto row_values = [&](const at::Tensor& t) { return t.detach().to(dtype).reshape({-1}).contiguous(); };
  const auto wts = multihot_supcon::backward_weights(multihot_supcon::anchor_grads(grad_rows, o, dtype),
                                                     row_values(lse), row_values(coef), row_values(count), o);
  const auto masks = o.pairs() ? label_masks(targets) : LabelMasks{};
  const Range a{o.begin, o.end};
  at::Tensor dz;
  AT_DISPATCH_FLOATING_TYPES(dtype, "multihot_supcon_backward", [&] {
    with_rule(o, [&](const auto& rule) {
      dz = backward_tiles<scalar_t>(z, masks, rule, wts, 1.0 / temperature, a, o.grad_end);
    });
  });
  if (!o.pairs()) {
    dz.sub_(multihot_supcon::mulsupcon_positive_grad(multihot_supcon::class_terms(z, targets), z, wts.a, o.grad_end));
  }
  return dz.to(features.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CPU, m) {
  m.impl("multihot_supcon", &multihot_supcon_cpu);
  m.impl("multihot_supcon_backward", &multihot_supcon_backward_cpu);
}

}  // namespace cpu
}  // namespace mlcontrast
