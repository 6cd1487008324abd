// C exports of the CUDA patch gather (csrc/cuda/patches.cu). Same argument
// lists as the CPU functions, with the CUDA stream (an integer) in place of num_threads.
#include "../registry.h"
#include "patches_cuda.h"

namespace fastcl {
namespace {

template <GatherDtype kDtype>
void forward(std::uintptr_t images, int64_t batch, int64_t channels, int64_t height, int64_t width,
             int64_t stride_batch, int64_t stride_channel, int64_t stride_row, int64_t stride_col, std::uintptr_t index,
             int64_t num_patches, int64_t patch_size, int64_t grid_w, std::uintptr_t row_index0,
             std::uintptr_t row_index1, std::uintptr_t row_lambda1, std::uintptr_t col_index0,
             std::uintptr_t col_index1, std::uintptr_t col_lambda1, std::uintptr_t out, std::uintptr_t stream) {
  const GatherShape shape{batch, channels, height, width, stride_batch, stride_channel, stride_row, stride_col,
                          num_patches, patch_size, grid_w};
  const GatherTaps taps{ptr<const int64_t>(index), ptr<const int64_t>(row_index0), ptr<const int64_t>(row_index1),
                        ptr<const void>(row_lambda1), ptr<const int64_t>(col_index0), ptr<const int64_t>(col_index1),
                        ptr<const void>(col_lambda1)};
  gather_patches_cuda_forward(kDtype, ptr<const void>(images), shape, taps, ptr<void>(out), stream);
}

template <GatherDtype kDtype>
void backward(std::uintptr_t grad_out, int64_t batch, int64_t channels, int64_t height, int64_t width,
              std::uintptr_t index, int64_t num_patches, int64_t patch_size, int64_t grid_w, std::uintptr_t row_index0,
              std::uintptr_t row_index1, std::uintptr_t row_lambda1, std::uintptr_t col_index0,
              std::uintptr_t col_index1, std::uintptr_t col_lambda1, std::uintptr_t grad_images,
              std::uintptr_t stream) {
  const GatherShape shape{batch, channels, height, width, channels * height * width, height * width, width, 1,
                          num_patches, patch_size, grid_w};
  const GatherTaps taps{ptr<const int64_t>(index), ptr<const int64_t>(row_index0), ptr<const int64_t>(row_index1),
                        ptr<const void>(row_lambda1), ptr<const int64_t>(col_index0), ptr<const int64_t>(col_index1),
                        ptr<const void>(col_lambda1)};
  gather_patches_cuda_backward(kDtype, ptr<const void>(grad_out), shape, taps, ptr<void>(grad_images), stream);
}

}  // namespace

#define FASTCL_GATHER_TAPS "row_index0 row_index1 row_lambda1 col_index0 col_index1 col_lambda1 "
#define FASTCL_GATHER_FORWARD                                                                                   \
  "images batch channels height width stride_batch stride_channel stride_row stride_col index num_patches " \
  "patch_size grid_w " FASTCL_GATHER_TAPS "out stream"
#define FASTCL_GATHER_BACKWARD \
  "grad_out batch channels height width index num_patches patch_size grid_w " FASTCL_GATHER_TAPS "grad_images stream"
#define FASTCL_GATHER_EXPORTS(suffix, dtype)                                                                         \
  FASTCL_EXPORT(gather_patches_cuda_forward_##suffix, &forward<dtype>, FASTCL_GATHER_FORWARD,                        \
                "Gather K bilinearly resampled P x P patches per image into out (B, K, C*P*P) on `stream`.");        \
  FASTCL_EXPORT(gather_patches_cuda_backward_##suffix, &backward<dtype>, FASTCL_GATHER_BACKWARD,                     \
                "Scatter-add dL/dpatches into a zeroed contiguous grad_images (B, C, H, W) (float32 for half types).")
FASTCL_GATHER_EXPORTS(f32, GatherDtype::kFloat32);
FASTCL_GATHER_EXPORTS(f64, GatherDtype::kFloat64);
FASTCL_GATHER_EXPORTS(f16, GatherDtype::kFloat16);
FASTCL_GATHER_EXPORTS(bf16, GatherDtype::kBFloat16);

}  // namespace fastcl
