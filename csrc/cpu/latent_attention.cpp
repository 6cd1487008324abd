// Elementwise kernels of the fused latent-attention pooling (fastcl/ops/latent_attention).
//
// Python does the matrix products (scores = LN(h) M, output = P N, the feed-forward) on one
// chunk of tokens at a time; these kernels do what lies between them in one pass over memory
// each, in place where possible, so a chunk never needs the extra temporaries PyTorch's
// softmax / GELU / autograd formulas would allocate:
//   softmax_forward    scores -> probabilities, writes the row log-sum-exp
//   softmax_recompute  scores -> exp(scores - lse) (backward: no second reduction)
//   softmax_backward   dP -> dS = P * (dP - sum(P * dP))
//   geglu_forward      u = [value | gate] -> value * gelu(gate)        (exact erf GELU)
//   geglu_backward     (u, dgated) -> du
// float32 only (the Python side computes every chunk in float32 on the CPU). Rows are
// independent: OpenMP splits them across the threads torch uses.
#include "registry.h"
#include "cpu/fast_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace fastcl {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// Standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2 and density phi(x), branch-free.
// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, below float32 resolution of Phi near
// 1) evaluated on |x| and mirrored; exp(-x^2/2) comes out of the same call as the density.
struct NormalTerms {
  float cdf;
  float density;
};

FASTCL_INLINE NormalTerms normal_terms(float x) {
  const float z = std::fabs(x) * kSqrtHalf;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  poly *= t;
  // exp(-x^2 / 2): exactly 0 past |x| ~ 9.4 (fast_math.h), however large the gate (3e4, inf)
  const float gauss = exp_nonpositive(-z * z);
  // 1 - erf(|x|) = poly * gauss; the lower tail Phi(-|x|) = poly * gauss / 2 is formed directly
  // (1 - erf would cancel), NaN stays NaN
  const float tail = 0.5f * poly * gauss;
  return {x < 0.0f ? tail : 1.0f - tail, gauss * kInvSqrt2Pi};
}

// Row functions stay out of line: OpenMP outlines the parallel loop bodies, and each row loop
// is vectorized for the instruction set of the library it is built into (CMakeLists.txt builds
// this file once per CPU capability; fastcl/_native.py picks one at load).
#define FASTCL_ROW_KERNEL __attribute__((noinline))

FASTCL_ROW_KERNEL float softmax_row_forward(float* row, int64_t cols) {
  float row_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t j = 0; j < cols; ++j) row_max = std::max(row_max, row[j]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) {
    const float e = exp_nonpositive(row[j] - row_max);
    row[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) row[j] *= inv;
  return row_max + std::log(sum);
}

FASTCL_ROW_KERNEL void softmax_row_recompute(float* row, float lse, int64_t cols) {
  // s <= lse for every entry; the clamp keeps rounding from handing exp a tiny positive argument.
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) row[j] = exp_nonpositive(min_with_zero(row[j] - lse));
}

FASTCL_ROW_KERNEL void softmax_row_backward(const float* p, float* g, int64_t cols) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < cols; ++j) dot += p[j] * g[j];
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) g[j] = p[j] * (g[j] - dot);
}

FASTCL_ROW_KERNEL void geglu_row_forward(const float* value, const float* gate, float* out, int64_t width) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const NormalTerms n = normal_terms(gate[j]);
    out[j] = value[j] * gate[j] * n.cdf;
  }
}

FASTCL_ROW_KERNEL void geglu_row_backward(const float* value, const float* gate, const float* g, float* grad_value,
                                          float* grad_gate, int64_t width) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const float x = gate[j];
    const NormalTerms n = normal_terms(x);
    grad_value[j] = g[j] * x * n.cdf;
    grad_gate[j] = g[j] * value[j] * (n.cdf + x * n.density);  // gelu'(x) = Phi(x) + x phi(x)
  }
}

void softmax_forward(float* scores, float* lse, int64_t rows, int64_t cols, int threads) {
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) lse[r] = softmax_row_forward(scores + r * cols, cols);
  (void)threads;
}

void softmax_recompute(float* scores, const float* lse, int64_t rows, int64_t cols, int threads) {
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) softmax_row_recompute(scores + r * cols, lse[r], cols);
  (void)threads;
}

void softmax_backward(const float* probs, float* grad, int64_t rows, int64_t cols, int threads) {
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) softmax_row_backward(probs + r * cols, grad + r * cols, cols);
  (void)threads;
}

void geglu_forward(const float* u, float* gated, int64_t rows, int64_t width, int threads) {
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const float* value = u + r * 2 * width;
    geglu_row_forward(value, value + width, gated + r * width, width);
  }
  (void)threads;
}

void geglu_backward(const float* u, const float* grad_gated, float* grad_u, int64_t rows, int64_t width,
                    int threads) {
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const float* value = u + r * 2 * width;
    float* grad_value = grad_u + r * 2 * width;
    geglu_row_backward(value, value + width, grad_gated + r * width, grad_value, grad_value + width, width);
  }
  (void)threads;
}

}  // namespace

void softmax_forward_f32(std::uintptr_t scores, std::uintptr_t lse, int64_t rows, int64_t cols, int64_t num_threads) {
  softmax_forward(ptr<float>(scores), ptr<float>(lse), rows, cols, clamp_threads(num_threads));
}
void softmax_recompute_f32(std::uintptr_t scores, std::uintptr_t lse, int64_t rows, int64_t cols,
                           int64_t num_threads) {
  softmax_recompute(ptr<float>(scores), ptr<const float>(lse), rows, cols, clamp_threads(num_threads));
}
void softmax_backward_f32(std::uintptr_t probs, std::uintptr_t grad, int64_t rows, int64_t cols, int64_t num_threads) {
  softmax_backward(ptr<const float>(probs), ptr<float>(grad), rows, cols, clamp_threads(num_threads));
}
void geglu_forward_f32(std::uintptr_t u, std::uintptr_t gated, int64_t rows, int64_t width, int64_t num_threads) {
  geglu_forward(ptr<const float>(u), ptr<float>(gated), rows, width, clamp_threads(num_threads));
}
void geglu_backward_f32(std::uintptr_t u, std::uintptr_t grad_gated, std::uintptr_t grad_u, int64_t rows,
                        int64_t width, int64_t num_threads) {
  geglu_backward(ptr<const float>(u), ptr<const float>(grad_gated), ptr<float>(grad_u), rows, width,
                 clamp_threads(num_threads));
}

FASTCL_EXPORT(latent_softmax_forward_f32, &softmax_forward_f32, "scores lse rows cols num_threads",
              "Row softmax in place over contiguous (rows, cols) float32 scores; writes the row log-sum-exp.");
FASTCL_EXPORT(latent_softmax_recompute_f32, &softmax_recompute_f32, "scores lse rows cols num_threads",
              "scores <- exp(scores - lse[row]) in place (probabilities from the saved log-sum-exp).");
FASTCL_EXPORT(latent_softmax_backward_f32, &softmax_backward_f32, "probs grad rows cols num_threads",
              "grad <- probs * (grad - sum(probs * grad)) in place, row by row.");
FASTCL_EXPORT(latent_geglu_forward_f32, &geglu_forward_f32, "u gated rows width num_threads",
              "gated = u[:, :width] * gelu(u[:, width:]) for contiguous (rows, 2*width) u.");
FASTCL_EXPORT(latent_geglu_backward_f32, &geglu_backward_f32, "u grad_gated grad_u rows width num_threads",
              "GEGLU backward: grad_u (rows, 2*width) from grad_gated (rows, width).");

}  // namespace fastcl
