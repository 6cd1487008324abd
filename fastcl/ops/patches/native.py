"""Glue to the native gather kernels: csrc/cpu/patches.cpp and csrc/cuda/patches.cu.

The kernels take data pointers; this module allocates the outputs, makes the tap tables and
index contiguous, and passes ``torch.get_num_threads()`` (CPU) or the current stream (CUDA).
The image may have any strides (the kernel reads through them), so no copy of it is made.
"""
from __future__ import annotations

import torch

from ..._native import native_module
from .sampling import AxisTaps

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _suffix(dtype: torch.dtype, device: torch.device) -> str:
    if device.type == "cpu" and dtype not in _SUFFIX:
        raise TypeError(f"the native CPU gather takes float32/float64 images, got {dtype}")
    return _SUFFIX.get(dtype, {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dtype, ""))


def _tables(row_taps: AxisTaps, col_taps: AxisTaps):
    tables = [t.contiguous() for t in (*row_taps, *col_taps)]
    return tables, [t.data_ptr() for t in tables]


def native_forward(images: torch.Tensor, index: torch.Tensor, patch_size: int, grid_w: int,
                   row_taps: AxisTaps, col_taps: AxisTaps) -> torch.Tensor:
    module = native_module()
    batch, channels, height, width = images.shape
    num_patches = index.shape[1]
    index = index.contiguous()
    tables, addresses = _tables(row_taps, col_taps)
    out = torch.empty(batch, num_patches, channels * patch_size * patch_size, dtype=images.dtype, device=images.device)
    if out.numel() == 0:
        return out
    common = [images.data_ptr(), batch, channels, height, width, *images.stride(), index.data_ptr(), num_patches,
              patch_size, grid_w, *addresses, out.data_ptr()]
    suffix = _suffix(images.dtype, images.device)
    if images.device.type == "cpu":
        getattr(module, f"gather_patches_forward_{suffix}")(*common, torch.get_num_threads())
    else:
        with torch.cuda.device(images.device):  # launch on the images' GPU, not the current one
            getattr(module, f"gather_patches_cuda_forward_{suffix}")(*common, torch.cuda.current_stream(images.device).cuda_stream)
    return out


def native_backward(grad_out: torch.Tensor, index: torch.Tensor, patch_size: int, grid_w: int,
                    row_taps: AxisTaps, col_taps: AxisTaps, image_shape) -> torch.Tensor:
    module = native_module()
    batch, channels, height, width = image_shape
    num_patches = index.shape[1]
    grad_out = grad_out.contiguous()
    index = index.contiguous()
    tables, addresses = _tables(row_taps, col_taps)
    device = grad_out.device
    # CUDA accumulates half-precision gradients with fp32 atomics, then casts once.
    accumulate = grad_out.dtype if grad_out.dtype in _SUFFIX else torch.float32
    grad_images = torch.zeros(image_shape, dtype=accumulate, device=device)
    if grad_out.numel() == 0:
        return grad_images.to(grad_out.dtype)
    common = [grad_out.data_ptr(), batch, channels, height, width, index.data_ptr(), num_patches, patch_size, grid_w,
              *addresses, grad_images.data_ptr()]
    suffix = _suffix(grad_out.dtype, device)
    if device.type == "cpu":
        getattr(module, f"gather_patches_backward_{suffix}")(*common, torch.get_num_threads())
    else:
        with torch.cuda.device(device):
            getattr(module, f"gather_patches_cuda_backward_{suffix}")(*common, torch.cuda.current_stream(device).cuda_stream)
    return grad_images.to(grad_out.dtype)
