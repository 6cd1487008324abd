// Collaborative Metric Learning scan for the CPU: the one pass over the sampled negatives.
//
// Per row i (parallel over rows), with d(u, x) = |u - x|^2 accumulated in T:
//   positive_distance[i] = d(u_i, p_i)
//   closest_distance[i]  = min_k d(u_i, n_ik), NaN when any of the row's distances is NaN
//   closest[i]           = the first k reaching it (the first NaN's k when NaN)
//   impostors[i]         = #{k : (margin + d(u_i, p_i)) - d(u_i, n_ik) > 0}
// n_ik is row k of the dense (rows, window, dim) block `negatives` when `indices` is 0, else row
// indices[i, k] of the (J, dim) item table `negatives` (read in place: no gathered copy).
// Python checks the indices and computes the loss and gradients from these O(rows) statistics
// (fastcl/ops/cml/chunked.py, op.py).
#include "registry.h"

#include <cstdint>
#include <limits>

namespace fastcl {
namespace {

template <typename T>
inline T squared_distance(const T* __restrict u, const T* __restrict x, int64_t dim) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < dim; ++d) {
    const T difference = u[d] - x[d];
    sum += difference * difference;
  }
  return sum;
}

template <typename T>
void cml_scan(std::uintptr_t users, std::uintptr_t positives, std::uintptr_t negatives, std::uintptr_t indices,
              int64_t rows, int64_t window, int64_t dim, double margin, std::uintptr_t positive_distance_out,
              std::uintptr_t closest_distance_out, std::uintptr_t closest_out, std::uintptr_t impostors_out,
              int64_t num_threads) {
  const T* u_all = ptr<const T>(users);
  const T* p_all = ptr<const T>(positives);
  const T* n_all = ptr<const T>(negatives);
  const int64_t* index_all = indices ? ptr<const int64_t>(indices) : nullptr;
  T* positive_distance = ptr<T>(positive_distance_out);
  T* closest_distance = ptr<T>(closest_distance_out);
  int64_t* closest = ptr<int64_t>(closest_out);
  T* impostors = ptr<T>(impostors_out);
  const T m = static_cast<T>(margin);
  const int threads = clamp_threads(num_threads);
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t i = 0; i < rows; ++i) {
    const T* u = u_all + i * dim;
    const T dp = squared_distance(u, p_all + i * dim, dim);
    const T threshold = m + dp;
    T best = std::numeric_limits<T>::infinity();
    int64_t best_k = 0;
    bool has_nan = false;
    int64_t count = 0;
    for (int64_t k = 0; k < window; ++k) {
      const T* n = index_all ? n_all + index_all[i * window + k] * dim : n_all + (i * window + k) * dim;
      const T d = squared_distance(u, n, dim);
      if (d != d) {
        if (!has_nan) best_k = k;
        has_nan = true;
        continue;
      }
      if (!has_nan && d < best) {
        best = d;
        best_k = k;
      }
      count += (threshold - d) > 0;
    }
    positive_distance[i] = dp;
    closest_distance[i] = has_nan ? std::numeric_limits<T>::quiet_NaN() : best;
    closest[i] = best_k;
    impostors[i] = static_cast<T>(count);
  }
  (void)threads;
}

}  // namespace

constexpr const char* kCmlArguments =
    "users positives negatives indices rows window dim margin positive_distance_out closest_distance_out "
    "closest_out impostors_out num_threads";
constexpr const char* kCmlDoc =
    "CML scan (see fastcl/ops/cml/chunked.py): per row the positive distance, the closest sampled negative's "
    "distance and index, and the impostor count; indices = 0 for dense negatives.";
FASTCL_EXPORT(cml_scan_f32, &cml_scan<float>, kCmlArguments, kCmlDoc);
FASTCL_EXPORT(cml_scan_f64, &cml_scan<double>, kCmlArguments, kCmlDoc);

}  // namespace fastcl
