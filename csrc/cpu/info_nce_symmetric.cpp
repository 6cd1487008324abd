// Symmetric (CLIP) InfoNCE on the CPU in two passes over the similarity blocks, for the plain
// case: the positive of row i is column i in both directions, no masks, no smoothing, no hard
// negatives. See fastcl/ops/info_nce/symmetric.py for the driver.
//
// The row-at-a-time kernel of info_nce.cpp runs each direction separately: three products per
// direction, six in all. Here pass 1 (one product per block) gathers the statistics of both
// directions, row max / sum of exp and running column max / sum of exp, and pass 2 (one product, then the
// two gradient products) writes dL/dS of both directions at once:
//   dL/dS_ij = (w_i (softmax_row_ij - [i = j]) + v_j (softmax_column_ij - [i = j])) / tau,
// with s = S / tau, w the row weights and v the column weights (v_j = 0 for j >= tracked, the
// keys past the batch, which are candidates of the row direction only). Four products in all.
// Each softmax is exp((S - max S) / tau) times a factor (weight / tau / sum of exp) that Python
// forms: exp(s - lse) would lose about ulp(|s|) of relative precision (1e-5 at s = 100 in
// float32). Maxima are of the raw S (tau > 0) and the difference is taken before the scaling,
// so both passes form every exponent the same way (no fused multiply-add can differ) and the
// maximum's own term is exactly 1.
#include "registry.h"
#include "cpu/fast_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>

namespace fastcl {
namespace {

using ::fastcl::exp_nonpositive;

template <typename T>
struct Block {
  const T* similarity;  // rows x cols, row stride ld
  int64_t ld;
  int64_t rows;
  int64_t cols;
  int64_t row0;     // global index of the block's first row
  int64_t tracked;  // columns 0..tracked-1 are anchors of the column direction
  T inv_t;
};

// Row max of S, sum of exp((S - max) / tau) and the row's own raw similarity S_ii.
template <typename T>
void row_statistics(const Block<T>& b, T* row_max_out, T* row_sum_out, T* diagonal, int threads) {
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r = 0; r < b.rows; ++r) {
    const T* x = b.similarity + r * b.ld;
    const T inv_t = b.inv_t;
    T row_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : row_max)
    for (int64_t j = 0; j < b.cols; ++j) row_max = std::max(row_max, x[j]);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < b.cols; ++j) sum += exp_nonpositive((x[j] - row_max) * inv_t);
    row_max_out[r] = row_max;
    row_sum_out[r] = sum;
    const int64_t g = b.row0 + r;
    diagonal[r] = g < b.cols ? x[g] : T(0);
  }
  (void)threads;
}

// Folds the block's rows into the running column max of S and sum of exp((S - max) / tau) of the tracked
// columns. Threads split the columns, so each owns its slice of the running statistics.
template <typename T>
void column_statistics(const Block<T>& b, T* column_max, T* column_sum, int threads) {
  constexpr int64_t kSlice = 256;
  const int64_t slices = (b.tracked + kSlice - 1) / kSlice;
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t slice = 0; slice < slices; ++slice) {
    const int64_t j0 = slice * kSlice;
    const int64_t width = std::min(kSlice, b.tracked - j0);
    T block_max[kSlice];
    T block_sum[kSlice];
    std::fill(block_max, block_max + width, -std::numeric_limits<T>::infinity());
    std::fill(block_sum, block_sum + width, T(0));
    const T inv_t = b.inv_t;
    for (int64_t r = 0; r < b.rows; ++r) {
      const T* x = b.similarity + r * b.ld + j0;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) block_max[j] = std::max(block_max[j], x[j]);
    }
    for (int64_t r = 0; r < b.rows; ++r) {
      const T* x = b.similarity + r * b.ld + j0;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) block_sum[j] += exp_nonpositive((x[j] - block_max[j]) * inv_t);
    }
    T* running_max = column_max + j0;
    T* running_sum = column_sum + j0;
    for (int64_t j = 0; j < width; ++j) {
      const T merged = std::max(running_max[j], block_max[j]);
      // running_max is -inf before the first block: exp(-inf) = 0 drops the empty sum
      const T old_part = running_sum[j] == T(0) ? T(0) : running_sum[j] * std::exp((running_max[j] - merged) * inv_t);
      running_sum[j] = old_part + block_sum[j] * std::exp((block_max[j] - merged) * inv_t);
      running_max[j] = merged;
    }
  }
  (void)threads;
}

template <typename T>
void statistics(std::uintptr_t similarity, int64_t ld, int64_t rows, int64_t cols, int64_t row0,
                int64_t tracked, double inv_temperature, std::uintptr_t row_max_out,
                std::uintptr_t row_sum_out, std::uintptr_t diagonal_out, std::uintptr_t column_max, std::uintptr_t column_sum,
                int64_t num_threads) {
  if (tracked > cols || tracked < 0) throw std::invalid_argument("info_nce_symmetric_statistics: tracked > cols");
  const Block<T> b{ptr<const T>(similarity), ld, rows, cols, row0, tracked, static_cast<T>(inv_temperature)};
  const int threads = clamp_threads(num_threads);
  row_statistics(b, ptr<T>(row_max_out), ptr<T>(row_sum_out), ptr<T>(diagonal_out), threads);
  column_statistics(b, ptr<T>(column_max), ptr<T>(column_sum), threads);
}

// Overwrites the block with dL/dS of both directions; dtemp_out[r] = sum_j dL/dS_rj * S_rj.
// Factors: w_i / (tau * row sum_i) and v_j / (tau * column sum_j); positive[r] is what the
// positive pair of row r subtracts, (w_i + v_i) / tau.
template <typename T>
void gradient(std::uintptr_t similarity, int64_t ld, int64_t rows, int64_t cols, int64_t row0,
              int64_t tracked, double inv_temperature, std::uintptr_t row_max, std::uintptr_t row_factor,
              std::uintptr_t column_max, std::uintptr_t column_factor, std::uintptr_t positive,
              std::uintptr_t dtemp_out, int64_t num_threads) {
  if (tracked > cols || tracked < 0) throw std::invalid_argument("info_nce_symmetric_gradient: tracked > cols");
  T* block = ptr<T>(similarity);
  const T* r_max = ptr<const T>(row_max);
  const T* r_factor = ptr<const T>(row_factor);
  const T* c_max = ptr<const T>(column_max);
  const T* c_factor = ptr<const T>(column_factor);
  const T* pos = ptr<const T>(positive);
  T* dtemp = ptr<T>(dtemp_out);
  const T inv_t = static_cast<T>(inv_temperature);
  const int threads = clamp_threads(num_threads);
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    T* x = block + r * ld;
    const int64_t g = row0 + r;
    const T factor = r_factor[r];  // the row vectors hold the block's rows
    const T shift = r_max[r];
    const T positive = pos[r];  // row g < tracked: its positive, key g, is a tracked column
    T weighted = 0;
#pragma omp simd reduction(+ : weighted)
    for (int64_t j = 0; j < tracked; ++j) {
      const T d = factor * exp_nonpositive((x[j] - shift) * inv_t) +
                  c_factor[j] * exp_nonpositive((x[j] - c_max[j]) * inv_t) - (j == g ? positive : T(0));
      weighted += d * x[j];
      x[j] = d;
    }
#pragma omp simd reduction(+ : weighted)
    for (int64_t j = tracked; j < cols; ++j) {
      const T d = factor * exp_nonpositive((x[j] - shift) * inv_t);
      weighted += d * x[j];
      x[j] = d;
    }
    dtemp[r] = weighted;
  }
  (void)threads;
}

}  // namespace

constexpr const char* kStatisticsArguments =
    "similarity ld rows cols row0 tracked inv_temperature row_max_out row_sum_out diagonal_out column_max "
    "column_sum num_threads";
constexpr const char* kStatisticsDoc =
    "Pass 1 of the two-pass symmetric InfoNCE (fastcl/ops/info_nce/symmetric.py): row max, sum of exp and own "
    "similarity of each row of the block, running column max and sum of exp over the tracked columns.";
constexpr const char* kGradientArguments =
    "similarity ld rows cols row0 tracked inv_temperature row_max row_factor column_max column_factor positive "
    "dtemp_out num_threads";
constexpr const char* kGradientDoc =
    "Pass 2 of the two-pass symmetric InfoNCE: overwrites the block with dL/dS of both directions and writes "
    "sum_j dL/dS_rj * S_rj per row.";
FASTCL_EXPORT(info_nce_symmetric_statistics_f32, &statistics<float>, kStatisticsArguments, kStatisticsDoc);
FASTCL_EXPORT(info_nce_symmetric_statistics_f64, &statistics<double>, kStatisticsArguments, kStatisticsDoc);
FASTCL_EXPORT(info_nce_symmetric_gradient_f32, &gradient<float>, kGradientArguments, kGradientDoc);
FASTCL_EXPORT(info_nce_symmetric_gradient_f64, &gradient<double>, kGradientArguments, kGradientDoc);

}  // namespace fastcl
