// Collaborative contrastive loss (CCN) for the CPU: one page per task, everything of the page
// in a thread-local scratch (its L x D prepared items and its L x L logits), nothing of size
// P x L x L in memory.
//
// Per page p, over its valid items a, b (mask), with c the click labels and w the anchor weights:
//   z_a = e_a * t_p (when a trigger is given), then z_a / max(|z_a|, eps) (when normalize)
//   s_ab = z_a . z_b / tau,  P_a = {b != a : c_b == c_a},  C_a = {b != a}
//   L_a = LSE_{b in C_a} s_ab - mean_{b in P_a} s_ab  (0 when P_a is empty)
//   total = sum_a w_a L_a
// With with_grad: G_ab = w_a (softmax_ab - [b in P_a] / |P_a|), dz_a = sum_b (G_ab + G_ba) z_b / tau,
// back through the normalization and the Hadamard product into d_items (P, L, D; rows of
// padding untouched: the caller zeroes it) and d_trigger (P, D).
// See fastcl/ops/collaborative/chunked.py for the driver.
#include "registry.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastcl {
namespace {

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t dim) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < dim; ++d) sum += a[d] * b[d];
  return sum;
}

template <typename T>
void collaborative_pages(std::uintptr_t items_ptr, std::uintptr_t clicks_ptr, std::uintptr_t mask_ptr,
                         std::uintptr_t trigger_ptr, std::uintptr_t weights_ptr, int64_t pages, int64_t length,
                         int64_t dim, double temperature, bool normalize, double eps, bool with_grad,
                         std::uintptr_t losses_out, std::uintptr_t d_items_out, std::uintptr_t d_trigger_out,
                         int64_t num_threads) {
  const T* items = ptr<const T>(items_ptr);
  const int64_t* clicks = ptr<const int64_t>(clicks_ptr);
  const uint8_t* mask = ptr<const uint8_t>(mask_ptr);
  const T* trigger = trigger_ptr ? ptr<const T>(trigger_ptr) : nullptr;
  const T* weights = ptr<const T>(weights_ptr);
  T* losses = ptr<T>(losses_out);
  T* d_items = with_grad ? ptr<T>(d_items_out) : nullptr;
  T* d_trigger = (with_grad && trigger) ? ptr<T>(d_trigger_out) : nullptr;
  const T inv_tau = static_cast<T>(1.0 / temperature);
  const T epsilon = static_cast<T>(eps);
  const int threads = clamp_threads(num_threads);
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<int64_t> valid;
    std::vector<T> z, inv_norm, logits, grad_z;
    std::vector<uint8_t> clipped;
#ifdef FASTCL_WITH_OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t p = 0; p < pages; ++p) {
      const T* e = items + p * length * dim;
      const T* t = trigger ? trigger + p * dim : nullptr;
      for (int64_t l = 0; l < length; ++l) losses[p * length + l] = 0;
      valid.clear();
      for (int64_t l = 0; l < length; ++l)
        if (mask[p * length + l]) valid.push_back(l);
      const int64_t n = static_cast<int64_t>(valid.size());
      if (d_trigger)
        for (int64_t d = 0; d < dim; ++d) d_trigger[p * dim + d] = 0;
      if (n < 2) continue;
      z.assign(n * dim, T(0));
      inv_norm.assign(n, T(1));
      clipped.assign(n, 0);
      for (int64_t a = 0; a < n; ++a) {
        const T* row = e + valid[a] * dim;
        T* za = z.data() + a * dim;
        for (int64_t d = 0; d < dim; ++d) za[d] = t ? row[d] * t[d] : row[d];
        if (normalize) {
          const T norm = std::sqrt(dot(za, za, dim));
          clipped[a] = !(norm > epsilon);
          inv_norm[a] = T(1) / (clipped[a] ? epsilon : norm);
          for (int64_t d = 0; d < dim; ++d) za[d] *= inv_norm[a];
        }
      }
      logits.assign(n * n, T(0));
      for (int64_t a = 0; a < n; ++a)
        for (int64_t b = a + 1; b < n; ++b) {
          const T s = dot(z.data() + a * dim, z.data() + b * dim, dim) * inv_tau;
          logits[a * n + b] = s;
          logits[b * n + a] = s;
        }
      // per anchor: loss, then (with_grad) its row of G written over its logits row
      for (int64_t a = 0; a < n; ++a) {
        const int64_t ca = clicks[p * length + valid[a]];
        T* row = logits.data() + a * n;
        int64_t num_positive = 0;
        T positive_sum = 0, top = -std::numeric_limits<T>::infinity();
        for (int64_t b = 0; b < n; ++b) {
          if (b == a) continue;
          top = std::max(top, row[b]);
          if (clicks[p * length + valid[b]] == ca) {
            ++num_positive;
            positive_sum += row[b];
          }
        }
        if (num_positive == 0) {
          if (with_grad)
            for (int64_t b = 0; b < n; ++b) row[b] = 0;
          continue;
        }
        T sum = 0;
        for (int64_t b = 0; b < n; ++b)
          if (b != a) sum += std::exp(row[b] - top);
        const T lse = top + std::log(sum);
        const T inv_positive = T(1) / static_cast<T>(num_positive);
        losses[p * length + valid[a]] = lse - positive_sum * inv_positive;
        if (!with_grad) continue;
        const T w = weights[p * length + valid[a]];
        for (int64_t b = 0; b < n; ++b) {
          if (b == a) {
            row[b] = 0;
            continue;
          }
          const T target = clicks[p * length + valid[b]] == ca ? inv_positive : T(0);
          row[b] = w * (std::exp(row[b] - lse) - target);
        }
      }
      if (!with_grad) continue;
      grad_z.assign(n * dim, T(0));
      for (int64_t a = 0; a < n; ++a) {
        T* ga = grad_z.data() + a * dim;
        for (int64_t b = 0; b < n; ++b) {
          const T coefficient = (logits[a * n + b] + logits[b * n + a]) * inv_tau;
          if (coefficient == 0) continue;
          const T* zb = z.data() + b * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ga[d] += coefficient * zb[d];
        }
      }
      for (int64_t a = 0; a < n; ++a) {
        T* ga = grad_z.data() + a * dim;
        if (normalize) {
          const T* za = z.data() + a * dim;
          const T radial = clipped[a] ? T(0) : dot(za, ga, dim);
          for (int64_t d = 0; d < dim; ++d) ga[d] = (ga[d] - za[d] * radial) * inv_norm[a];
        }
        T* out = d_items + (p * length + valid[a]) * dim;
        const T* row = e + valid[a] * dim;
        for (int64_t d = 0; d < dim; ++d) {
          out[d] = t ? ga[d] * t[d] : ga[d];
          if (d_trigger) d_trigger[p * dim + d] += ga[d] * row[d];
        }
      }
    }
  }
  (void)threads;
}

}  // namespace

constexpr const char* kCollaborativeArguments =
    "items clicks mask trigger weights pages length dim temperature normalize eps with_grad losses_out "
    "d_items_out d_trigger_out num_threads";
constexpr const char* kCollaborativeDoc =
    "Collaborative contrastive loss over pages (see fastcl/ops/collaborative/chunked.py): per-anchor losses "
    "and, with with_grad, the gradients of sum_a w_a L_a; trigger = 0 for none.";
FASTCL_EXPORT(collaborative_pages_f32, &collaborative_pages<float>, kCollaborativeArguments, kCollaborativeDoc);
FASTCL_EXPORT(collaborative_pages_f64, &collaborative_pages<double>, kCollaborativeArguments, kCollaborativeDoc);

}  // namespace fastcl
