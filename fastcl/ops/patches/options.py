"""Argument checking shared by every patch op and backend: one place, one set of error messages."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ...validation import checks_values as checking_values
from ..common.checks import check_choice, check_float_tensor

BACKENDS = ("auto", "naive", "torch", "cpu", "triton", "cuda")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_size(size, images_hw: Tuple[int, int]) -> Tuple[int, int]:
    """``size`` as (Hs, Ws): None keeps the image's own (H, W); an int means a square."""
    if size is None:
        return images_hw
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2 or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in size):
        raise TypeError(f"size must be None, an int or a pair of ints (Hs, Ws), got {size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    return int(size[0]), int(size[1])


def check_gather_args(images, index, patch_size, size, backend) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Validate ``gather_patches``' arguments. Returns ((Hs, Ws), (grid_h, grid_w))."""
    check_float_tensor("images", images, "(B, C, H, W)", 4)
    if min(images.shape) == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
    patch_size = check_positive_int("patch_size", patch_size)
    batch = images.shape[0]
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be an int64 torch.Tensor of shape (B, K), got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise TypeError(f"index must be an int64 tensor of flat patch indices, got {index.dtype}")
    if index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(f"index must have shape (B, K) = ({batch}, K), got {tuple(index.shape)}")
    if index.device != images.device:
        raise ValueError(f"index must be on the images' device {images.device}, got {index.device}")
    size = check_size(size, (images.shape[2], images.shape[3]))
    grid = (size[0] // patch_size, size[1] // patch_size)
    if grid[0] == 0 or grid[1] == 0:
        raise ValueError(f"size {size} is smaller than patch_size {patch_size}: the patch grid would be empty")
    if checking_values(index) and index.numel() > 0:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= grid[0] * grid[1]:
            raise ValueError(
                f"index must hold flat patch indices in [0, {grid[0] * grid[1]}) for the {grid[0]}x{grid[1]} grid "
                f"of size {size} with patch_size {patch_size}, got values in [{low}, {high}]"
            )
    check_choice("backend", backend, BACKENDS)
    return size, grid


def check_scores(name: str, scores) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, Hp, Wp), got {type(scores).__name__}")
    if scores.dim() != 3:
        raise ValueError(f"{name} must have shape (B, Hp, Wp), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {scores.dtype}")
    if checking_values(scores) and bool(torch.isnan(scores).any()):
        raise ValueError(f"{name} contains NaN: selection needs comparable scores")


def check_exclude(name: str, exclude, scores: torch.Tensor) -> Optional[torch.Tensor]:
    if exclude is None:
        return None
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {tuple(scores.shape)}, got {type(exclude).__name__}")
    if exclude.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = already chosen), got {exclude.dtype}")
    if exclude.shape != scores.shape:
        raise ValueError(f"{name} must have the scores' shape {tuple(scores.shape)}, got {tuple(exclude.shape)}")
    if exclude.device != scores.device:
        raise ValueError(f"{name} must be on the scores' device {scores.device}, got {exclude.device}")
    return exclude


def check_budget_list(budget: Sequence, count: int) -> list:
    if len(budget) != count:
        raise ValueError(f"budget as a list needs one entry per scale ({count}), got {len(budget)}")
    out = []
    for i, b in enumerate(budget):
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"budget[{i}] must be an int, got {type(b).__name__}")
        if b < 0:
            raise ValueError(f"budget[{i}] must be >= 0, got {b}")
        out.append(b)
    return out
