"""Pure-PyTorch gather (any device, autograd for free): four ``torch.gather`` calls, one per
bilinear corner, over the flattened image, with indices built from the per-axis taps.

Memory is O(B*K*C*P*P) (the output and four index/value tensors of that size), never the
resized image or the patch grid. It is the fallback when no native or Triton kernel runs.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .sampling import AxisTaps


def patch_pixel_rows(index: torch.Tensor, grid_w: int, patch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, K, P) output-image rows and columns covered by each chosen patch."""
    offsets = torch.arange(patch_size, device=index.device)
    rows = (index // grid_w)[..., None] * patch_size + offsets
    cols = (index % grid_w)[..., None] * patch_size + offsets
    return rows, cols


def corner_taps(index: torch.Tensor, patch_size: int, grid_w: int, width: int, row_taps: AxisTaps,
                col_taps: AxisTaps) -> Tuple[torch.Tensor, torch.Tensor]:
    """(offsets, weights), each (B, K, 2, 2, P, P): the flat source pixel (row * width + column)
    of bilinear corner (a, b) of each output pixel (i, j) of each chosen patch, and its weight."""
    P = patch_size
    rows, cols = patch_pixel_rows(index, grid_w, P)  # (B, K, P)

    def look_up(table, at):
        return table.index_select(0, at.reshape(-1)).view(at.shape)

    row_offsets = torch.stack([look_up(row_taps.index0, rows), look_up(row_taps.index1, rows)], dim=2) * width
    col_offsets = torch.stack([look_up(col_taps.index0, cols), look_up(col_taps.index1, cols)], dim=2)
    offsets = row_offsets[:, :, :, None, :, None] + col_offsets[:, :, None, :, None, :]
    row_w1 = look_up(row_taps.lambda1, rows)
    col_w1 = look_up(col_taps.lambda1, cols)
    row_weights = torch.stack([1 - row_w1, row_w1], dim=2)[:, :, :, None, :, None]
    col_weights = torch.stack([1 - col_w1, col_w1], dim=2)[:, :, None, :, None, :]
    return offsets, row_weights * col_weights


def gather_patches_indexed(images: torch.Tensor, index: torch.Tensor, patch_size: int, grid_w: int,
                           row_taps: AxisTaps, col_taps: AxisTaps) -> torch.Tensor:
    """(B, K, C*P*P) patches; differentiable with respect to ``images``.

    One ``torch.gather`` reads all four bilinear corners at once; few, large ops keep the
    per-op overhead (thread wake-ups on CPU, launches on GPU) small.
    """
    batch, channels, height, width = images.shape
    num_patches = index.shape[1]
    P = patch_size
    offsets, weights = corner_taps(index, patch_size, grid_w, width, row_taps, col_taps)  # (B, K, 2, 2, P, P)
    flat = images.reshape(batch, channels, height * width)
    values = torch.gather(flat, 2, offsets.reshape(batch, 1, -1).expand(-1, channels, -1))
    values = values.view(batch, channels, num_patches, 2, 2, P, P).to(weights.dtype)
    patches = (values * weights[:, None]).sum(dim=(3, 4))  # (B, C, K, P, P)
    patches = patches.to(images.dtype).transpose(1, 2)
    return patches.reshape(batch, num_patches, channels * P * P)


def scatter_patches_deterministic(grad_patches: torch.Tensor, index: torch.Tensor, patch_size: int, grid_w: int,
                                  row_taps: AxisTaps, col_taps: AxisTaps, image_shape) -> torch.Tensor:
    """The image gradient of the gather, bit-reproducible: every (corner, weight x gradient)
    contribution is formed without atomics, then summed by ``scatter_add_``, which PyTorch runs
    deterministically under ``torch.use_deterministic_algorithms(True)`` (a sort on CUDA, serial
    per plane on CPU). The GPU backends' backward in deterministic mode; about 4 x (int64 + fp32)
    per output element of temporary memory."""
    batch, channels, height, width = image_shape
    num_patches = index.shape[1]
    P = patch_size
    offsets, weights = corner_taps(index, patch_size, grid_w, width, row_taps, col_taps)
    grad = grad_patches.reshape(batch, num_patches, channels, P, P).to(weights.dtype)
    values = grad[:, :, :, None, None] * weights[:, :, None]  # (B, K, C, 2, 2, P, P)
    values = values.transpose(1, 2).reshape(batch, channels, -1)
    target = offsets.reshape(batch, 1, -1).expand(-1, channels, -1)
    out = torch.zeros(batch, channels, height * width, dtype=weights.dtype, device=grad_patches.device)
    out.scatter_add_(2, target, values)
    return out.view(image_shape).to(grad_patches.dtype)
