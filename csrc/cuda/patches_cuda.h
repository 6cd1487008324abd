// Launchers of csrc/cuda/patches.cu, declared for their C exports (plain C++).
#pragma once

#include <cstdint>

namespace fastcl {

struct GatherShape {
  int64_t batch, channels, height, width;
  int64_t stride_batch, stride_channel, stride_row, stride_col;  // of the image (forward), in elements
  int64_t num_patches, patch_size, grid_w;
};

struct GatherTaps {
  const int64_t* index;
  const int64_t* row_index0;
  const int64_t* row_index1;
  const void* row_lambda1;  // Acc: float, or double for double images
  const int64_t* col_index0;
  const int64_t* col_index1;
  const void* col_lambda1;
};

enum class GatherDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Half types read the taps as float and accumulate the image gradient in float (grad_images
// is float32 then); float64 uses double throughout.
void gather_patches_cuda_forward(GatherDtype dtype, const void* images, const GatherShape& shape, const GatherTaps& taps,
                                 void* out, std::uintptr_t stream);
void gather_patches_cuda_backward(GatherDtype dtype, const void* grad_out, const GatherShape& shape,
                                  const GatherTaps& taps, void* grad_images, std::uintptr_t stream);

}  // namespace fastcl
