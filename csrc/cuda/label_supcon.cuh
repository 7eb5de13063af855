// Kernel templates of label_supcon: the flash-style row LSE (forward) and the row-parallel
// gradient of the LSE part (backward). Launchers: label_supcon_fwd_kernel.cu, label_supcon_bwd_kernel.cu.
//
// Both kernels give one block of 128 threads a block of BM rows I and stream the column tiles J
// (BN rows of Z each) over all n rows, so no N x N buffer exists anywhere:
//
//   phase 1  S = Z_I Z_J^T over D in chunks of BK (zero-padded tiles in shared memory), written to
//            a BM x BN fp32 (fp64) tile in shared memory;
//   forward  each thread keeps an online max/sum for the row it reads, diagonal and padding masked
//            (or, given a bound c on the logits, a plain sum of exp(S/t - c): one pass per tile);
//            at the end the partial states of a row merge and the row LSE is written;
//   backward G_IJ = w_I exp(S/t - lse_I) + w_J exp(S/t - lse_J) (diagonal 0), or with c the single
//            exp(S/t - c) (alpha_I + alpha_J), replaces S, then
//            dZ_I[:, d0:d0+DP] += G_IJ Z_J[:, d0:d0+DP], accumulated in registers over all J and
//            written once. Each block owns its rows and its column slice: no atomics, the result
//            does not depend on scheduling. grid.y covers D in slices of DP (S is recomputed per slice).
//
// Two families of tile products, chosen at compile time by KernelConfig<T, TensorCores>:
//   * WMMA (nvcuda::wmma, 4 warps in 2 x 2, each 32 x 32 of S): fp16 / bf16 16x16x16, and fp32
//     as TF32 16x16x8, all with fp32 accumulation. G is rounded to the element type for the
//     second product (fp16 after scaling by g_scale, see params.h).
//   * SIMT (plain FMAs, each thread a strided RM x RN micro-tile): fp32 without TF32, fp64, and
//     fp16/bf16 on GPUs older than sm_80.
#pragma once

#include <mma.h>

#include <type_traits>

#include "primitives.cuh"

namespace mlcontrast {
namespace cuda {
namespace supcon {

// The tensor-core code exists only where nvcuda::wmma has bf16 and tf32 (sm_80+) and in the host
// pass; elsewhere the WMMA policies are stubs that trap. The launchers never pick them there
// (compiled_for_sm80).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define MLC_SUPCON_WMMA 1
#endif

// ----------------------------------------------------------------------------------------------
// SIMT tile products
// ----------------------------------------------------------------------------------------------

// Thread layout of the SIMT products: 128 threads as TY x TX = 16 x 8; thread (ty, tx) owns the
// rows ty + TY a and the columns tx + TX b of the block's tile (strided, so the shared-memory reads
// of a warp are broadcasts or consecutive words).
struct SimtLayout {
  static constexpr int TX = 8;
  static constexpr int TY = kThreads / TX;
};

// S[r][c] = sum_k z[i0 + r][k] z[j0 + c][k] for the BM x BN tile, over all d columns.
template <typename T, typename Acc, int BM, int BN, int BK>
struct SimtScore {
  static constexpr int TX = SimtLayout::TX, TY = SimtLayout::TY;
  static constexpr int RM = BM / TY, RN = BN / TX;
  static_assert(BM % TY == 0 && BN % TX == 0, "tile must divide among the threads");
  // Chunks of Z are stored transposed, As[k][r] and Bs[k][c]: a thread then reads RM + RN words
  // per k for RM * RN FMAs. The +1 pad spreads the transposing stores over the banks.
  static constexpr int LDA = BM + 1, LDB = BN + 1;
  static constexpr std::size_t kBytes = sizeof(T) * BK * (LDA + LDB);

  __device__ static void run(const T* __restrict__ z, int64_t ldz, int64_t n, int64_t d, int64_t i0, int64_t j0,
                             unsigned char* ab, Acc* S, int lds, bool vec) {
    T* As = reinterpret_cast<T*>(ab);
    T* Bs = As + BK * LDA;
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
    Acc acc[RM][RN];
#pragma unroll
    for (int a = 0; a < RM; ++a)
#pragma unroll
      for (int b = 0; b < RN; ++b) acc[a][b] = Acc(0);

    for (int64_t k0 = 0; k0 < d; k0 += BK) {
      __syncthreads();  // the previous chunk (or tile) is no longer read
      load_tile<BM, BK, true, LDA>(As, z, ldz, i0, k0, n, d, vec);
      load_tile<BN, BK, true, LDB>(Bs, z, ldz, j0, k0, n, d, vec);
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < BK; ++k) {
        Acc av[RM], bv[RN];
#pragma unroll
        for (int a = 0; a < RM; ++a) av[a] = to_acc<Acc>(As[k * LDA + ty + TY * a]);
#pragma unroll
        for (int b = 0; b < RN; ++b) bv[b] = to_acc<Acc>(Bs[k * LDB + tx + TX * b]);
#pragma unroll
        for (int a = 0; a < RM; ++a)
#pragma unroll
          for (int b = 0; b < RN; ++b) acc[a][b] = fma(av[a], bv[b], acc[a][b]);
      }
    }
    __syncthreads();  // S may still be read by the previous tile's epilogue when d == 0
#pragma unroll
    for (int a = 0; a < RM; ++a)
#pragma unroll
      for (int b = 0; b < RN; ++b) S[(ty + TY * a) * lds + tx + TX * b] = acc[a][b];
  }
};

// acc[r][c] += sum_j G[r][j] V[j][c] for the BM x DP output slice, G in Acc (in place in S).
template <typename T, typename Acc, int BM, int BN, int DP>
struct SimtGrad {
  static constexpr int TX = SimtLayout::TX, TY = SimtLayout::TY;
  static constexpr int RM = BM / TY, RN = DP / TX;
  static_assert(BM % TY == 0 && DP % TX == 0, "tile must divide among the threads");
  Acc acc[RM][RN];

  __device__ void init() {
#pragma unroll
    for (int a = 0; a < RM; ++a)
#pragma unroll
      for (int b = 0; b < RN; ++b) acc[a][b] = Acc(0);
  }

  __device__ void mma(const Acc* G, int ldg, const T* V, int ldv) {
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll 4
    for (int j = 0; j < BN; ++j) {
      Acc gv[RM], vv[RN];
#pragma unroll
      for (int a = 0; a < RM; ++a) gv[a] = G[(ty + TY * a) * ldg + j];
#pragma unroll
      for (int b = 0; b < RN; ++b) vv[b] = to_acc<Acc>(V[j * ldv + tx + TX * b]);
#pragma unroll
      for (int a = 0; a < RM; ++a)
#pragma unroll
        for (int b = 0; b < RN; ++b) acc[a][b] = fma(gv[a], vv[b], acc[a][b]);
    }
  }

  // dz[i0 + r][d0 + c] = acc[r][c] * scale inside the n x d matrix. `staging` is unused here.
  __device__ void store(Acc* dz, int64_t ld_dz, int64_t i0, int64_t d0, int64_t n, int64_t d, Acc scale,
                        unsigned char* /*staging*/) const {
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll
    for (int a = 0; a < RM; ++a) {
      const int64_t i = i0 + ty + TY * a;
      if (i >= n) continue;
#pragma unroll
      for (int b = 0; b < RN; ++b) {
        const int64_t k = d0 + tx + TX * b;
        if (k < d) dz[i * ld_dz + k] = acc[a][b] * scale;
      }
    }
  }
};

// ----------------------------------------------------------------------------------------------
// WMMA tile products (fp16, bf16: 16x16x16; fp32 as TF32: 16x16x8; fp32 accumulation)
// ----------------------------------------------------------------------------------------------

template <typename T>
struct WmmaType;
template <>
struct WmmaType<__half> {
  static constexpr int K = 16;
  static constexpr int kPad = 8;  // keeps rows 16-byte aligned and shifts banks between rows
};
template <>
struct WmmaType<__nv_bfloat16> {
  static constexpr int K = 16;
  static constexpr int kPad = 8;
};
template <>
struct WmmaType<float> {
  static constexpr int K = 8;
  static constexpr int kPad = 4;
};

#ifdef MLC_SUPCON_WMMA
namespace wmma = nvcuda::wmma;

template <typename T>
struct WmmaPrecision {
  using type = T;
};
template <>
struct WmmaPrecision<float> {
  using type = wmma::precision::tf32;
};

// TF32 fragments are loaded as fp32 and must be rounded before the product.
template <typename T, typename Frag>
__device__ __forceinline__ void round_fragment(Frag& f) {
  if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
  }
}
#endif

// The 64 x 64 S tile; warp (wr, wc) of the 2 x 2 warp grid computes rows 32 wr + [0, 32) and
// columns 32 wc + [0, 32) as 2 x 2 fragments. Chunks are stored row-major, As[r][k] and Bs[c][k];
// Bs read as a column-major K x N operand gives Z_J^T without a transpose.
template <typename T, int BM, int BN, int BK>
struct WmmaScore {
  static_assert(BM == 64 && BN == 64, "the warp layout covers a 64 x 64 tile");
  static constexpr int K = WmmaType<T>::K;
  static constexpr int LDA = BK + WmmaType<T>::kPad;
  static constexpr std::size_t kBytes = sizeof(T) * (BM + BN) * LDA;

  __device__ static void run(const T* __restrict__ z, int64_t ldz, int64_t n, int64_t d, int64_t i0, int64_t j0,
                             unsigned char* ab, float* S, int lds, bool vec) {
#ifdef MLC_SUPCON_WMMA
    using P = typename WmmaPrecision<T>::type;
    T* As = reinterpret_cast<T*>(ab);
    T* Bs = As + BM * LDA;
    const int warp = threadIdx.x / kWarp, wr = warp / 2, wc = warp % 2;
    wmma::fragment<wmma::accumulator, 16, 16, K, float> c[2][2];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::fill_fragment(c[a][b], 0.0f);

    for (int64_t k0 = 0; k0 < d; k0 += BK) {
      __syncthreads();
      load_tile<BM, BK, false, LDA>(As, z, ldz, i0, k0, n, d, vec);
      load_tile<BN, BK, false, LDA>(Bs, z, ldz, j0, k0, n, d, vec);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += K) {
        wmma::fragment<wmma::matrix_a, 16, 16, K, P, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, K, P, wmma::col_major> fb[2];
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          wmma::load_matrix_sync(fa[f], As + (32 * wr + 16 * f) * LDA + kk, LDA);
          wmma::load_matrix_sync(fb[f], Bs + (32 * wc + 16 * f) * LDA + kk, LDA);
          round_fragment<T>(fa[f]);
          round_fragment<T>(fb[f]);
        }
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 2; ++b) wmma::mma_sync(c[a][b], fa[a], fb[b], c[a][b]);
      }
    }
    __syncthreads();  // S may still be read by the previous tile's epilogue when d == 0
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b)
        wmma::store_matrix_sync(S + (32 * wr + 16 * a) * lds + 32 * wc + 16 * b, c[a][b], lds, wmma::mem_row_major);
#else
    __trap();
#endif
  }
};

// dZ_I slice (64 x DP) += G (64 x BN, element type, row-major) V (BN x DP, row-major); warp
// (wr, wc) owns rows 32 wr + [0, 32) and columns wc DP/2 + [0, DP/2) as 2 x NF fragments.
template <typename T, int BM, int BN, int DP>
struct WmmaGrad {
  static_assert(BM == 64, "the warp layout covers 64 rows");
  static constexpr int K = WmmaType<T>::K;
  static constexpr int NF = DP / 2 / 16;
  static_assert(NF * 32 == DP, "DP must be a multiple of 32");
#ifdef MLC_SUPCON_WMMA
  wmma::fragment<wmma::accumulator, 16, 16, K, float> acc[2][NF];
#endif

  __device__ void init() {
#ifdef MLC_SUPCON_WMMA
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < NF; ++b) wmma::fill_fragment(acc[a][b], 0.0f);
#endif
  }

  __device__ void mma(const T* G, int ldg, const T* V, int ldv) {
#ifdef MLC_SUPCON_WMMA
    using P = typename WmmaPrecision<T>::type;
    const int warp = threadIdx.x / kWarp, wr = warp / 2, wc = warp % 2;
#pragma unroll
    for (int kk = 0; kk < BN; kk += K) {
      wmma::fragment<wmma::matrix_a, 16, 16, K, P, wmma::row_major> fa[2];
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        wmma::load_matrix_sync(fa[a], G + (32 * wr + 16 * a) * ldg + kk, ldg);
        round_fragment<T>(fa[a]);
      }
#pragma unroll
      for (int b = 0; b < NF; ++b) {
        wmma::fragment<wmma::matrix_b, 16, 16, K, P, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, V + kk * ldv + wc * (DP / 2) + 16 * b, ldv);
        round_fragment<T>(fb);
#pragma unroll
        for (int a = 0; a < 2; ++a) wmma::mma_sync(acc[a][b], fa[a], fb, acc[a][b]);
      }
    }
#else
    __trap();
#endif
  }

  // Each warp stages one 16 x 16 fragment at a time in its own 1 KiB of `staging` (shared memory
  // no longer read by anyone) and writes the part inside the n x d matrix, times `scale`.
  __device__ void store(float* dz, int64_t ld_dz, int64_t i0, int64_t d0, int64_t n, int64_t d, float scale,
                        unsigned char* staging) {
#ifdef MLC_SUPCON_WMMA
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, wr = warp / 2, wc = warp % 2;
    float* stage = reinterpret_cast<float*>(staging) + warp * 256;
#pragma unroll
    for (int a = 0; a < 2; ++a) {
#pragma unroll
      for (int b = 0; b < NF; ++b) {
        wmma::store_matrix_sync(stage, acc[a][b], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += kWarp) {
          const int64_t i = i0 + 32 * wr + 16 * a + e / 16;
          const int64_t k = d0 + wc * (DP / 2) + 16 * b + e % 16;
          if (i < n && k < d) dz[i * ld_dz + k] = stage[e] * scale;
        }
        __syncwarp();
      }
    }
#else
    __trap();
#endif
  }
};

// ----------------------------------------------------------------------------------------------
// Configurations
// ----------------------------------------------------------------------------------------------

template <typename T, bool TensorCores>
struct KernelConfig;

// SIMT: fp32/fp16/bf16 in 64 x 64 tiles; fp64 in 32 x 32 tiles (twice the bytes per element).
template <typename T>
struct KernelConfig<T, false> {
  static constexpr bool kTensorCores = false;
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kWide = sizeof(T) == 8;
  static constexpr int BM = kWide ? 32 : 64, BN = BM, BK = kWide ? 16 : 32, DP = kWide ? 32 : 64;
  using Score = SimtScore<T, Acc, BM, BN, BK>;
  using Grad = SimtGrad<T, Acc, BM, BN, DP>;
  // S (and G, in place) row stride: 2 mod 32 words, so the epilogue's (row, part) reads hit
  // distinct banks.
  static constexpr int LDS = BN + 2;
  using GType = Acc;
  static constexpr bool kSeparateG = false;
  static constexpr int LDG = LDS;
  static constexpr int LDV = DP;
};

// WMMA: T in {__half, __nv_bfloat16, float (TF32)}.
template <typename T>
struct KernelConfig<T, true> {
  static constexpr bool kTensorCores = true;
  using Elem = T;
  using Acc = float;
  // 16-bit chunks of 64 columns: half the barriers and load rounds per tile of the 32 that fp32 (twice
  // the bytes) fits in the static shared memory.
  static constexpr int BM = 64, BN = 64, BK = sizeof(T) == 2 ? 64 : 32, DP = sizeof(T) == 2 ? 128 : 64;
  using Score = WmmaScore<T, BM, BN, BK>;
  using Grad = WmmaGrad<T, BM, BN, DP>;
  static constexpr int LDS = BN + 4;  // wmma needs a multiple of 4 floats
  // fp16/bf16 G has its own buffer in the element type; TF32 G overwrites S in place (fp32).
  using GType = T;
  static constexpr bool kSeparateG = !std::is_same<T, float>::value;
  static constexpr int LDG = kSeparateG ? BN + WmmaType<T>::kPad : LDS;
  static constexpr int LDV = DP + WmmaType<T>::kPad;
};

// Shared-memory layout, in bytes from a 128-byte aligned base:
//   [S tile: BM x LDS Acc][w_J, lse_J: 2 x BN Acc (backward)][U]
// where U holds the Z chunks of phase 1, and later (backward) G (when separate) and the V slice.
template <class Cfg>
struct SmemLayout {
  using Acc = typename Cfg::Acc;
  using T = typename Cfg::Elem;
  static constexpr std::size_t kS = round_up(sizeof(Acc) * Cfg::BM * Cfg::LDS, 128);
  static constexpr std::size_t kWL = round_up(sizeof(Acc) * 2 * Cfg::BN, 128);
  static constexpr std::size_t kG = Cfg::kSeparateG ? round_up(sizeof(T) * Cfg::BM * Cfg::LDG, 128) : 0;
  static constexpr std::size_t kV = round_up(sizeof(T) * Cfg::BN * Cfg::LDV, 128);
  static constexpr std::size_t kAB = round_up(Cfg::Score::kBytes, 128);
  static constexpr std::size_t kFwdBytes = kS + kAB;
  static constexpr std::size_t kU = kAB > kG + kV ? kAB : kG + kV;
  static constexpr std::size_t kBwdBytes = kS + kWL + kU;
  static_assert(kFwdBytes <= 48 * 1024 && kBwdBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");
  static_assert(kS >= 4 * 256 * sizeof(float), "the S tile doubles as the WMMA store staging area");
};

// ----------------------------------------------------------------------------------------------
// Kernels
// ----------------------------------------------------------------------------------------------

// Row LSE of the anchors. grid = lse_grid<Cfg>(p), 128 threads; block x covers rows
// row_begin + BM x .. + BM and streams the column tiles from col_begin on (the contrast rows). Thread t
// reads row r = t / TPR of each S tile, at columns (t % TPR) + TPR c, and keeps an online (max, sum) for
// them; the TPR partial states of a row (adjacent lanes) merge at the end.
template <class Cfg>
__global__ void __launch_bounds__(kThreads) lse_kernel(const LabelSupconFwdParams p) {
  using T = typename Cfg::Elem;
  using Acc = typename Cfg::Acc;
  using L = SmemLayout<Cfg>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, TPR = kThreads / BM;
  static_assert(kThreads % BM == 0 && kWarp % TPR == 0, "a row's threads must be adjacent lanes of one warp");
  __shared__ __align__(128) unsigned char smem[L::kFwdBytes];
  Acc* S = reinterpret_cast<Acc*>(smem);
  unsigned char* ab = smem + L::kS;

  const T* z = static_cast<const T*>(p.z);
  const int64_t n = p.n, i0 = p.row_begin + int64_t(blockIdx.x) * BM;
  const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
  const int64_t i = i0 + r;
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);
  const Acc neg_inf = -inf_of<Acc>();
  const bool vec = vector_loads_ok(p.z, p.ld_z, p.d, sizeof(T));

  // With a fixed shift c the running max is c from the start and never moves: one pass per tile.
  const bool fixed_shift = p.shift != nullptr;
  Acc run_max = fixed_shift ? *static_cast<const Acc*>(p.shift) : neg_inf, run_sum = Acc(0);
  for (int64_t j0 = p.col_begin; j0 < n; j0 += BN) {
    Cfg::Score::run(z, p.ld_z, n, p.d, i0, j0, ab, S, Cfg::LDS, vec);
    __syncthreads();
    const Acc* srow = S + r * Cfg::LDS;
    if (fixed_shift) {
#pragma unroll 4
      for (int c = part; c < BN; c += TPR) {
        const int64_t j = j0 + c;
        if (j < n && j != i) run_sum += acc_exp(srow[c] * inv_t - run_max);
      }
      continue;
    }
    Acc tile_max = neg_inf;
#pragma unroll 4
    for (int c = part; c < BN; c += TPR) {
      const int64_t j = j0 + c;
      if (j < n && j != i) tile_max = max(tile_max, srow[c] * inv_t);
    }
    if (tile_max > neg_inf) {
      const Acc new_max = max(run_max, tile_max);
      Acc sum = run_sum * acc_exp(run_max - new_max);  // exp(-inf) = 0 on the first tile
#pragma unroll 4
      for (int c = part; c < BN; c += TPR) {
        const int64_t j = j0 + c;
        if (j < n && j != i) sum += acc_exp(srow[c] * inv_t - new_max);
      }
      run_max = new_max;
      run_sum = sum;
    }
  }
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset /= 2) {
    const Acc other_max = __shfl_xor_sync(0xffffffffu, run_max, offset);
    const Acc other_sum = __shfl_xor_sync(0xffffffffu, run_sum, offset);
    const Acc m = max(run_max, other_max);
    if (m > neg_inf) {
      run_sum = run_sum * acc_exp(run_max - m) + other_sum * acc_exp(other_max - m);
      run_max = m;
    }
  }
  if (part == 0 && i < p.row_end) {
    // A row with no other contrast row has an empty set: -inf, as on the CPU (log 0 with a shift).
    static_cast<Acc*>(p.lse)[i] = run_max > neg_inf ? run_max + acc_log(run_sum) : neg_inf;
  }
}

// Gradient of the LSE part. grid = lse_grad_grid<Cfg>(p) = (ceil(n / BM), ceil(d / DP)), 128
// threads; block (x, y) writes dz rows [BM x, BM (x + 1)) and columns [DP y, DP (y + 1)),
// overwriting them. A row block visits the contrast rows' tiles if it holds anchors (their own terms)
// and the anchors' tiles if it holds rows in [col_begin, grad_end) (their contrast role); a block outside
// the anchors has w = 0, so its G is 0 but for the anchors' columns, and a block of neither (a detached
// memory) visits nothing and writes zeros.
template <class Cfg>
__global__ void __launch_bounds__(kThreads) lse_grad_kernel(const LabelSupconBwdParams p) {
  using T = typename Cfg::Elem;
  using Acc = typename Cfg::Acc;
  using G_t = typename Cfg::GType;
  using L = SmemLayout<Cfg>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, DP = Cfg::DP, TPR = kThreads / BM;
  static_assert(kThreads % BM == 0 && BN <= kThreads, "layout");
  __shared__ __align__(128) unsigned char smem[L::kBwdBytes];
  Acc* S = reinterpret_cast<Acc*>(smem);
  Acc* w_j = reinterpret_cast<Acc*>(smem + L::kS);  // w_J, or alpha_J with one exp per pair
  Acc* lse_j = w_j + BN;
  unsigned char* u = smem + L::kS + L::kWL;
  G_t* G = Cfg::kSeparateG ? reinterpret_cast<G_t*>(u) : reinterpret_cast<G_t*>(S);
  T* V = reinterpret_cast<T*>(u + L::kG);

  const T* z = static_cast<const T*>(p.z);
  const Acc* w = static_cast<const Acc*>(p.w);
  const Acc* lse = static_cast<const Acc*>(p.lse);
  const int64_t n = p.n, d = p.d, i0 = int64_t(blockIdx.x) * BM, d0 = int64_t(blockIdx.y) * DP;
  const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
  const int64_t i = i0 + r;
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);
  const Acc inf = inf_of<Acc>();
  const Acc g_scale = p.g_scale != nullptr ? static_cast<Acc>(*p.g_scale) : Acc(1);
  const bool vec = vector_loads_ok(p.z, p.ld_z, d, sizeof(T));
  // One exp per pair: G = exp(s - c) (alpha_i + alpha_j), the weights being alpha instead of w.
  const bool one_exp = p.alpha != nullptr;
  const Acc shift = one_exp ? *static_cast<const Acc*>(p.shift) : Acc(0);
  const Acc* weight = one_exp ? static_cast<const Acc*>(p.alpha) : w;
  // Padding rows (i >= n) get G = 0; their output is never written.
  const Acc w_i = i < n ? weight[i] : Acc(0);
  const Acc lse_i = i < n ? lse[i] : inf;
  // Row i's own terms run over its contrast rows j >= col_begin; it takes the other anchors' terms (its
  // contrast role) only from col_begin to grad_end. Both hold for every pair by default.
  const bool side_i = i >= p.col_begin && i < p.grad_end;

  const bool anchor_block = i0 < p.anchor_end && i0 + BM > p.anchor_begin;
  const bool side_block = i0 < p.grad_end && i0 + BM > p.col_begin && p.anchor_begin < p.anchor_end;
  // The union of the two column ranges that apply, as one range (a gap between them holds only zeros of G).
  const int64_t own_begin = anchor_block ? p.col_begin : n, side_begin = side_block ? p.anchor_begin : n;
  const int64_t own_end = anchor_block ? n : 0, side_end = side_block ? p.anchor_end : 0;
  const int64_t j_begin = own_begin < side_begin ? own_begin : side_begin;
  const int64_t j_end = own_end > side_end ? own_end : side_end;

  typename Cfg::Grad grad;
  grad.init();
  for (int64_t j0 = j_begin; j0 < j_end; j0 += BN) {
    // w_J / lse_J were last read in the previous tile's epilogue, which two barriers separate from here.
    if (threadIdx.x < BN) {
      const int64_t j = j0 + threadIdx.x;
      w_j[threadIdx.x] = j < n ? weight[j] : Acc(0);
      lse_j[threadIdx.x] = j < n ? lse[j] : inf;
    }
    Cfg::Score::run(z, p.ld_z, n, d, i0, j0, u, S, Cfg::LDS, vec);
    __syncthreads();  // S complete; the Z chunks in U are no longer read
    for (int c = part; c < BN; c += TPR) {
      const int64_t j = j0 + c;
      Acc g = Acc(0);
      if (i < n && j < n && j != i) {
        const Acc s = S[r * Cfg::LDS + c] * inv_t;
        const bool own = j >= p.col_begin;
        if (one_exp) {
          g = acc_exp(s - shift) * ((own ? w_i : Acc(0)) + (side_i ? w_j[c] : Acc(0)));
        } else {
          g = (own ? w_i * acc_exp(s - lse_i) : Acc(0)) + (side_i ? w_j[c] * acc_exp(s - lse_j[c]) : Acc(0));
        }
      }
      // In place for fp32/fp64 G: each thread overwrites only the entries it has just read.
      G[r * Cfg::LDG + c] = from_acc<G_t>(g * g_scale);
    }
    load_tile<BN, DP, false, Cfg::LDV>(V, z, p.ld_z, j0, d0, n, d, vec);
    __syncthreads();  // G and V complete
    grad.mma(G, Cfg::LDG, V, Cfg::LDV);
  }
  // The S area is free once every warp is past its last product.
  __syncthreads();
  grad.store(static_cast<Acc*>(p.dz), p.ld_dz, i0, d0, n, d, Acc(1) / g_scale, smem);
}

// The grids of the two kernels, for the launchers and the CPU emulation alike.
template <class Cfg>
dim3 lse_grid(const LabelSupconFwdParams& p) {
  return dim3(blocks_for(p.row_end - p.row_begin, Cfg::BM));
}

template <class Cfg>
dim3 lse_grad_grid(const LabelSupconBwdParams& p) {
  return dim3(blocks_for(p.n, Cfg::BM), blocks_for(p.d, Cfg::DP));
}

}  // namespace supcon
}  // namespace cuda
}  // namespace mlcontrast
