// Kernel templates of prototype_nce (SADCL's PSCL): the cosine logits of each row against its own
// class prototype, and their gradient. Launchers: prototype_nce_kernel.cu.
//
// Every row r of the [B * C, D] features meets one prototype (class r % C), so the work is O(N D)
// and memory-bound: one warp per row reads it once (coalesced), reduces the dot product and the
// squared norm with shuffles. The prototype gradient is a per-class sum over the B rows of that
// class, done by one thread per (class, column) in the order of b: deterministic, no atomics.
#pragma once

#include "common.cuh"

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

// grad_unit_p[c][k] = sum_b ds_{bc} z_{bc}[k] / norm_{bc}. grid = (C, ceil(D / kThreads)).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) grad_prototypes_kernel(const PrototypeNceBwdParams p) {
  const int64_t cls = blockIdx.x;
  const int64_t k = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (k >= p.d) return;
  const T* z = static_cast<const T*>(p.z);
  const Acc* dlogits = static_cast<const Acc*>(p.dlogits);
  const Acc* norm = static_cast<const Acc*>(p.norm);
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);
  Acc acc = Acc(0);
  for (int64_t r = cls; r < p.rows; r += p.c) {
    const Acc ds = dlogits[r] * inv_t;
    acc += ds * (to_acc<Acc>(z[r * p.d + k]) / norm[r]);
  }
  static_cast<Acc*>(p.grad_unit_p)[cls * p.d + k] = acc;
}

// The grids of the kernels (one warp per row; one thread per (class, column)), for the launchers
// and the CPU emulation alike.
inline dim3 rows_grid(int64_t rows) { return dim3(blocks_for(rows, kRowsPerBlock)); }
inline dim3 prototypes_grid(int64_t c, int64_t d) {
  return dim3(static_cast<unsigned int>(c), blocks_for(d, kThreads));
}

}  // namespace nce
}  // namespace cuda
}  // namespace mlcontrast
