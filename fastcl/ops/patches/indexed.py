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


def gather_patches_indexed(images: torch.Tensor, index: torch.Tensor, patch_size: int, grid_w: int,
                           row_taps: AxisTaps, col_taps: AxisTaps) -> torch.Tensor:
    """(B, K, C*P*P) patches; differentiable with respect to ``images``."""
    batch, channels, height, width = images.shape
    num_patches = index.shape[1]
    rows, cols = patch_pixel_rows(index, grid_w, patch_size)
    flat = images.reshape(batch, channels, height * width)
    compute = row_taps.lambda1.dtype
    row_w1 = row_taps.lambda1[rows][..., :, None]  # (B, K, P, 1)
    col_w1 = col_taps.lambda1[cols][..., None, :]  # (B, K, 1, P)

    def corner(row_index, col_index):
        offsets = row_index[rows][..., :, None] * width + col_index[cols][..., None, :]  # (B, K, P, P)
        offsets = offsets.reshape(batch, 1, -1).expand(-1, channels, -1)
        values = torch.gather(flat, 2, offsets).to(compute)
        return values.reshape(batch, channels, num_patches, patch_size, patch_size)

    # PyTorch's order of operations: h0w * (w0w * x00 + w1w * x01) + h1w * (w0w * x10 + w1w * x11)
    row_w1 = row_w1[:, None]
    col_w1 = col_w1[:, None]
    top = (1 - col_w1) * corner(row_taps.index0, col_taps.index0) + col_w1 * corner(row_taps.index0, col_taps.index1)
    bottom = (1 - col_w1) * corner(row_taps.index1, col_taps.index0) + col_w1 * corner(row_taps.index1, col_taps.index1)
    patches = (1 - row_w1) * top + row_w1 * bottom  # (B, C, K, P, P)
    patches = patches.to(images.dtype).permute(0, 2, 1, 3, 4)
    return patches.reshape(batch, num_patches, channels * patch_size * patch_size)
