// Element-wise kernels for the tiles of the CPU losses, written as plain loops that the compiler
// vectorises, with a polynomial exp. The float versions are compiled for several instruction sets
// (GCC/Clang target_clones) and the best one is picked at load time, so one build runs everywhere
// and still uses AVX2/AVX-512 where the CPU has them.
#pragma once

#include <cstdint>

namespace mlcontrast {
namespace cpu {

// Row-wise online log-sum-exp update over a [rows x cols] tile with leading dimension ld:
//   m' = max(m, max_j s_rj);  sum' = sum * exp(m - m') + sum_j exp(s_rj - m').
// -inf entries (masked pairs) contribute 0; a row that has only seen -inf keeps m = -inf, sum = 0.
void online_lse_update(const float* s, int64_t rows, int64_t cols, int64_t ld, float* run_max, float* run_sum);
void online_lse_update(const double* s, int64_t rows, int64_t cols, int64_t ld, double* run_max,
                       double* run_sum);

// The same update for the columns of the tile: every column j of the tile is one more stretch of
// the row j of the full matrix (S is symmetric). `scratch` holds 2 * cols values.
void online_lse_update_cols(const float* s, int64_t rows, int64_t cols, int64_t ld, float* run_max, float* run_sum,
                            float* scratch);
void online_lse_update_cols(const double* s, int64_t rows, int64_t cols, int64_t ld, double* run_max,
                            double* run_sum, double* scratch);

// In place: h_rj <- w_r exp(h_rj - lse_r), plus w_j exp(h_rj - lse_j) when lse_col is not null.
// Weights of 0 must come with lse = +inf so that the term is exactly 0.
void softmax_weights(float* h, int64_t rows, int64_t cols, int64_t ld, const float* lse_row, const float* w_row,
                     const float* lse_col, const float* w_col);
void softmax_weights(double* h, int64_t rows, int64_t cols, int64_t ld, const double* lse_row,
                     const double* w_row, const double* lse_col, const double* w_col);

// A tile of the one-sided queue pass (label_supcon_queue.cpp), in place. First: s_rj <- s_rj col_scale_j +
// col_bias_j (bias 0, or -inf for a column that takes no part) and tile_max_r = max_j s_rj. Then, with a
// row shift (+inf for a row to leave out): s_rj <- exp(s_rj - shift_r) col_weight_j, adding sum_j
// exp(s_rj - shift_r) to row_sum_r.
void queue_tile_max(float* s, int64_t rows, int64_t cols, int64_t ld, const float* col_scale, const float* col_bias,
                    float* tile_max);
void queue_tile_max(double* s, int64_t rows, int64_t cols, int64_t ld, const double* col_scale,
                    const double* col_bias, double* tile_max);
void queue_tile_exp(float* s, int64_t rows, int64_t cols, int64_t ld, const float* shift, const float* col_weight,
                    float* row_sum);
void queue_tile_exp(double* s, int64_t rows, int64_t cols, int64_t ld, const double* shift,
                    const double* col_weight, double* row_sum);

}  // namespace cpu
}  // namespace mlcontrast
