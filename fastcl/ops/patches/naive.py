"""Reference patch ops in plain PyTorch: obviously correct, and as expensive as they look.

``gather_patches`` resizes the whole image, unfolds every patch of the grid and indexes the
chosen ones (the baseline of the benchmark); ``select_patches`` sorts the whole score map.
Tests and benchmarks import these; the fast backends must match them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def gather_patches(images: torch.Tensor, index: torch.Tensor, patch_size: int,
                   size: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """interpolate (bilinear, align_corners=False, antialias=False) + unfold + index.

    Returns (B, K, C*P*P) patches in (C, P, P) order and (B, K, 2) int64 (row, col).
    """
    batch, channels, height, width = images.shape
    size = (height, width) if size is None else tuple(size)
    resized = images if size == (height, width) else F.interpolate(
        images, size=size, mode="bilinear", align_corners=False, antialias=False)
    # unfold floors sizes that are not multiples of the patch, as the patch grid does.
    grid = F.unfold(resized, kernel_size=patch_size, stride=patch_size)  # (B, C*P*P, L)
    grid_w = size[1] // patch_size
    patches = torch.gather(grid.transpose(1, 2), 1, index[:, :, None].expand(-1, -1, grid.shape[1]))
    positions = torch.stack([index // grid_w, index % grid_w], dim=-1)
    return patches, positions


def select_patches(scores: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top-k of one scale's (B, Hp, Wp) scores: lower index wins ties, excluded never chosen,
    result sorted ascending. Sorts the full key (excluded, -score, index) explicitly."""
    flat = scores.flatten(1).double()
    batch, count = flat.shape
    position = torch.arange(count, dtype=torch.float64, device=scores.device).expand(batch, -1)
    excluded = torch.zeros_like(flat) if exclude is None else exclude.flatten(1).double()
    # lexicographic order by (excluded, -score, index), one stable sort per key, last key first
    order = torch.argsort(position, dim=1, stable=True)
    for key in (-flat, excluded):
        order = torch.gather(order, 1, torch.argsort(torch.gather(key, 1, order), dim=1, stable=True))
    return order[:, :k].sort(dim=1).values
