// InfoNCE row kernel for the CPU: everything elementwise around the similarity products.
//
// Python computes a block of raw similarities S (rows x cols, plus rows x H private hard
// negatives) with one matrix product into a reused buffer and calls this kernel, which, per
// row: applies the masks (self pair, same label, positive-aware margin), finds the max, the
// log-sum-exp and the loss, and, when weights are given, overwrites S with dL/dS (the gradient
// with respect to the raw similarity) and returns sum_j dL/dS_ij * S_ij for the temperature
// gradient. Rows are independent: OpenMP splits them across the threads torch uses.
//
// Numerics: exp follows the contract of fast_math.h (accurate or exactly 0, never subnormal),
// so any gap between scores is exact. A row holding a non-finite score (NaN, +-inf, or a
// product that overflowed) is not computed here: the kernel flags it (nonfinite_out[r] = 1) and
// the Python driver recomputes that row with the PyTorch row kernel, which follows the naive
// reference's formulas, so NaN and Inf land in the loss and every gradient exactly where the
// reference puts them. Finite rows never produce a NaN.
#include "registry.h"
#include "cpu/fast_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace fastcl {
namespace {

enum Mode : int { kMask = 0, kSupCon = 1, kPairwise = 2 };

// exp for x <= 0 under the numerics contract of fast_math.h (float: vectorizable polynomial).
using ::fastcl::exp_nonpositive;

template <typename T>
inline T softplus(T x) {
  if (x == -std::numeric_limits<T>::infinity()) return T(0);
  return std::max(x, T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

template <typename T>
inline T sigmoid(T x) {
  if (x >= 0) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

template <typename T>
struct RowProblem {
  T* similarity;
  int64_t ld_similarity;
  int64_t cols;
  T* private_similarity;
  int64_t ld_private;
  int64_t private_cols;
  int64_t row0;
  T inv_temperature;
  int mode;
  const int64_t* positive;
  bool has_margin;
  T margin;
  const int64_t* anchor_labels;
  const int64_t* candidate_labels;
  const int64_t* num_positive;
  T label_smoothing;
  bool self_excluded;
  const T* weights;
  T* loss_out;
  T* lse_out;
  T* dtemp_out;
  uint8_t* nonfinite_out;
};

// A score sum that is not finite means a non-finite score in the row (or an overflow of huge
// finite ones): the row goes to the reference-faithful path (see the top of the file).
template <typename T>
inline bool flag_nonfinite(const RowProblem<T>& p, int64_t r, T score_total) {
  const bool bad = !std::isfinite(score_total);
  p.nonfinite_out[r] = bad ? 1 : 0;
  return bad;
}

constexpr float kNotCandidate = -1.0f;  // marks masked entries once the others hold exp() in [0, 1]

// "mask" mode: one indexed positive, same-label keys and margin-violating negatives masked.
template <typename T>
void mask_row(const RowProblem<T>& p, int64_t r) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t g = p.row0 + r;
  T* keys = p.similarity + r * p.ld_similarity;
  T* priv = p.private_similarity ? p.private_similarity + r * p.ld_private : nullptr;
  const int64_t pos = p.positive[g];
  const T inv_t = p.inv_temperature;
  const T s_pos = keys[pos] * inv_t;
  const bool plain = !p.self_excluded && !p.anchor_labels && !p.has_margin;
  T threshold = std::numeric_limits<T>::infinity();
  // the positive's similarity from this same block, so the strict ">" compares numbers
  // computed the same way
  if (p.has_margin) threshold = keys[pos] - p.margin;

  // Pass 1: scores, masks, max, candidate count and sum.
  T row_max = neg_inf, count = 0, score_sum = 0, masked_sum = 0;
  if (plain) {
#pragma omp simd reduction(max : row_max) reduction(+ : score_sum)
    for (int64_t j = 0; j < p.cols; ++j) {
      const T s = keys[j] * inv_t;
      keys[j] = s;
      row_max = std::max(row_max, s);
      score_sum += s;
    }
    count = static_cast<T>(p.cols);
  } else {
    const int64_t label = p.anchor_labels ? p.anchor_labels[g] : 0;
    for (int64_t j = 0; j < p.cols; ++j) {
      const T raw = keys[j];
      bool candidate = true;
      if (j != pos) {
        if (p.self_excluded && j == g) candidate = false;
        if (p.anchor_labels && p.candidate_labels[j] == label) candidate = false;
        if (raw > threshold) candidate = false;
      }
      const T s = raw * inv_t;
      keys[j] = candidate ? s : neg_inf;
      if (candidate) {
        row_max = std::max(row_max, s);
        count += 1;
        score_sum += s;
      } else {
        masked_sum += s;
      }
    }
  }
  for (int64_t j = 0; j < p.private_cols; ++j) {
    const T raw = priv[j];
    const bool candidate = !(raw > threshold);
    const T s = raw * inv_t;
    priv[j] = candidate ? s : neg_inf;
    if (candidate) {
      row_max = std::max(row_max, s);
      count += 1;
      score_sum += s;
    } else {
      masked_sum += s;
    }
  }
  if (flag_nonfinite(p, r, score_sum + masked_sum)) return;

  // Pass 2: exp(s - max) in place (masked entries become kNotCandidate), sum, sum e*s.
  T sum = 0, weighted = 0;
#pragma omp simd reduction(+ : sum, weighted)
  for (int64_t j = 0; j < p.cols; ++j) {
    const T s = keys[j];
    const bool candidate = s > neg_inf;
    const T e = candidate ? exp_nonpositive(s - row_max) : T(0);
    sum += e;
    weighted += candidate ? e * s : T(0);
    keys[j] = candidate ? e : T(kNotCandidate);
  }
  for (int64_t j = 0; j < p.private_cols; ++j) {
    const T s = priv[j];
    const bool candidate = s > neg_inf;
    const T e = candidate ? exp_nonpositive(s - row_max) : T(0);
    sum += e;
    weighted += candidate ? e * s : T(0);
    priv[j] = candidate ? e : T(kNotCandidate);
  }
  const T lse = row_max + std::log(sum);
  const T eps = p.label_smoothing;
  const T mean_score = score_sum / count;
  p.lse_out[r] = lse;
  p.loss_out[r] = lse - (T(1) - eps) * s_pos - eps * mean_score;
  if (!p.weights) return;

  // Pass 3: dL/dS = w/tau * (softmax - (1-eps) onehot(pos) - eps/count on candidates).
  const T w = p.weights[g];
  const T c = w * inv_t;
  const T scale = c / sum;
  const T smooth = c * eps / count;
#pragma omp simd
  for (int64_t j = 0; j < p.cols; ++j) {
    const T e = keys[j];
    keys[j] = e != T(kNotCandidate) ? e * scale - smooth : T(0);
  }
  for (int64_t j = 0; j < p.private_cols; ++j) {
    const T e = priv[j];
    priv[j] = e != T(kNotCandidate) ? e * scale - smooth : T(0);
  }
  keys[pos] -= c * (T(1) - eps);
  // sum_j dL/dS_ij * S_ij = w * sum_j g_ij s_ij
  p.dtemp_out[r] = w * (weighted / sum - (T(1) - eps) * s_pos - eps * mean_score);
}

// "supcon": every same-label key is a positive; the loss averages -log softmax over them.
template <typename T>
void supcon_row(const RowProblem<T>& p, int64_t r) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t g = p.row0 + r;
  T* keys = p.similarity + r * p.ld_similarity;
  T* priv = p.private_similarity ? p.private_similarity + r * p.ld_private : nullptr;
  const int64_t num_positive = p.num_positive[g];
  const int64_t label = p.anchor_labels[g];
  const T inv_t = p.inv_temperature;
  if (num_positive == 0) {  // no positive: contributes nothing (the reference's term is a 0 too)
    p.nonfinite_out[r] = 0;
    p.loss_out[r] = 0;
    p.lse_out[r] = neg_inf;
    if (p.weights) {
      std::fill(keys, keys + p.cols, T(0));
      if (priv) std::fill(priv, priv + p.private_cols, T(0));
      p.dtemp_out[r] = 0;
    }
    return;
  }
  T row_max = neg_inf, positive_sum = 0, score_total = 0;
  for (int64_t j = 0; j < p.cols; ++j) {
    const bool candidate = !(p.self_excluded && j == g);
    const T s = keys[j] * inv_t;
    keys[j] = candidate ? s : neg_inf;
    score_total += s;
    if (candidate) {
      row_max = std::max(row_max, s);
      if (p.candidate_labels[j] == label) positive_sum += s;
    }
  }
  for (int64_t j = 0; j < p.private_cols; ++j) {
    priv[j] *= inv_t;
    row_max = std::max(row_max, priv[j]);
    score_total += priv[j];
  }
  if (flag_nonfinite(p, r, score_total)) return;
  T sum = 0, weighted = 0;
#pragma omp simd reduction(+ : sum, weighted)
  for (int64_t j = 0; j < p.cols; ++j) {
    const T s = keys[j];
    const bool candidate = s > neg_inf;
    const T e = candidate ? exp_nonpositive(s - row_max) : T(0);
    sum += e;
    weighted += candidate ? e * s : T(0);
    keys[j] = candidate ? e : T(kNotCandidate);
  }
  for (int64_t j = 0; j < p.private_cols; ++j) {
    const T e = exp_nonpositive(priv[j] - row_max);
    sum += e;
    weighted += e * priv[j];
    priv[j] = e;
  }
  const T lse = row_max + std::log(sum);
  const T inv_num_positive = T(1) / static_cast<T>(num_positive);
  p.lse_out[r] = lse;
  p.loss_out[r] = lse - positive_sum * inv_num_positive;
  if (!p.weights) return;
  const T w = p.weights[g];
  const T c = w * inv_t;
  const T scale = c / sum;
  const T positive_share = c * inv_num_positive;
  for (int64_t j = 0; j < p.cols; ++j) {
    const T e = keys[j];
    const bool candidate = e != T(kNotCandidate);
    const bool is_positive = candidate && p.candidate_labels[j] == label;
    keys[j] = candidate ? e * scale - (is_positive ? positive_share : T(0)) : T(0);
  }
  for (int64_t j = 0; j < p.private_cols; ++j) priv[j] *= scale;
  p.dtemp_out[r] = w * (weighted / sum - positive_sum * inv_num_positive);
}

// "pairwise": one term per positive pair, softplus(LSE(negatives) - s_pos).
template <typename T>
void pairwise_row(const RowProblem<T>& p, int64_t r) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t g = p.row0 + r;
  T* keys = p.similarity + r * p.ld_similarity;
  T* priv = p.private_similarity ? p.private_similarity + r * p.ld_private : nullptr;
  const int64_t label = p.anchor_labels[g];
  const T inv_t = p.inv_temperature;
  auto is_positive = [&](int64_t j) {
    return p.candidate_labels[j] == label && !(p.self_excluded && j == g);
  };
  // Pass 1: scores in place, max over the negatives.
  T negative_max = neg_inf, score_total = 0;
  for (int64_t j = 0; j < p.cols; ++j) {
    const T s = keys[j] * inv_t;
    keys[j] = s;
    score_total += s;
    if (!is_positive(j) && !(p.self_excluded && j == g)) negative_max = std::max(negative_max, s);
  }
  for (int64_t j = 0; j < p.private_cols; ++j) {
    priv[j] *= inv_t;
    negative_max = std::max(negative_max, priv[j]);
    score_total += priv[j];
  }
  if (flag_nonfinite(p, r, score_total)) return;
  // Pass 2: negatives' exp in place; positives keep their score.
  T sum = 0, weighted = 0;
  for (int64_t j = 0; j < p.cols; ++j) {
    if (is_positive(j) || (p.self_excluded && j == g)) continue;
    const T s = keys[j];
    const T e = exp_nonpositive(s - negative_max);
    sum += e;
    weighted += e * s;
    keys[j] = e;
  }
  for (int64_t j = 0; j < p.private_cols; ++j) {
    const T e = exp_nonpositive(priv[j] - negative_max);
    sum += e;
    weighted += e * priv[j];
    priv[j] = e;
  }
  const T lse = sum > 0 ? negative_max + std::log(sum) : neg_inf;
  // Pass 3: the positive pairs.
  T loss = 0, sigma_sum = 0, sigma_score = 0;
  for (int64_t j = 0; j < p.cols; ++j) {
    if (!is_positive(j)) continue;
    const T s = keys[j];
    loss += softplus(lse - s);
    const T sig = lse == neg_inf ? T(0) : sigmoid(lse - s);
    sigma_sum += sig;
    sigma_score += sig * s;
  }
  p.lse_out[r] = lse;
  p.loss_out[r] = loss;
  if (!p.weights) return;
  const T w = p.weights[g];
  const T c = w * inv_t;
  const T negative_scale = sum > 0 ? c * sigma_sum / sum : T(0);
  for (int64_t j = 0; j < p.cols; ++j) {
    if (p.self_excluded && j == g) {
      keys[j] = 0;
    } else if (is_positive(j)) {
      keys[j] = lse == neg_inf ? T(0) : -c * sigmoid(lse - keys[j]);
    } else {
      keys[j] *= negative_scale;
    }
  }
  for (int64_t j = 0; j < p.private_cols; ++j) priv[j] *= negative_scale;
  const T negative_mean_score = sum > 0 ? weighted / sum : T(0);
  p.dtemp_out[r] = w * (sigma_sum * negative_mean_score - sigma_score);
}

template <typename T>
void run_rows(const RowProblem<T>& p, int64_t rows, int threads) {
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    if (p.mode == kMask) {
      mask_row(p, r);
    } else if (p.mode == kSupCon) {
      supcon_row(p, r);
    } else {
      pairwise_row(p, r);
    }
  }
  (void)threads;
}

template <typename T>
void info_nce_rows(std::uintptr_t similarity, int64_t ld_similarity, int64_t rows, int64_t cols,
                   std::uintptr_t private_similarity, int64_t ld_private, int64_t private_cols,
                   int64_t row0, double inv_temperature, int mode, std::uintptr_t positive,
                   bool has_margin, double margin,
                   std::uintptr_t anchor_labels, std::uintptr_t candidate_labels,
                   std::uintptr_t num_positive, double label_smoothing, bool self_excluded,
                   std::uintptr_t weights, std::uintptr_t loss_out, std::uintptr_t lse_out,
                   std::uintptr_t dtemp_out, std::uintptr_t nonfinite_out, int64_t num_threads) {
  RowProblem<T> p{ptr<T>(similarity),
                  ld_similarity,
                  cols,
                  ptr<T>(private_similarity),
                  ld_private,
                  private_cols,
                  row0,
                  static_cast<T>(inv_temperature),
                  mode,
                  ptr<const int64_t>(positive),
                  has_margin,
                  static_cast<T>(margin),
                  ptr<const int64_t>(anchor_labels),
                  ptr<const int64_t>(candidate_labels),
                  ptr<const int64_t>(num_positive),
                  static_cast<T>(label_smoothing),
                  self_excluded,
                  ptr<const T>(weights),
                  ptr<T>(loss_out),
                  ptr<T>(lse_out),
                  ptr<T>(dtemp_out),
                  ptr<uint8_t>(nonfinite_out)};
  if (mode == kMask && !p.positive) throw std::invalid_argument("info_nce_rows: mode 'mask' needs positive");
  if (mode != kMask && (!p.anchor_labels || !p.candidate_labels || !p.num_positive))
    throw std::invalid_argument("info_nce_rows: modes 'supcon'/'pairwise' need labels and num_positive");
  if (mode < kMask || mode > kPairwise) throw std::invalid_argument("info_nce_rows: unknown mode");
  if (!p.nonfinite_out) throw std::invalid_argument("info_nce_rows: nonfinite_out is required");
  run_rows(p, rows, clamp_threads(num_threads));
}

}  // namespace

constexpr const char* kRowsArguments =
    "similarity ld_similarity rows cols private_similarity ld_private private_cols row0 inv_temperature mode "
    "positive has_margin margin anchor_labels candidate_labels num_positive label_smoothing self_excluded weights "
    "loss_out lse_out dtemp_out nonfinite_out num_threads";
constexpr const char* kRowsDoc =
    "Row kernel of the chunked InfoNCE (see fastcl/ops/info_nce/native.py); pointer 0 means absent. "
    "nonfinite_out (uint8 per row) is set to 1 for a row holding a non-finite score, which the kernel leaves "
    "for the caller (loss, lse, gradient row and dtemp unset).";
FASTCL_EXPORT(info_nce_rows_f32, &info_nce_rows<float>, kRowsArguments, kRowsDoc);
FASTCL_EXPORT(info_nce_rows_f64, &info_nce_rows<double>, kRowsArguments, kRowsDoc);

}  // namespace fastcl
