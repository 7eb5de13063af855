// Kernel templates of multihot_supcon's pair modes ("jaccard", "any", "all"): the row LSE with each
// anchor's positive-pair sums (forward) and the gradient with the positive pairs' term (backward).
// Launchers: multihot_supcon_kernel.cu. "mulsupcon" has no pair term (its positives go through class
// sums in the api), so it runs label_supcon's kernels as they are.
//
// The tiles are label_supcon's (label_supcon.cuh): the same KernelConfig (WMMA fp16 / bf16 / TF32, SIMT
// fp32 / fp64), the same S = Z_I Z_J^T products, G Z products, grids and shared-memory areas, plus one
// small area for the label sets of the current column tile. What a tile adds is each pair's overlap
// o_ij = |y_i & y_j|: the label sets are bit masks (64 labels a word, packed once by pack_masks_kernel),
// so o_ij is a popcount per word, and with u_ij = |y_i| + |y_j| - o_ij the rule of params.h decides the
// pair and its weight. For C <= 64 kStagedWords a thread keeps its row's words in registers and the
// column tile's words are staged in shared memory; wider label sets are read from global memory.
//
//   forward  as label_supcon's fixed-shift LSE (one pass per tile, sum of exp(s - c)); a thread also
//            sums, over the positives of its row among its columns, the count, sum w and sum w s; the
//            TPR partial sums of a row merge by shuffles (fixed order: deterministic).
//   backward as label_supcon's, with G_ij -= w_ij [j in P(i)] (pair_i + pair_j) before the G Z product;
//            every block owns its dz rows and column slice: no atomics.
#pragma once

#include "label_supcon.cuh"

namespace mlcontrast {
namespace cuda {
namespace multihot {

// Mask words a row may have for the staged path (C <= 256); more are read from global memory.
constexpr int kStagedWords = 4;

// Packs the uint8 targets into bit masks and label counts, one thread per row (O(n c), once per call).
static __global__ void __launch_bounds__(kThreads) pack_masks_kernel(const PackLabelMasksParams p) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.n) return;
  const uint8_t* row = p.targets + i * p.ld_targets;
  int32_t size = 0;
  for (int64_t k = 0; k < p.words; ++k) {
    uint64_t word = 0;
    for (int64_t l = 0; l < 64 && 64 * k + l < p.c; ++l) word |= uint64_t(row[64 * k + l] != 0) << l;
    p.masks[k * p.n + i] = word;
    size += __popcll(word);
  }
  p.sizes[i] = size;
}

inline dim3 pack_grid(const PackLabelMasksParams& p) { return dim3(blocks_for(p.n, kThreads)); }

// ----------------------------------------------------------------------------------------------
// The positive pairs of a tile
// ----------------------------------------------------------------------------------------------

// The label set of a thread's row i (no labels past n).
struct RowLabels {
  uint64_t words[kStagedWords];  // the mask words, when staged (zero past `words`)
  int32_t size;

  __device__ RowLabels(const LabelPairs& p, int64_t i, int64_t n, bool staged) {
    size = i < n ? p.sizes[i] : 0;
#pragma unroll
    for (int q = 0; q < kStagedWords; ++q) words[q] = staged && q < p.words && i < n ? p.masks[q * n + i] : 0;
  }
};

// The label sets of a column tile j0 .. j0 + BN in shared memory: sizes (0 past n) and, when staged,
// the mask words, word q of column c at masks[q BN + c].
template <int BN>
struct ColumnLabels {
  static constexpr std::size_t kBytes = sizeof(uint64_t) * kStagedWords * BN + sizeof(int32_t) * BN;
  uint64_t* masks;
  int32_t* sizes;

  __device__ explicit ColumnLabels(unsigned char* area)
      : masks(reinterpret_cast<uint64_t*>(area)), sizes(reinterpret_cast<int32_t*>(masks + kStagedWords * BN)) {}

  // Must be called by all threads, between two barriers that order it after the previous tile's reads
  // and before this tile's.
  __device__ void stage(const LabelPairs& p, int64_t n, int64_t j0, bool staged) {
    const int words = staged ? static_cast<int>(p.words) : 0;
    for (int idx = threadIdx.x; idx < BN * (words + 1); idx += kThreads) {
      const int q = idx / BN, c = idx % BN;
      const int64_t j = j0 + c;
      if (q < words) {
        masks[q * BN + c] = j < n ? p.masks[q * n + j] : 0;
      } else {
        sizes[c] = j < n ? p.sizes[j] : 0;
      }
    }
  }
};

// o_ij = |y_i & y_j| for column c (row j) of the staged tile, or from global memory when not staged.
template <int BN>
__device__ __forceinline__ int overlap(const LabelPairs& p, const RowLabels& row, const ColumnLabels<BN>& cols,
                                       int c, int64_t i, int64_t j, int64_t n, bool staged) {
  int o = 0;
  if (staged) {
#pragma unroll
    for (int q = 0; q < kStagedWords; ++q) {
      if (q < p.words) o += __popcll(row.words[q] & cols.masks[q * BN + c]);
    }
  } else {
    for (int64_t q = 0; q < p.words; ++q) o += __popcll(p.masks[q * n + i] & p.masks[q * n + j]);
  }
  return o;
}

// Whether a pair with overlap o and set sizes ni, nj is a positive, and its weight w (params.h's rule).
template <typename Acc>
__device__ __forceinline__ bool positive_pair(const LabelPairs& p, int o, int32_t ni, int32_t nj, Acc& w) {
  if (o == 0) return false;
  w = Acc(1);
  switch (p.rule) {
    case PairRule::kJaccard: {
      const int32_t u = ni + nj - o;
      if (int64_t(o) * p.u_star < p.o_star * int64_t(u)) return false;
      w = Acc(o) / Acc(u);
      return true;
    }
    case PairRule::kAny:
      return true;
    default:  // kAll: y_j = y_i, the overlap is both sets
      return o == ni && o == nj;
  }
}

// ----------------------------------------------------------------------------------------------
// Shared memory and kernels
// ----------------------------------------------------------------------------------------------

// label_supcon's layout with the column tile's label sets (and, backward, pair_J) after its per-column
// area:  forward [S][Z chunks][labels];  backward [S][w_J, lse_J][labels, pair_J][U].
template <class Cfg>
struct PairLayout {
  using Base = supcon::SmemLayout<Cfg>;
  using Acc = typename Cfg::Acc;
  static constexpr std::size_t kLabels = round_up(ColumnLabels<Cfg::BN>::kBytes + sizeof(Acc) * Cfg::BN, 128);
  static constexpr std::size_t kFwdLabelsAt = Base::kS + Base::kAB;
  static constexpr std::size_t kFwdBytes = kFwdLabelsAt + kLabels;
  static constexpr std::size_t kBwdLabelsAt = Base::kS + Base::kWL;
  static constexpr std::size_t kBwdBytes = kBwdLabelsAt + kLabels + Base::kU;
  static_assert(kFwdBytes <= 48 * 1024 && kBwdBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");
};

// Forward of the anchors [row_begin, row_end): grid = supcon::lse_grid<Cfg>(p.lse), 128 threads; the
// thread layout of label_supcon's lse_kernel (thread t reads row t / TPR at columns t % TPR + TPR c).
template <class Cfg>
__global__ void __launch_bounds__(kThreads) pairs_fwd_kernel(const MultihotSupconFwdParams p) {
  using T = typename Cfg::Elem;
  using Acc = typename Cfg::Acc;
  using L = PairLayout<Cfg>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, TPR = kThreads / BM;
  static_assert(kThreads % BM == 0 && kWarp % TPR == 0, "a row's threads must be adjacent lanes of one warp");
  __shared__ __align__(128) unsigned char smem[L::kFwdBytes];
  Acc* S = reinterpret_cast<Acc*>(smem);
  unsigned char* ab = smem + L::Base::kS;
  ColumnLabels<BN> cols(smem + L::kFwdLabelsAt);

  const LabelSupconFwdParams& q = p.lse;
  const T* z = static_cast<const T*>(q.z);
  const int64_t n = q.n, i0 = q.row_begin + int64_t(blockIdx.x) * BM;
  const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
  const int64_t i = i0 + r;
  const Acc inv_t = static_cast<Acc>(q.inv_temperature);
  const Acc shift = *static_cast<const Acc*>(q.shift);
  const bool vec = vector_loads_ok(q.z, q.ld_z, q.d, sizeof(T));
  const bool staged = p.pairs.words <= kStagedWords;
  const RowLabels row(p.pairs, i, n, staged);

  Acc sum = Acc(0), weight = Acc(0), weighted = Acc(0);
  int count = 0;
  for (int64_t j0 = 0; j0 < n; j0 += BN) {
    Cfg::Score::run(z, q.ld_z, n, q.d, i0, j0, ab, S, Cfg::LDS, vec);
    // Score::run's barriers order this after the previous tile's epilogue.
    cols.stage(p.pairs, n, j0, staged);
    __syncthreads();
    const Acc* srow = S + r * Cfg::LDS;
#pragma unroll 4
    for (int c = part; c < BN; c += TPR) {
      const int64_t j = j0 + c;
      if (j >= n || j == i) continue;
      const Acc s = srow[c] * inv_t;
      sum += acc_exp(s - shift);
      Acc w;
      if (row.size > 0 && positive_pair(p.pairs, overlap(p.pairs, row, cols, c, i, j, n, staged), row.size,
                                        cols.sizes[c], w)) {
        ++count;
        weight += w;
        weighted += w * s;
      }
    }
  }
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    weight += __shfl_xor_sync(0xffffffffu, weight, offset);
    weighted += __shfl_xor_sync(0xffffffffu, weighted, offset);
    count += __shfl_xor_sync(0xffffffffu, count, offset);
  }
  if (part == 0 && i < q.row_end) {
    // A row with no other row (n == 1) sums nothing: log 0 = -inf, as label_supcon's.
    static_cast<Acc*>(q.lse)[i] = shift + acc_log(sum);
    static_cast<Acc*>(p.count)[i] = Acc(count);
    static_cast<Acc*>(p.coef)[i] = count > 0 ? weight / Acc(count) : Acc(0);
    static_cast<Acc*>(p.b)[i] = count > 0 ? weighted / Acc(count) : Acc(0);
  }
}

// Backward: grid = supcon::lse_grad_grid<Cfg>(p.softmax), 128 threads; block (x, y) writes dz rows
// [BM x, BM (x + 1)) and columns [DP y, DP (y + 1)), overwriting them, as label_supcon's lse_grad_kernel.
template <class Cfg>
__global__ void __launch_bounds__(kThreads) pairs_grad_kernel(const MultihotSupconBwdParams p) {
  using T = typename Cfg::Elem;
  using Acc = typename Cfg::Acc;
  using G_t = typename Cfg::GType;
  using L = PairLayout<Cfg>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, DP = Cfg::DP, TPR = kThreads / BM;
  static_assert(kThreads % BM == 0 && BN <= kThreads, "layout");
  __shared__ __align__(128) unsigned char smem[L::kBwdBytes];
  Acc* S = reinterpret_cast<Acc*>(smem);
  Acc* w_j = reinterpret_cast<Acc*>(smem + L::Base::kS);  // w_J, or alpha_J with one exp per pair
  Acc* lse_j = w_j + BN;
  ColumnLabels<BN> cols(smem + L::kBwdLabelsAt);
  Acc* pair_j = reinterpret_cast<Acc*>(smem + L::kBwdLabelsAt + ColumnLabels<BN>::kBytes);
  unsigned char* u = smem + L::kBwdLabelsAt + L::kLabels;
  G_t* G = Cfg::kSeparateG ? reinterpret_cast<G_t*>(u) : reinterpret_cast<G_t*>(S);
  T* V = reinterpret_cast<T*>(u + L::Base::kG);

  const LabelSupconBwdParams& q = p.softmax;
  const T* z = static_cast<const T*>(q.z);
  const Acc* lse = static_cast<const Acc*>(q.lse);
  const Acc* pair = static_cast<const Acc*>(p.pair);
  const int64_t n = q.n, d = q.d, i0 = int64_t(blockIdx.x) * BM, d0 = int64_t(blockIdx.y) * DP;
  const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
  const int64_t i = i0 + r;
  const Acc inv_t = static_cast<Acc>(q.inv_temperature);
  const Acc inf = inf_of<Acc>();
  const Acc g_scale = q.g_scale != nullptr ? static_cast<Acc>(*q.g_scale) : Acc(1);
  const bool vec = vector_loads_ok(q.z, q.ld_z, d, sizeof(T));
  const bool one_exp = q.alpha != nullptr;
  const Acc shift = one_exp ? *static_cast<const Acc*>(q.shift) : Acc(0);
  const Acc* weight = one_exp ? static_cast<const Acc*>(q.alpha) : static_cast<const Acc*>(q.w);
  const Acc w_i = i < n ? weight[i] : Acc(0);
  const Acc lse_i = i < n ? lse[i] : inf;
  const Acc pair_i = i < n ? pair[i] : Acc(0);
  const bool staged = p.pairs.words <= kStagedWords;
  const RowLabels row(p.pairs, i, n, staged);
  // Row i takes the other anchors' terms (its contrast role) only below grad_end (params.h).
  const bool side_i = i < q.grad_end;

  // Outside the anchors w = pair = 0: such a row block needs only the anchors' columns, and none if no row
  // of it takes a contrast-role gradient (a detached memory: no work).
  const bool anchor_block = i0 < q.anchor_end && i0 + BM > q.anchor_begin;
  const bool side_block = i0 < q.grad_end;
  const int64_t j_begin = anchor_block ? 0 : q.anchor_begin;
  const int64_t j_end = anchor_block ? n : (side_block ? q.anchor_end : q.anchor_begin);

  typename Cfg::Grad grad;
  grad.init();
  for (int64_t j0 = j_begin; j0 < j_end; j0 += BN) {
    Cfg::Score::run(z, q.ld_z, n, d, i0, j0, u, S, Cfg::LDS, vec);
    // Score::run's barriers order these stores after the previous tile's epilogue.
    if (threadIdx.x < BN) {
      const int64_t j = j0 + threadIdx.x;
      w_j[threadIdx.x] = j < n ? weight[j] : Acc(0);
      lse_j[threadIdx.x] = j < n ? lse[j] : inf;
      pair_j[threadIdx.x] = j < n ? pair[j] : Acc(0);
    }
    cols.stage(p.pairs, n, j0, staged);
    __syncthreads();  // S and the column tile's data complete; the Z chunks in U are no longer read
    for (int c = part; c < BN; c += TPR) {
      const int64_t j = j0 + c;
      Acc g = Acc(0);
      if (i < n && j < n && j != i) {
        const Acc s = S[r * Cfg::LDS + c] * inv_t;
        const Acc w_col = side_i ? w_j[c] : Acc(0), pair_col = side_i ? pair_j[c] : Acc(0);
        g = one_exp ? acc_exp(s - shift) * (w_i + w_col) : w_i * acc_exp(s - lse_i) + w_col * acc_exp(s - lse_j[c]);
        const Acc pair_ij = pair_i + pair_col;
        Acc w;
        if (pair_ij != Acc(0) && row.size > 0 &&
            positive_pair(p.pairs, overlap(p.pairs, row, cols, c, i, j, n, staged), row.size, cols.sizes[c], w)) {
          g -= w * pair_ij;
        }
      }
      // In place for fp32/fp64 G: each thread overwrites only the entries it has just read.
      G[r * Cfg::LDG + c] = from_acc<G_t>(g * g_scale);
    }
    load_tile<BN, DP, false, Cfg::LDV>(V, z, q.ld_z, j0, d0, n, d, vec);
    __syncthreads();  // G and V complete
    grad.mma(G, Cfg::LDG, V, Cfg::LDV);
  }
  // The S area is free once every warp is past its last product.
  __syncthreads();
  grad.store(static_cast<Acc*>(q.dz), q.ld_dz, i0, d0, n, d, Acc(1) / g_scale, smem);
}

}  // namespace multihot
}  // namespace cuda
}  // namespace mlcontrast
