// Plain parameter structs of the CUDA kernels: device pointers, sizes, strides and scalars.
//
// The api files (csrc/cuda/*_api.cpp, torch headers) fill these structs; the kernel files
// (csrc/cuda/*.cu, *.cuh) read them and include no torch header, so they compile quickly and a
// kernel's whole contract is visible here. All matrices are row-major with a unit column stride;
// `ld_*` is the row stride in elements. Counts are int64 so that N * D may exceed 2^31.
#pragma once

#include <cmath>
#include <cstdint>

namespace mlcontrast {
namespace cuda {

// Element type of a tensor handed to a kernel. The accumulation type is fp32 for the first three
// and fp64 for kFloat64 ("Acc" below).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// label_supcon forward: lse_i = LSE_{j != i, j >= col_begin} z_i.z_j * inv_temperature over the n given
// rows (the api has already dropped the rows with label -1), for the anchors i in [row_begin, row_end)
// only; the other entries of lse are not written. lse_i = -inf when no such j exists.
struct LabelSupconFwdParams {
  const void* z = nullptr;  // [n, d], dtype
  void* lse = nullptr;      // [n], Acc
  int64_t n = 0;
  int64_t row_begin = 0;
  int64_t row_end = 0;
  // The contrast rows [col_begin, n): rows before col_begin are in no anchor's contrast set.
  int64_t col_begin = 0;
  int64_t d = 0;
  int64_t ld_z = 0;
  double inv_temperature = 1.0;
  DType dtype = DType::kFloat32;
  // fp32 only: use TF32 tensor cores (set from torch's allow_tf32 for cuBLAS matmuls).
  bool allow_tf32 = false;
  // Optional device scalar (Acc): a bound c >= s_ij of every pair. Set, each row sums exp(s_ij - c)
  // over its tiles with no online max (one pass over each S tile instead of two) and
  // lse_i = c + log(sum); a row whose sum underflows (its logits far below c) gets an imprecise LSE,
  // which the api detects and redoes with shift = nullptr (the online max).
  const void* shift = nullptr;
};

// label_supcon backward, softmax part: dz_i = sum_{j != i} G_ij z_j with
//   G_ij = w_i exp(s_ij - lse_i) + w_j exp(s_ij - lse_j),   s_ij = z_i.z_j * inv_temperature.
// Rows with w_i = 0 must come with lse_i = +inf so that their terms vanish exactly, and rows outside
// the anchors [anchor_begin, anchor_end) must have w_i = 0: a row block outside them then visits
// only the anchors' column tiles, where its G is not 0.
// Roles (rectangular work): with col_begin > 0 or grad_end < n, G_ij = [j >= col_begin] w_i exp(s_ij - lse_i)
// + [col_begin <= i < grad_end] w_j exp(s_ij - lse_j): anchor i's own terms run over its contrast rows, and
// row i takes the terms of the other anchors' losses only as their contrast row below grad_end. A block
// of rows that are neither anchors nor such rows visits no tile and writes zeros.
struct LabelSupconBwdParams {
  const void* z = nullptr;    // [n, d], dtype
  const void* w = nullptr;    // [n], Acc
  const void* lse = nullptr;  // [n], Acc
  // Optional device scalar (fp32). G is multiplied by it before it is rounded to the element type
  // of a tensor-core product and the result divided by it again; this keeps fp16 G out of the
  // subnormal range. nullptr means 1.
  const float* g_scale = nullptr;
  void* dz = nullptr;  // [n, d], Acc, overwritten
  int64_t n = 0;
  int64_t anchor_begin = 0;
  int64_t anchor_end = 0;
  int64_t col_begin = 0;
  int64_t grad_end = INT64_MAX;  // every row
  int64_t d = 0;
  int64_t ld_z = 0;
  int64_t ld_dz = 0;
  double inv_temperature = 1.0;
  DType dtype = DType::kFloat32;
  bool allow_tf32 = false;
  // Optional, both or neither: a device scalar c (Acc, a bound on the logits as in the forward) and
  // alpha_i = w_i exp(c - lse_i) ([n], Acc; 0 where w_i = 0, finite elsewhere). Set, one exp serves
  // both terms of a pair: G_ij = exp(s_ij - c) (alpha_i + alpha_j).
  const void* shift = nullptr;
  const void* alpha = nullptr;
};

// prototype_nce, one warp per row r of the [rows = B * C, d] features (row r has class r % c):
//   logits_r = z_r . unit_p_{r % c} / max(|z_r|, eps) * inv_temperature.
struct PrototypeNceFwdParams {
  const void* z = nullptr;       // [rows, d], dtype
  const void* unit_p = nullptr;  // [c, d], Acc: prototypes already divided by max(|p|, eps)
  void* logits = nullptr;        // [rows], Acc
  void* norm = nullptr;          // [rows], Acc: max(|z_r|, eps), the op's fourth output
  int64_t rows = 0;
  int64_t c = 0;
  int64_t d = 0;
  double inv_temperature = 1.0;
  double eps = 1e-8;
  DType dtype = DType::kFloat32;
};

// How the prototype gradient's sum over the B samples is split (prototype_nce_bwd_split): B in
// `splits` consecutive runs of `per_split` samples (the last one may be shorter, none is empty).
struct PrototypeNceSplit {
  int64_t splits = 1;
  int64_t per_split = 1;
};

// prototype_nce backward, given dlogits = d loss / d logits:
//   grad_z_r      = (ds_r unit_p - u_r * radial_r) / max(|z_r|, eps),  ds_r = dlogits_r * inv_temperature,
//                   u_r = z_r / max(|z_r|, eps), radial_r = ds_r (u_r . unit_p) when |z_r| > eps, else 0;
//   grad_unit_p_c = sum_s sum_{b in split s} ds_{bc} u_{bc}   (each split summed in order of b, then
//                   the splits in order of s: deterministic, no atomics).
// With split.splits > 1 each split's sum goes to `partials` first, and a second pass adds them up.
struct PrototypeNceBwdParams {
  const void* z = nullptr;        // [rows, d], dtype
  const void* unit_p = nullptr;   // [c, d], Acc
  const void* dlogits = nullptr;  // [rows], Acc
  void* norm = nullptr;           // [rows], Acc scratch: max(|z_r|, eps), written by the row pass
  void* grad_z = nullptr;         // [rows, d], dtype
  void* grad_unit_p = nullptr;    // [c, d], Acc, overwritten
  void* partials = nullptr;       // [split.splits, c, d], Acc scratch; only read when split.splits > 1
  int64_t rows = 0;               // B * C
  int64_t c = 0;
  int64_t d = 0;
  double inv_temperature = 1.0;
  double eps = 1e-8;
  DType dtype = DType::kFloat32;
  PrototypeNceSplit split;  // from prototype_nce_bwd_split(rows / c, c, d, dtype)
};

// Deterministic segmented sum: out_s = sum_{t in [offsets[s], offsets[s+1])} weight_{order[t]} x_{order[t]},
// rows taken in the order given by `order` (a stable sort by segment), no atomics.
struct SegmentSumParams {
  const void* x = nullptr;        // [rows, d], x_dtype (16-bit rows are summed without an fp32 copy)
  const void* weight = nullptr;   // [rows], Acc, or nullptr for 1
  const int64_t* order = nullptr;    // [count of rows in segments]
  const int64_t* offsets = nullptr;  // [segments + 1]
  void* out = nullptr;               // [segments, d], Acc, overwritten
  int64_t segments = 0;
  int64_t d = 0;
  int64_t ld_x = 0;
  DType x_dtype = DType::kFloat32;  // any
  DType dtype = DType::kFloat32;    // Acc: kFloat64 for fp64 x, else kFloat32
};

// multihot_supcon: each row's label set y_i as bit masks, packed from the [n, c] uint8 targets (nonzero =
// label present): word k of row i holds labels 64 k .. 64 k + 63, bit l % 64 for label l.
struct PackLabelMasksParams {
  const uint8_t* targets = nullptr;  // [n, c], row stride ld_targets
  uint64_t* masks = nullptr;         // [words, n], words = ceil(c / 64) (1 when c == 0): word-major
  int32_t* sizes = nullptr;          // [n] |y_i|
  int64_t n = 0;
  int64_t c = 0;
  int64_t ld_targets = 0;
  int64_t words = 1;
};

// Which pairs (i, j != i) are positives, from o = |y_i & y_j| and the set sizes, and their weight w:
// jaccard: o > 0 and o / u >= threshold (u = |y_i| + |y_j| - o), w = o / u; any: o > 0, w = 1;
// all: o = |y_i| = |y_j| > 0, w = 1. (mulsupcon takes its positives through class sums: no pairs.)
enum class PairRule : int { kJaccard = 0, kAny = 1, kAll = 2 };

struct LabelPairs {
  const uint64_t* masks = nullptr;  // [words, n] from PackLabelMasksParams
  const int32_t* sizes = nullptr;   // [n]
  int64_t words = 1;
  PairRule rule = PairRule::kJaccard;
  // jaccard's threshold as the least passing ratio o* / u* of counts up to c (least_passing_ratio below):
  // o / u >= threshold exactly when o u_star >= o_star u, decided on integers.
  int64_t o_star = 1;
  int64_t u_star = 1;
};

// (o*, u*): the least ratio o / u of counts 1 <= o <= u <= max(c, 1) whose fp64 quotient is at least
// `threshold` (in (0, 1]). fp64 rounding is monotone, so for such counts o / u >= threshold in fp64 (the
// reference's test) exactly when o u* >= o* u. O(c); the Triton op's _least_passing_ratio is the same.
inline void least_passing_ratio(double threshold, int64_t c, int64_t& o_star, int64_t& u_star) {
  o_star = u_star = 1;  // o = u always passes: threshold <= 1
  for (int64_t u = 1; u <= (c > 1 ? c : 1); ++u) {
    int64_t o = static_cast<int64_t>(std::ceil(threshold * static_cast<double>(u))) - 1;
    if (o < 1) o = 1;
    while (static_cast<double>(o) / static_cast<double>(u) < threshold) ++o;
    if (o * u_star < o_star * u) {
      o_star = o;
      u_star = u;
    }
  }
}

// multihot_supcon forward of the pair modes, one pass over the tiles of label_supcon's LSE kernel: for
// the anchors i, lse_i (with the fixed shift `lse.shift`, which is required here; the api redoes the rows
// whose shifted sum underflows with label_supcon's online max), and with P(i) the positives of `pairs`:
//   count_i = |P(i)|, coef_i = sum_p w_ip / count_i, b_i = sum_p w_ip s_ip / count_i (0 when count_i = 0).
// Only the anchors' entries are written. The pair kernels take label_supcon's rectangular roles
// (col_begin, grad_end) at their defaults: every row is a contrast row (and gets its gradient).
struct MultihotSupconFwdParams {
  LabelSupconFwdParams lse;  // z, lse, n, anchors [row_begin, row_end), d, temperature, dtype, TF32, shift
  LabelPairs pairs;
  void* count = nullptr;  // [n], Acc
  void* coef = nullptr;   // [n], Acc
  void* b = nullptr;      // [n], Acc
};

// multihot_supcon backward of the pair modes: label_supcon's softmax part minus the positive pairs',
//   G_ij = w_i exp(s_ij - lse_i) + w_j exp(s_ij - lse_j) - w_ij [j in P(i)] (pair_i + pair_j),
// dz = G Z (i != j). `softmax` is label_supcon's backward with its conditions (w = a coef, lse +inf where
// w = 0, w = 0 outside the anchors, optional one-exp shift / alpha, fp16 g_scale); pair_i = a_i / |P(i)|
// must be 0 outside the anchors too, so that a row block outside them still needs the anchors' columns only.
struct MultihotSupconBwdParams {
  LabelSupconBwdParams softmax;
  LabelPairs pairs;
  const void* pair = nullptr;  // [n], Acc
};

}  // namespace cuda
}  // namespace mlcontrast
