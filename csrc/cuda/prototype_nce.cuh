// Kernel templates of prototype_nce (SADCL's PSCL): the cosine logits of each row against its own
// class prototype, and their gradient. Launchers: prototype_nce_kernel.cu.
//
// Every row r of the [B * C, D] features meets one prototype (class r % C), so the work is O(N D)
// and memory-bound: one warp per row reads it once (coalesced), reduces the dot product and the
// squared norm with shuffles. The prototype gradient is a per-class sum over the B rows of that
// class. One thread per (class, column) alone would give C * D / kThreads blocks (160 at C = 80,
// D = 256: too few for a GPU of 132 SMs), each serial over B; so B is split into S runs, one block
// per (class, column block, run), each writing its partial sum in the order of b, and a second pass
// adds the S partials in the order of s: deterministic, no atomics (the Triton kernel's policy).
#pragma once

#include <algorithm>

#include "primitives.cuh"

namespace mlcontrast {
namespace cuda {
namespace nce {

constexpr int kRowsPerBlock = kThreads / kWarp;

// logits_r = z_r . unit_p_{r % c} / max(|z_r|, eps) * inv_t (the CPU kernel's formula), and
// norm_r = max(|z_r|, eps).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) logits_kernel(const PrototypeNceFwdParams p) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= p.rows) return;  // uniform across the warp
  const T* zr = static_cast<const T*>(p.z) + row * p.d;
  const Acc* pr = static_cast<const Acc*>(p.unit_p) + (row % p.c) * p.d;
  Acc dot = Acc(0), sq = Acc(0);
  for (int64_t k = lane; k < p.d; k += kWarp) {
    const Acc x = to_acc<Acc>(zr[k]);
    dot += x * pr[k];
    sq += x * x;
  }
  dot = warp_sum(dot);
  sq = warp_sum(sq);
  if (lane == 0) {
    const Acc clamped = max(acc_sqrt(sq), static_cast<Acc>(p.eps));
    static_cast<Acc*>(p.logits)[row] = dot / clamped * static_cast<Acc>(p.inv_temperature);
    static_cast<Acc*>(p.norm)[row] = clamped;
  }
}

// grad_z_r through the fused normalisation, and norm_r = max(|z_r|, eps) for the prototype pass.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) grad_rows_kernel(const PrototypeNceBwdParams p) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= p.rows) return;  // uniform across the warp
  const T* zr = static_cast<const T*>(p.z) + row * p.d;
  const Acc* pr = static_cast<const Acc*>(p.unit_p) + (row % p.c) * p.d;
  Acc dot = Acc(0), sq = Acc(0);
  for (int64_t k = lane; k < p.d; k += kWarp) {
    const Acc x = to_acc<Acc>(zr[k]);
    dot += x * pr[k];
    sq += x * x;
  }
  dot = warp_sum(dot);
  sq = warp_sum(sq);
  const Acc eps = static_cast<Acc>(p.eps);
  const Acc norm = acc_sqrt(sq), clamped = max(norm, eps);
  const Acc ds = static_cast<const Acc*>(p.dlogits)[row] * static_cast<Acc>(p.inv_temperature);
  // The gradient of the unit row is ds * p; its radial part only counts where the norm is not clamped.
  const Acc radial = norm > eps ? ds * dot / clamped : Acc(0);
  if (lane == 0) static_cast<Acc*>(p.norm)[row] = clamped;
  T* gz = static_cast<T*>(p.grad_z) + row * p.d;
  for (int64_t k = lane; k < p.d; k += kWarp) {
    const Acc u = to_acc<Acc>(zr[k]) / clamped;
    gz[k] = from_acc<T>((ds * pr[k] - u * radial) / clamped);
  }
}

// The split policy (mlcontrast/ops/prototype_nce.py's _backward_grid, ops.utils.split_count): as
// many runs as keep the grid within kMostBlocks blocks, at least kMinSamplesPerSplit samples per run
// (fewer cost more in partial traffic than they gain), and at most kPartialsBudget bytes of partials.
constexpr int64_t kMostBlocks = 1024;
constexpr int64_t kMinSamplesPerSplit = 4;
constexpr int64_t kPartialsBudget = int64_t(64) << 20;

inline PrototypeNceSplit split_for(int64_t b, int64_t c, int64_t d, DType dtype) {
  const int64_t tiles = std::max<int64_t>(1, c * int64_t(blocks_for(d, kThreads)));
  const int64_t most = std::max<int64_t>(1, std::min(kMostBlocks / tiles, b / kMinSamplesPerSplit));
  const int64_t acc_bytes = dtype == DType::kFloat64 ? 8 : 4;
  const int64_t by_memory = std::max<int64_t>(1, kPartialsBudget / std::max<int64_t>(1, c * d * acc_bytes));
  const int64_t wanted = std::max<int64_t>(1, std::min({b, most, by_memory}));
  PrototypeNceSplit split;
  split.per_split = std::max<int64_t>(1, (b + wanted - 1) / wanted);
  split.splits = std::max<int64_t>(1, (b + split.per_split - 1) / split.per_split);  // no empty run
  return split;
}

// The sum over the samples b of run s (blockIdx.z) of ds_{bc} z_{bc}[k] / norm_{bc}, in the order of b,
// into grad_unit_p (one run) or partials[s]. grid = prototypes_grid(p).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) grad_prototypes_kernel(const PrototypeNceBwdParams p) {
  const int64_t cls = blockIdx.x;
  const int64_t k = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t run = blockIdx.z;
  if (k >= p.d) return;
  const T* z = static_cast<const T*>(p.z);
  const Acc* dlogits = static_cast<const Acc*>(p.dlogits);
  const Acc* norm = static_cast<const Acc*>(p.norm);
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);
  const int64_t b = p.rows / p.c;
  const int64_t b_begin = run * p.split.per_split;
  const int64_t b_end = b_begin + p.split.per_split < b ? b_begin + p.split.per_split : b;
  Acc acc = Acc(0);
  for (int64_t r = b_begin * p.c + cls; r < b_end * p.c; r += p.c) {
    const Acc ds = dlogits[r] * inv_t;
    acc += ds * (to_acc<Acc>(z[r * p.d + k]) / norm[r]);
  }
  Acc* out = p.split.splits > 1 ? static_cast<Acc*>(p.partials) + run * p.c * p.d : static_cast<Acc*>(p.grad_unit_p);
  out[cls * p.d + k] = acc;
}

// grad_unit_p[i] = sum_s partials[s][i], in the order of s; one thread per entry of [c, d].
template <typename Acc>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const PrototypeNceBwdParams p) {
  const int64_t size = p.c * p.d;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= size) return;
  const Acc* partials = static_cast<const Acc*>(p.partials);
  Acc acc = Acc(0);
  for (int64_t s = 0; s < p.split.splits; ++s) acc += partials[s * size + i];
  static_cast<Acc*>(p.grad_unit_p)[i] = acc;
}

// The grids of the kernels (one warp per row; one thread per (class, column, run); one thread per
// prototype entry), for the launchers and the CPU emulation alike.
inline dim3 rows_grid(int64_t rows) { return dim3(blocks_for(rows, kRowsPerBlock)); }
inline dim3 prototypes_grid(const PrototypeNceBwdParams& p) {
  return dim3(static_cast<unsigned int>(p.c), blocks_for(p.d, kThreads), static_cast<unsigned int>(p.split.splits));
}
inline dim3 partials_grid(const PrototypeNceBwdParams& p) { return dim3(blocks_for(p.c * p.d, kThreads)); }

}  // namespace nce
}  // namespace cuda
}  // namespace mlcontrast
