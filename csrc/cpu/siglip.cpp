// SigLIP block kernel for the CPU: everything elementwise around the similarity products.
//
// Python computes a block of raw similarities S (rows x B) with one matrix product and calls
// this kernel, which, per row i (global g): forms z_ij = t S_ij + b and m_ij = y_ij z_ij
// (y = +1 on the diagonal j = g, -1 elsewhere), sums the loss terms softplus(-m_ij), and, when
// asked, overwrites S with dL/dS_ij = t dz_ij, where dz_ij = -y_ij sigmoid(-m_ij) * factor
// (factor = dL/d(sum of the terms), 1/B for the mean), and returns sum_j dz_ij (for the bias)
// and sum_j dz_ij S_ij (for the scale). See fastcl/ops/siglip/chunked.py for the driver.
// exp follows the numerics contract of fast_math.h: a term with |m| past the flush threshold
// gets sigmoid(-m) = 0 exactly (no subnormal enters the gradient products), at any scale
// (logit_scale 1e30 included); NaN and +-inf logits give what the reference gives.
#include "registry.h"
#include "cpu/fast_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastcl {
namespace {

using ::fastcl::exp_nonpositive;
using ::fastcl::log1p_unit;
inline double log1p_unit(double e) { return std::log1p(e); }

// softplus(-m) = max(-m, 0) + log(1 + exp(-|m|)), given e = exp(-|m|). A select, not
// (|m| - m) / 2, which is NaN at m = +inf (an overflowed logit) where the reference gives 0.
template <typename T>
inline T softplus_negative(T m, T e) {
  return (m < T(0) ? -m : T(0)) + log1p_unit(e);  // NaN m: 0 + log1p(NaN) = NaN
}

template <typename T>
void siglip_rows(std::uintptr_t similarity, int64_t ld, int64_t rows, int64_t cols, int64_t row0, double scale,
                 double bias, double factor, bool with_grad, std::uintptr_t loss_out, std::uintptr_t dscale_out,
                 std::uintptr_t dbias_out, int64_t num_threads) {
  T* block = ptr<T>(similarity);
  T* loss = ptr<T>(loss_out);
  T* dscale = ptr<T>(dscale_out);
  T* dbias = ptr<T>(dbias_out);
  const T t = static_cast<T>(scale);
  const T b = static_cast<T>(bias);
  const T f = static_cast<T>(factor);
  const int threads = clamp_threads(num_threads);
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    T* x = block + r * ld;
    const int64_t g = row0 + r;
    T loss_sum = 0, bias_sum = 0, scale_sum = 0;
    if (with_grad) {
#pragma omp simd reduction(+ : loss_sum, bias_sum, scale_sum)
      for (int64_t j = 0; j < cols; ++j) {
        const T y = j == g ? T(1) : T(-1);
        const T m = y * (t * x[j] + b);
        const T e = exp_nonpositive(-std::fabs(m));
        loss_sum += softplus_negative(m, e);
        // sigmoid(-m): e / (1 + e) for m >= 0, 1 / (1 + e) below
        const T sigma = (m >= 0 ? e : T(1)) / (T(1) + e);
        const T dz = -y * sigma * f;
        bias_sum += dz;
        scale_sum += dz * x[j];
        x[j] = dz * t;
      }
    } else {
#pragma omp simd reduction(+ : loss_sum)
      for (int64_t j = 0; j < cols; ++j) {
        const T y = j == g ? T(1) : T(-1);
        const T m = y * (t * x[j] + b);
        loss_sum += softplus_negative(m, exp_nonpositive(-std::fabs(m)));
      }
    }
    loss[r] = loss_sum;
    dscale[r] = scale_sum;
    dbias[r] = bias_sum;
  }
  (void)threads;
}

}  // namespace

constexpr const char* kSiglipArguments =
    "similarity ld rows cols row0 scale bias factor with_grad loss_out dscale_out dbias_out num_threads";
constexpr const char* kSiglipDoc =
    "SigLIP block kernel (see fastcl/ops/siglip/chunked.py): per row, the sum of the loss terms and, with "
    "with_grad, dL/dS written in place and the bias and scale gradient sums.";
FASTCL_EXPORT(siglip_rows_f32, &siglip_rows<float>, kSiglipArguments, kSiglipDoc);
FASTCL_EXPORT(siglip_rows_f64, &siglip_rows<double>, kSiglipArguments, kSiglipDoc);

}  // namespace fastcl
