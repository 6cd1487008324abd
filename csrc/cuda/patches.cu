// Patch gather for CUDA GPUs: the same maths as csrc/cpu/patches.cpp (per-axis
// bilinear tap tables, PyTorch's order of operations, fp32 accumulation for half types).
// Forward: one block per (patch, chunk of its C*P*P pixels), one thread per pixel.
// Backward: the same layout, atomicAdd into an fp32/fp64 image gradient, because
// neighbouring patches may read the same source pixel.
//
// Plain C++ launchers (pointers, sizes, strides, stream as an integer): no pybind11 here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "patches_cuda.h"

namespace fastcl {
namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_acc(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T, typename Acc> __device__ __forceinline__ T from_acc(Acc v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16(v); }

// Where element `element` of output patch `patch` sits in the resampled image: batch, channel,
// row and column (before the bilinear taps).
struct Position {
  int64_t b, c, y, x;
};

__device__ __forceinline__ Position position(const GatherShape& s, const int64_t* __restrict__ index, int64_t patch,
                                             int64_t element) {
  const int64_t P = s.patch_size;
  const int64_t flat = index[patch];
  return {patch / s.num_patches, element / (P * P), (flat / s.grid_w) * P + (element / P) % P,
          (flat % s.grid_w) * P + element % P};
}

template <typename T, typename Acc>
__global__ void gather_patches_fwd_kernel(const T* __restrict__ images, GatherShape s, const int64_t* __restrict__ index,
                                          const int64_t* __restrict__ row_index0, const int64_t* __restrict__ row_index1,
                                          const Acc* __restrict__ row_lambda1, const int64_t* __restrict__ col_index0,
                                          const int64_t* __restrict__ col_index1, const Acc* __restrict__ col_lambda1,
                                          T* __restrict__ out) {
  const int64_t patch = blockIdx.x;
  const int64_t element = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t patch_elements = s.channels * s.patch_size * s.patch_size;
  if (element >= patch_elements) return;
  const Position at = position(s, index, patch, element);
  const T* plane = images + at.b * s.stride_batch + at.c * s.stride_channel;
  const int64_t y0 = row_index0[at.y] * s.stride_row, y1 = row_index1[at.y] * s.stride_row;
  const int64_t x0 = col_index0[at.x] * s.stride_col, x1 = col_index1[at.x] * s.stride_col;
  const Acc ly1 = row_lambda1[at.y], lx1 = col_lambda1[at.x];
  const Acc ly0 = Acc(1) - ly1, lx0 = Acc(1) - lx1;
  const Acc value = ly0 * (lx0 * to_acc(plane[y0 + x0]) + lx1 * to_acc(plane[y0 + x1])) +
                    ly1 * (lx0 * to_acc(plane[y1 + x0]) + lx1 * to_acc(plane[y1 + x1]));
  out[patch * patch_elements + element] = from_acc<T, Acc>(value);
}

// grad_images: contiguous (B, C, H, W) of type Acc, zero-filled by the caller.
template <typename T, typename Acc>
__global__ void gather_patches_bwd_kernel(const T* __restrict__ grad_out, GatherShape s, const int64_t* __restrict__ index,
                                          const int64_t* __restrict__ row_index0, const int64_t* __restrict__ row_index1,
                                          const Acc* __restrict__ row_lambda1, const int64_t* __restrict__ col_index0,
                                          const int64_t* __restrict__ col_index1, const Acc* __restrict__ col_lambda1,
                                          Acc* __restrict__ grad_images) {
  const int64_t patch = blockIdx.x;
  const int64_t element = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t patch_elements = s.channels * s.patch_size * s.patch_size;
  if (element >= patch_elements) return;
  const Position at = position(s, index, patch, element);
  Acc* plane = grad_images + (at.b * s.channels + at.c) * s.height * s.width;
  const int64_t y0 = row_index0[at.y] * s.width, y1 = row_index1[at.y] * s.width;
  const int64_t x0 = col_index0[at.x], x1 = col_index1[at.x];
  const Acc ly1 = row_lambda1[at.y], lx1 = col_lambda1[at.x];
  const Acc ly0 = Acc(1) - ly1, lx0 = Acc(1) - lx1;
  const Acc g = to_acc(grad_out[patch * patch_elements + element]);
  atomicAdd(plane + y0 + x0, ly0 * lx0 * g);
  atomicAdd(plane + y0 + x1, ly0 * lx1 * g);
  atomicAdd(plane + y1 + x0, ly1 * lx0 * g);
  atomicAdd(plane + y1 + x1, ly1 * lx1 * g);
}

void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

dim3 grid_of(const GatherShape& s) {
  const int64_t patch_elements = s.channels * s.patch_size * s.patch_size;
  return dim3(static_cast<unsigned>(s.batch * s.num_patches), static_cast<unsigned>((patch_elements + kThreads - 1) / kThreads));
}

}  // namespace

namespace {

template <typename T, typename Acc>
void launch_forward(const void* images, const GatherShape& s, const GatherTaps& taps, void* out, cudaStream_t stream) {
  gather_patches_fwd_kernel<T, Acc><<<grid_of(s), kThreads, 0, stream>>>(
      static_cast<const T*>(images), s, taps.index, taps.row_index0, taps.row_index1,
      static_cast<const Acc*>(taps.row_lambda1), taps.col_index0, taps.col_index1,
      static_cast<const Acc*>(taps.col_lambda1), static_cast<T*>(out));
}

template <typename T, typename Acc>
void launch_backward(const void* grad_out, const GatherShape& s, const GatherTaps& taps, void* grad_images,
                     cudaStream_t stream) {
  gather_patches_bwd_kernel<T, Acc><<<grid_of(s), kThreads, 0, stream>>>(
      static_cast<const T*>(grad_out), s, taps.index, taps.row_index0, taps.row_index1,
      static_cast<const Acc*>(taps.row_lambda1), taps.col_index0, taps.col_index1,
      static_cast<const Acc*>(taps.col_lambda1), static_cast<Acc*>(grad_images));
}

}  // namespace

void gather_patches_cuda_forward(GatherDtype dtype, const void* images, const GatherShape& s, const GatherTaps& taps,
                                 void* out, std::uintptr_t stream_handle) {
  if (s.batch * s.num_patches == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case GatherDtype::kFloat32: launch_forward<float, float>(images, s, taps, out, stream); break;
    case GatherDtype::kFloat64: launch_forward<double, double>(images, s, taps, out, stream); break;
    case GatherDtype::kFloat16: launch_forward<__half, float>(images, s, taps, out, stream); break;
    case GatherDtype::kBFloat16: launch_forward<__nv_bfloat16, float>(images, s, taps, out, stream); break;
  }
  check_launch("gather_patches_cuda_forward");
}

void gather_patches_cuda_backward(GatherDtype dtype, const void* grad_out, const GatherShape& s, const GatherTaps& taps,
                                  void* grad_images, std::uintptr_t stream_handle) {
  if (s.batch * s.num_patches == 0) return;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case GatherDtype::kFloat32: launch_backward<float, float>(grad_out, s, taps, grad_images, stream); break;
    case GatherDtype::kFloat64: launch_backward<double, double>(grad_out, s, taps, grad_images, stream); break;
    case GatherDtype::kFloat16: launch_backward<__half, float>(grad_out, s, taps, grad_images, stream); break;
    case GatherDtype::kBFloat16: launch_backward<__nv_bfloat16, float>(grad_out, s, taps, grad_images, stream); break;
  }
  check_launch("gather_patches_cuda_backward");
}

}  // namespace fastcl
