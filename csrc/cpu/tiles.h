// The symmetric tiling of S = Z Z^T / t for the CPU losses whose row statistics run over the other rows
// (label_supcon.cpp and multihot_supcon.cpp).
//
// Among the anchor rows that are also columns of each other (Plan::sym), only the [kRowBlock x kColBlock]
// tiles on and above the diagonal are computed, each serving its rows and its columns; the columns outside
// them (a process_group call's other ranks' rows, reference rows) are visited once per anchor block, for
// its rows only. Anchors that are no such column (rows before the contrast columns, or, in a backward,
// rows that take no column-side gradient) get one-sided tiles over all the columns: rectangular work.
// Workers own whole tile rows (zig-zag, so the triangle is balanced) and keep private accumulators, so no
// two threads write the same memory and results do not depend on scheduling.
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

// A range of rows [begin, end).
struct Range {
  int64_t begin = 0;
  int64_t end = 0;
};

// How a column tile relates to its row block: the diagonal block (square; its rows cover both orders
// of its pairs), a tile above it among the symmetric anchors (serves its rows and its columns), or a
// one-sided tile (serves its rows only; a caller that wants the columns' side of it asks for it).
enum class Tile { kDiagonal, kSymmetric, kRowsOnly };

// Anchors: any type with begin and end (Range, label_supcon::Roles).
template <class Anchors>
int64_t row_blocks(const Anchors& a) {
  return (a.end - a.begin + kRowBlock - 1) / kRowBlock;
}

// The row blocks of a pass and the columns their tiles cover. Every anchor sees the columns
// [col_begin, n) (but itself); `sym`, the anchors that are such columns and may serve the columns' side
// of a tile (rows below sym_end of plan()), share the symmetric tiles; `rest`, the other anchors (before
// and after sym), get one-sided tiles over all columns.
struct Plan {
  Range sym;
  Range rest[2];
  int64_t col_begin = 0;
  int64_t n = 0;

  int64_t blocks() const { return row_blocks(sym) + row_blocks(rest[0]) + row_blocks(rest[1]); }
};

// The plan of the anchors `a` against the columns [col_begin, n), whose symmetric anchors lie below sym_end
// (a forward: n; a backward: the rows that take the gradient of the columns' side).
template <class Anchors>
Plan plan(const Anchors& a, int64_t col_begin, int64_t sym_end, int64_t n) {
  Plan p;
  p.col_begin = col_begin;
  p.n = n;
  const int64_t begin = std::max(a.begin, col_begin), end = std::min(a.end, sym_end);
  if (begin < end) {
    p.sym = {begin, end};
    p.rest[0] = {a.begin, begin};
    p.rest[1] = {end, a.end};
  } else {
    p.sym = {a.begin, a.begin};
    p.rest[0] = {a.begin, a.end};
  }
  return p;
}

// The plan of every anchor against every row (all symmetric), as multihot_supcon runs.
template <class Anchors>
Plan plan(const Anchors& a, int64_t n) {
  return plan(a, 0, n, n);
}

// Number of workers for the tiles of `blocks` row blocks, each holding bytes_per_worker of accumulators.
inline int64_t triangle_workers(int64_t blocks, int64_t bytes_per_worker) {
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), blocks,
                                                 kAccumulatorBudgetBytes / std::max<int64_t>(1, bytes_per_worker)}));
}

// Zig-zag ownership of tile rows balances the triangle: long rows (small b) pair with short ones.
inline bool owns(int64_t worker, int64_t workers, int64_t block) {
  const int64_t pos = block % (2 * workers);
  return (pos < workers ? pos : 2 * workers - 1 - pos) == worker;
}

// Whether the tile of rows i0 .. i0 + rows and columns j0 .. j0 + cols holds self-pairs.
inline bool meets_diagonal(int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
  return j0 < i0 + rows && i0 < j0 + cols;
}

// Calls visit(j0, cols, kind) for every column tile of the row block i0 .. i0 + rows (`symmetric`: a block
// of p.sym). A one-sided tile of a block outside p.sym may hold self-pairs (meets_diagonal).
template <class Visit>
void for_each_tile(int64_t i0, int64_t rows, bool symmetric, const Plan& p, Visit visit) {
  auto sweep = [&](int64_t from, int64_t to, Tile kind) {
    for (int64_t j0 = from; j0 < to; j0 += kColBlock) visit(j0, std::min(kColBlock, to - j0), kind);
  };
  if (!symmetric) {
    sweep(p.col_begin, p.n, Tile::kRowsOnly);
    return;
  }
  visit(i0, rows, Tile::kDiagonal);
  sweep(i0 + rows, p.sym.end, Tile::kSymmetric);
  sweep(p.sym.end, p.n, Tile::kRowsOnly);
  sweep(p.col_begin, p.sym.begin, Tile::kRowsOnly);
}

// Calls visit(i0, rows, symmetric) for the row blocks of `worker`: the blocks of p.sym, then those of
// p.rest, numbered in that order for the zig-zag.
template <class Visit>
void for_each_block(int64_t worker, int64_t workers, const Plan& p, Visit visit) {
  int64_t b = 0;
  auto blocks_of = [&](const Range& r, bool symmetric) {
    for (int64_t i0 = r.begin; i0 < r.end; i0 += kRowBlock, ++b) {
      if (owns(worker, workers, b)) visit(i0, std::min(kRowBlock, r.end - i0), symmetric);
    }
  };
  blocks_of(p.sym, true);
  blocks_of(p.rest[0], false);
  blocks_of(p.rest[1], false);
}

// Every anchor against every row (plan(a, n)): visit(j0, cols, kind) for the tiles of the anchor block i0.
template <class Anchors, class Visit>
void for_each_tile(int64_t i0, int64_t rows, const Anchors& a, int64_t n, Visit visit) {
  for_each_tile(i0, rows, true, plan(a, n), visit);
}

// Every anchor against every row: visit(i0, rows) for the anchor blocks of `worker`.
template <class Anchors, class Visit>
void for_each_block(int64_t worker, int64_t workers, const Anchors& a, Visit visit) {
  const Range r{a.begin, a.end};
  for_each_block(worker, workers, plan(r, r.end), [&](int64_t i0, int64_t rows, bool) { visit(i0, rows); });
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
