"""Triton gather kernels (CUDA GPUs; on CPU only under ``TRITON_INTERPRET=1``, for tests).

One program per (patch, block of its C*P*P pixels): it reads the patch's flat index, the
per-axis bilinear taps of its rows and columns (fastcl/ops/patches/sampling.py) and the four
source pixels of each output pixel, and blends them in fp32. The backward program
scatter-adds the four weighted gradients with ``tl.atomic_add`` into an fp32 image gradient
(neighbouring patches may share source pixels).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .sampling import AxisTaps

BLOCK_PIXELS = 256


def _on_device(device: torch.device):
    """Launch on the tensors' GPU (a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _patch_taps(index, patch_id, row_index0, row_index1, row_lambda1, col_index0, col_index1, col_lambda1,
                num_patches, patch_elements, grid_w, PATCH: tl.constexpr, BLOCK: tl.constexpr):
    """Where the elements of this program's block of one output patch come from: (batch, element,
    valid, channel, and the bilinear taps y0, y1, ly1, x0, x1, lx1 of each element)."""
    block_id = tl.program_id(1).to(tl.int64)
    batch_id = patch_id // num_patches
    flat = tl.load(index + patch_id)
    row0 = (flat // grid_w) * PATCH
    col0 = (flat % grid_w) * PATCH
    element = block_id * BLOCK + tl.arange(0, BLOCK)
    valid = element < patch_elements
    channel = element // (PATCH * PATCH)
    y = row0 + (element // PATCH) % PATCH
    x = col0 + element % PATCH
    y0 = tl.load(row_index0 + y, mask=valid, other=0)
    y1 = tl.load(row_index1 + y, mask=valid, other=0)
    ly1 = tl.load(row_lambda1 + y, mask=valid, other=0.0).to(tl.float32)
    x0 = tl.load(col_index0 + x, mask=valid, other=0)
    x1 = tl.load(col_index1 + x, mask=valid, other=0)
    lx1 = tl.load(col_lambda1 + x, mask=valid, other=0.0).to(tl.float32)
    return batch_id, element, valid, channel, y0, y1, ly1, x0, x1, lx1


@triton.jit
def gather_patches_fwd_kernel(
    images, index, out,
    row_index0, row_index1, row_lambda1, col_index0, col_index1, col_lambda1,
    num_patches, patch_elements, grid_w,
    stride_batch, stride_channel, stride_row, stride_col,
    PATCH: tl.constexpr, BLOCK: tl.constexpr,
):
    patch_id = tl.program_id(0).to(tl.int64)
    batch_id, element, valid, channel, y0, y1, ly1, x0, x1, lx1 = _patch_taps(
        index, patch_id, row_index0, row_index1, row_lambda1, col_index0, col_index1, col_lambda1,
        num_patches, patch_elements, grid_w, PATCH, BLOCK)
    plane = images + batch_id * stride_batch + channel * stride_channel
    v00 = tl.load(plane + y0 * stride_row + x0 * stride_col, mask=valid, other=0.0).to(tl.float32)
    v01 = tl.load(plane + y0 * stride_row + x1 * stride_col, mask=valid, other=0.0).to(tl.float32)
    v10 = tl.load(plane + y1 * stride_row + x0 * stride_col, mask=valid, other=0.0).to(tl.float32)
    v11 = tl.load(plane + y1 * stride_row + x1 * stride_col, mask=valid, other=0.0).to(tl.float32)
    lx0 = 1.0 - lx1
    ly0 = 1.0 - ly1
    value = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
    tl.store(out + patch_id * patch_elements + element, value.to(out.dtype.element_ty), mask=valid)


@triton.jit
def gather_patches_bwd_kernel(
    grad_out, index, grad_images,
    row_index0, row_index1, row_lambda1, col_index0, col_index1, col_lambda1,
    num_patches, patch_elements, grid_w, channels, height, width,
    PATCH: tl.constexpr, BLOCK: tl.constexpr,
):
    patch_id = tl.program_id(0).to(tl.int64)
    batch_id, element, valid, channel, y0, y1, ly1, x0, x1, lx1 = _patch_taps(
        index, patch_id, row_index0, row_index1, row_lambda1, col_index0, col_index1, col_lambda1,
        num_patches, patch_elements, grid_w, PATCH, BLOCK)
    g = tl.load(grad_out + patch_id * patch_elements + element, mask=valid, other=0.0).to(tl.float32)
    plane = grad_images + (batch_id * channels + channel) * height * width
    lx0 = 1.0 - lx1
    ly0 = 1.0 - ly1
    tl.atomic_add(plane + y0 * width + x0, ly0 * lx0 * g, mask=valid)
    tl.atomic_add(plane + y0 * width + x1, ly0 * lx1 * g, mask=valid)
    tl.atomic_add(plane + y1 * width + x0, ly1 * lx0 * g, mask=valid)
    tl.atomic_add(plane + y1 * width + x1, ly1 * lx1 * g, mask=valid)


def triton_forward(images: torch.Tensor, index: torch.Tensor, patch_size: int, grid_w: int,
                   row_taps: AxisTaps, col_taps: AxisTaps) -> torch.Tensor:
    batch, channels = images.shape[:2]
    num_patches = index.shape[1]
    patch_elements = channels * patch_size * patch_size
    out = torch.empty(batch, num_patches, patch_elements, dtype=images.dtype, device=images.device)
    if out.numel() == 0:
        return out
    grid = (batch * num_patches, triton.cdiv(patch_elements, BLOCK_PIXELS))
    with _on_device(images.device):
        gather_patches_fwd_kernel[grid](
            images, index.contiguous(), out, *(t.contiguous() for t in (*row_taps, *col_taps)),
            num_patches, patch_elements, grid_w, *images.stride(),
            PATCH=patch_size, BLOCK=BLOCK_PIXELS,
        )
    return out


def triton_backward(grad_out: torch.Tensor, index: torch.Tensor, patch_size: int, grid_w: int,
                    row_taps: AxisTaps, col_taps: AxisTaps, image_shape) -> torch.Tensor:
    batch, channels, height, width = image_shape
    num_patches = index.shape[1]
    patch_elements = channels * patch_size * patch_size
    grad_images = torch.zeros(image_shape, dtype=torch.float32, device=grad_out.device)
    if grad_out.numel() > 0:
        grid = (batch * num_patches, triton.cdiv(patch_elements, BLOCK_PIXELS))
        with _on_device(grad_out.device):
            gather_patches_bwd_kernel[grid](
                grad_out.contiguous(), index.contiguous(), grad_images, *(t.contiguous() for t in (*row_taps, *col_taps)),
                num_patches, patch_elements, grid_w, channels, height, width,
                PATCH=patch_size, BLOCK=BLOCK_PIXELS,
            )
    return grad_images.to(grad_out.dtype)
