// The symmetric tiling of S = Z Z^T / t for the CPU losses whose row statistics run over all other rows
// (label_supcon.cpp and multihot_supcon.cpp).
//
// Among the anchor rows [a.begin, a.end), only the [kRowBlock x kColBlock] tiles on and above the
// diagonal are computed, each serving its rows and its columns; the columns outside the anchors (a
// process_group call's other ranks' rows, reference rows) are visited once per anchor block, for its
// rows only. Workers own whole tile rows (zig-zag, so the triangle is balanced) and keep private
// accumulators, so no two threads write the same memory and results do not depend on scheduling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace mlcontrast {
namespace cpu {
namespace tiles {

constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 512;
// Scratch bound for the per-worker accumulators ([N] or [N, D] each).
constexpr int64_t kAccumulatorBudgetBytes = int64_t(512) << 20;

// The anchor rows [begin, end) of the contrast set.
struct Range {
  int64_t begin = 0;
  int64_t end = 0;
};

// How a column tile relates to its row block: the diagonal block (square; its rows cover both orders
// of its pairs), a tile above it among the anchors (serves its rows and its columns), or a tile of
// columns outside the anchors (serves its rows only, as those columns have no loss).
enum class Tile { kDiagonal, kSymmetric, kRowsOnly };

// Anchors: any type with begin and end (Range, label_supcon::Anchors).
template <class Anchors>
int64_t row_blocks(const Anchors& a) { return (a.end - a.begin + kRowBlock - 1) / kRowBlock; }

// Number of workers for the triangle of tiles, each holding bytes_per_worker of accumulators.
inline int64_t triangle_workers(int64_t blocks, int64_t bytes_per_worker) {
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), blocks,
                                                 kAccumulatorBudgetBytes / std::max<int64_t>(1, bytes_per_worker)}));
}

// Zig-zag ownership of tile rows balances the triangle: long rows (small b) pair with short ones.
inline bool owns(int64_t worker, int64_t workers, int64_t block) {
  const int64_t pos = block % (2 * workers);
  return (pos < workers ? pos : 2 * workers - 1 - pos) == worker;
}

// Calls visit(j0, cols, kind) for every column tile of the anchor block of rows i0 .. i0 + rows.
template <class Anchors, class Visit>
void for_each_tile(int64_t i0, int64_t rows, const Anchors& a, int64_t n, Visit visit) {
  visit(i0, rows, Tile::kDiagonal);
  auto sweep = [&](int64_t from, int64_t to, Tile kind) {
    for (int64_t j0 = from; j0 < to; j0 += kColBlock) visit(j0, std::min(kColBlock, to - j0), kind);
  };
  sweep(i0 + rows, a.end, Tile::kSymmetric);
  sweep(a.end, n, Tile::kRowsOnly);
  sweep(0, a.begin, Tile::kRowsOnly);
}

// Calls visit(i0, rows) for the anchor blocks of `worker`.
template <class Anchors, class Visit>
void for_each_block(int64_t worker, int64_t workers, const Anchors& a, Visit visit) {
  const int64_t blocks = row_blocks(a);
  for (int64_t b = 0; b < blocks; ++b) {
    if (!owns(worker, workers, b)) continue;
    const int64_t i0 = a.begin + b * kRowBlock;
    visit(i0, std::min(kRowBlock, a.end - i0));
  }
}

// s = zi zj^T / t, the temperature applied by the GEMM (no scaled copy of the features).
inline void similarity_tile(at::Tensor& s, const at::Tensor& zi, const at::Tensor& zj, double inv_t) {
  at::addmm_out(s, s, zi, zj.t(), /*beta=*/0, /*alpha=*/inv_t);
}

// Sets the entries of a tile (rows from global row i0, columns from global column j0) that lie on the
// global diagonal, i.e. the self-pairs, to `value`.
inline void fill_diagonal(at::Tensor& tile, int64_t i0, int64_t j0, double value) {
  tile.diagonal(i0 - j0).fill_(value);
}

}  // namespace tiles
}  // namespace cpu
}  // namespace mlcontrast
