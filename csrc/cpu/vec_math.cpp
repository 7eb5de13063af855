#include "vec_math.h"

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MLC_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MLC_MULTIVERSION
#endif

namespace mlcontrast {
namespace cpu {
namespace {

// exp(x) for float in about 2 ulp: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r,
// and 2^n built in the exponent bits. Branch-free so loops over it vectorise; exp(-inf) = 0 and
// underflow below -87.3 gives 0, as expf would (up to denormals).
inline float fast_exp(float x) {
  const float lo = -87.33654f, hi = 88.0f;
  const bool underflow = x < lo;
  x = x < lo ? lo : (x > hi ? hi : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  int32_t shifter_bits;
  std::memcpy(&shifter_bits, &shifter, sizeof(shifter_bits));
  // n in [-126, 127] here; 2^n = (n + 127) << 23.
  const int32_t scale_bits = (bits - shifter_bits + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
inline void online_lse_update_impl(const T* s, int64_t rows, int64_t cols, int64_t ld, T* run_max, T* run_sum) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = s + r * ld;
    T m = neg_inf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < cols; ++j) m = row[j] > m ? row[j] : m;
    const T m_new = m > run_max[r] ? m : run_max[r];
    if (m_new == neg_inf) continue;  // nothing but masked entries so far
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) sum += fast_exp(row[j] - m_new);
    run_sum[r] = run_sum[r] * fast_exp(run_max[r] - m_new) + sum;
    run_max[r] = m_new;
  }
}

template <typename T>
inline void online_lse_update_cols_impl(const T* s, int64_t rows, int64_t cols, int64_t ld, T* run_max, T* run_sum,
                                        T* scratch) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T* shift = scratch;
  T* sum = scratch + cols;
  for (int64_t j = 0; j < cols; ++j) shift[j] = run_max[j];
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = s + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) shift[j] = row[j] > shift[j] ? row[j] : shift[j];
  }
  for (int64_t j = 0; j < cols; ++j) sum[j] = 0;
  // A column that has seen only -inf keeps its state; its shift is made finite so exp() gives 0.
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) shift[j] = shift[j] == neg_inf ? T(0) : shift[j];
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = s + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) sum[j] += fast_exp(row[j] - shift[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const bool seen = sum[j] > 0 || run_sum[j] > 0;
    run_sum[j] = run_sum[j] * fast_exp(run_max[j] - shift[j]) + sum[j];
    run_max[j] = seen ? shift[j] : neg_inf;
  }
}

template <typename T>
inline void softmax_weights_impl(T* h, int64_t rows, int64_t cols, int64_t ld, const T* lse_row, const T* w_row,
                                 const T* lse_col, const T* w_col) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = h + r * ld;
    const T l = lse_row[r], w = w_row[r];
    if (lse_col == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) row[j] = w * fast_exp(row[j] - l);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) row[j] = w * fast_exp(row[j] - l) + w_col[j] * fast_exp(row[j] - lse_col[j]);
    }
  }
}

template <typename T>
inline void queue_tile_max_impl(T* s, int64_t rows, int64_t cols, int64_t ld, const T* col_scale, const T* col_bias,
                                T* tile_max) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = s + r * ld;
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < cols; ++j) {
      const T v = row[j] * col_scale[j] + col_bias[j];
      row[j] = v;
      m = v > m ? v : m;
    }
    tile_max[r] = m;
  }
}

template <typename T>
inline void queue_tile_exp_impl(T* s, int64_t rows, int64_t cols, int64_t ld, const T* shift, const T* col_weight,
                                T* row_sum) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = s + r * ld;
    const T m = shift[r];
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      const T p = fast_exp(row[j] - m);
      sum += p;
      row[j] = p * col_weight[j];
    }
    row_sum[r] += sum;
  }
}

}  // namespace

MLC_MULTIVERSION
void queue_tile_max(float* s, int64_t rows, int64_t cols, int64_t ld, const float* col_scale, const float* col_bias,
                    float* tile_max) {
  queue_tile_max_impl(s, rows, cols, ld, col_scale, col_bias, tile_max);
}

void queue_tile_max(double* s, int64_t rows, int64_t cols, int64_t ld, const double* col_scale,
                    const double* col_bias, double* tile_max) {
  queue_tile_max_impl(s, rows, cols, ld, col_scale, col_bias, tile_max);
}

MLC_MULTIVERSION
void queue_tile_exp(float* s, int64_t rows, int64_t cols, int64_t ld, const float* shift, const float* col_weight,
                    float* row_sum) {
  queue_tile_exp_impl(s, rows, cols, ld, shift, col_weight, row_sum);
}

void queue_tile_exp(double* s, int64_t rows, int64_t cols, int64_t ld, const double* shift,
                    const double* col_weight, double* row_sum) {
  queue_tile_exp_impl(s, rows, cols, ld, shift, col_weight, row_sum);
}

MLC_MULTIVERSION
void online_lse_update(const float* s, int64_t rows, int64_t cols, int64_t ld, float* run_max, float* run_sum) {
  online_lse_update_impl(s, rows, cols, ld, run_max, run_sum);
}

void online_lse_update(const double* s, int64_t rows, int64_t cols, int64_t ld, double* run_max, double* run_sum) {
  online_lse_update_impl(s, rows, cols, ld, run_max, run_sum);
}

MLC_MULTIVERSION
void online_lse_update_cols(const float* s, int64_t rows, int64_t cols, int64_t ld, float* run_max, float* run_sum,
                            float* scratch) {
  online_lse_update_cols_impl(s, rows, cols, ld, run_max, run_sum, scratch);
}

void online_lse_update_cols(const double* s, int64_t rows, int64_t cols, int64_t ld, double* run_max,
                            double* run_sum, double* scratch) {
  online_lse_update_cols_impl(s, rows, cols, ld, run_max, run_sum, scratch);
}

MLC_MULTIVERSION
void softmax_weights(float* h, int64_t rows, int64_t cols, int64_t ld, const float* lse_row, const float* w_row,
                     const float* lse_col, const float* w_col) {
  softmax_weights_impl(h, rows, cols, ld, lse_row, w_row, lse_col, w_col);
}

void softmax_weights(double* h, int64_t rows, int64_t cols, int64_t ld, const double* lse_row, const double* w_row,
                     const double* lse_col, const double* w_col) {
  softmax_weights_impl(h, rows, cols, ld, lse_row, w_row, lse_col, w_col);
}

}  // namespace cpu
}  // namespace mlcontrast
