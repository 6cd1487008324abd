// Patch gather for the CPU: cut K chosen P x P patches out of an image *as if* it had first
// been resized bilinearly (align_corners=False, no antialias) to (Hs, Ws), without building
// the resized image or the patch grid.
//
// Bilinear resizing is separable, so Python passes per-axis tap tables (Hs and Ws entries:
// source indices index0/index1 and the weight lambda1 of index1, see
// fastcl/ops/patches/sampling.py). Output pixel (y, x) of the resized image is
//   (1-ly) * ((1-lx) * I[y0, x0] + lx * I[y0, x1]) + ly * ((1-lx) * I[y1, x0] + lx * I[y1, x1])
// in PyTorch's order of operations, so results match F.interpolate to rounding.
//
// Forward: patches are independent; OpenMP splits the B*K patches across the threads torch
// uses. Backward: neighbouring patches can read the same source pixel, so threads split the
// (batch, channel) planes instead and each walks its patches in order: no atomics, and the
// result is deterministic.
#include "registry.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace fastcl {
namespace {

template <typename T>
struct GatherProblem {
  int64_t batch, channels, height, width;
  int64_t stride_batch, stride_channel, stride_row, stride_col;  // of the image, in elements
  const int64_t* index;  // (B, K) flat indices into the grid_h x grid_w patch grid, row-major
  int64_t num_patches, patch_size, grid_w;
  const int64_t* row_index0;
  const int64_t* row_index1;
  const T* row_lambda1;
  const int64_t* col_index0;
  const int64_t* col_index1;
  const T* col_lambda1;
};

template <typename T>
void gather_forward(const GatherProblem<T>& p, const T* images, T* out, int num_threads) {
  const int64_t P = p.patch_size;
  const int64_t patch_elements = p.channels * P * P;
  const int64_t total = p.batch * p.num_patches;
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(num_threads) schedule(static)
#endif
  for (int64_t n = 0; n < total; ++n) {
    const int64_t b = n / p.num_patches;
    const int64_t flat = p.index[n];
    const int64_t row0 = (flat / p.grid_w) * P;
    const int64_t col0 = (flat % p.grid_w) * P;
    T* dst = out + n * patch_elements;
    for (int64_t c = 0; c < p.channels; ++c) {
      const T* plane = images + b * p.stride_batch + c * p.stride_channel;
      for (int64_t i = 0; i < P; ++i) {
        const int64_t y = row0 + i;
        const T* line0 = plane + p.row_index0[y] * p.stride_row;
        const T* line1 = plane + p.row_index1[y] * p.stride_row;
        const T ly1 = p.row_lambda1[y];
        const T ly0 = T(1) - ly1;
        T* out_row = dst + (c * P + i) * P;
        for (int64_t j = 0; j < P; ++j) {
          const int64_t x = col0 + j;
          const int64_t x0 = p.col_index0[x] * p.stride_col;
          const int64_t x1 = p.col_index1[x] * p.stride_col;
          const T lx1 = p.col_lambda1[x];
          const T lx0 = T(1) - lx1;
          out_row[j] = ly0 * (lx0 * line0[x0] + lx1 * line0[x1]) + ly1 * (lx0 * line1[x0] + lx1 * line1[x1]);
        }
      }
    }
  }
}

// grad_images: contiguous (B, C, H, W), zero-filled by the caller; grad_out: contiguous (B, K, C*P*P).
template <typename T>
void gather_backward(const GatherProblem<T>& p, const T* grad_out, T* grad_images, int num_threads) {
  const int64_t P = p.patch_size;
  const int64_t patch_elements = p.channels * P * P;
  const int64_t planes = p.batch * p.channels;
  const int64_t plane_size = p.height * p.width;
#ifdef FASTCL_WITH_OPENMP
#pragma omp parallel for num_threads(num_threads) schedule(static)
#endif
  for (int64_t bc = 0; bc < planes; ++bc) {
    const int64_t b = bc / p.channels;
    const int64_t c = bc % p.channels;
    T* plane = grad_images + bc * plane_size;
    for (int64_t k = 0; k < p.num_patches; ++k) {
      const int64_t n = b * p.num_patches + k;
      const int64_t flat = p.index[n];
      const int64_t row0 = (flat / p.grid_w) * P;
      const int64_t col0 = (flat % p.grid_w) * P;
      const T* src = grad_out + n * patch_elements + c * P * P;
      for (int64_t i = 0; i < P; ++i) {
        const int64_t y = row0 + i;
        T* line0 = plane + p.row_index0[y] * p.width;
        T* line1 = plane + p.row_index1[y] * p.width;
        const T ly1 = p.row_lambda1[y];
        const T ly0 = T(1) - ly1;
        for (int64_t j = 0; j < P; ++j) {
          const int64_t x = col0 + j;
          const int64_t x0 = p.col_index0[x];
          const int64_t x1 = p.col_index1[x];
          const T lx1 = p.col_lambda1[x];
          const T lx0 = T(1) - lx1;
          const T g = src[i * P + j];
          line0[x0] += ly0 * lx0 * g;
          line0[x1] += ly0 * lx1 * g;
          line1[x0] += ly1 * lx0 * g;
          line1[x1] += ly1 * lx1 * g;
        }
      }
    }
  }
}

template <typename T>
GatherProblem<T> make_problem(int64_t batch, int64_t channels, int64_t height, int64_t width,
                              int64_t stride_batch, int64_t stride_channel, int64_t stride_row, int64_t stride_col,
                              std::uintptr_t index, int64_t num_patches, int64_t patch_size, int64_t grid_w,
                              std::uintptr_t row_index0, std::uintptr_t row_index1, std::uintptr_t row_lambda1,
                              std::uintptr_t col_index0, std::uintptr_t col_index1, std::uintptr_t col_lambda1) {
  return GatherProblem<T>{batch, channels, height, width, stride_batch, stride_channel, stride_row, stride_col,
                          ptr<const int64_t>(index), num_patches, patch_size, grid_w,
                          ptr<const int64_t>(row_index0), ptr<const int64_t>(row_index1), ptr<const T>(row_lambda1),
                          ptr<const int64_t>(col_index0), ptr<const int64_t>(col_index1), ptr<const T>(col_lambda1)};
}

template <typename T>
void forward(std::uintptr_t images, int64_t batch, int64_t channels, int64_t height, int64_t width,
             int64_t stride_batch, int64_t stride_channel, int64_t stride_row, int64_t stride_col, std::uintptr_t index,
             int64_t num_patches, int64_t patch_size, int64_t grid_w, std::uintptr_t row_index0,
             std::uintptr_t row_index1, std::uintptr_t row_lambda1, std::uintptr_t col_index0,
             std::uintptr_t col_index1, std::uintptr_t col_lambda1, std::uintptr_t out, int64_t num_threads) {
  const auto problem = make_problem<T>(batch, channels, height, width, stride_batch, stride_channel, stride_row,
                                       stride_col, index, num_patches, patch_size, grid_w, row_index0, row_index1,
                                       row_lambda1, col_index0, col_index1, col_lambda1);
  gather_forward<T>(problem, ptr<const T>(images), ptr<T>(out), clamp_threads(num_threads));
}

template <typename T>
void backward(std::uintptr_t grad_out, int64_t batch, int64_t channels, int64_t height, int64_t width,
              std::uintptr_t index, int64_t num_patches, int64_t patch_size, int64_t grid_w, std::uintptr_t row_index0,
              std::uintptr_t row_index1, std::uintptr_t row_lambda1, std::uintptr_t col_index0,
              std::uintptr_t col_index1, std::uintptr_t col_lambda1, std::uintptr_t grad_images, int64_t num_threads) {
  const auto problem = make_problem<T>(batch, channels, height, width, channels * height * width, height * width,
                                       width, 1, index, num_patches, patch_size, grid_w, row_index0, row_index1,
                                       row_lambda1, col_index0, col_index1, col_lambda1);
  gather_backward<T>(problem, ptr<const T>(grad_out), ptr<T>(grad_images), clamp_threads(num_threads));
}

}  // namespace

constexpr const char* kForwardArguments =
    "images batch channels height width stride_batch stride_channel stride_row stride_col index num_patches "
    "patch_size grid_w row_index0 row_index1 row_lambda1 col_index0 col_index1 col_lambda1 out num_threads";
constexpr const char* kBackwardArguments =
    "grad_out batch channels height width index num_patches patch_size grid_w row_index0 row_index1 row_lambda1 "
    "col_index0 col_index1 col_lambda1 grad_images num_threads";
constexpr const char* kForwardDoc = "Gather K bilinearly resampled P x P patches per image into out (B, K, C*P*P).";
constexpr const char* kBackwardDoc =
    "Scatter-add dL/dpatches (B, K, C*P*P) into a zeroed contiguous grad_images (B, C, H, W).";
FASTCL_EXPORT(gather_patches_forward_f32, &forward<float>, kForwardArguments, kForwardDoc);
FASTCL_EXPORT(gather_patches_forward_f64, &forward<double>, kForwardArguments, kForwardDoc);
FASTCL_EXPORT(gather_patches_backward_f32, &backward<float>, kBackwardArguments, kBackwardDoc);
FASTCL_EXPORT(gather_patches_backward_f64, &backward<double>, kBackwardArguments, kBackwardDoc);

}  // namespace fastcl
