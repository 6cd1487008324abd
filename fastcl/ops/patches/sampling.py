"""Per-axis bilinear taps of ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``.

Bilinear resizing is separable: output row y reads input rows ``index0[y]`` and ``index1[y]``
with weights ``1 - lambda1[y]`` and ``lambda1[y]``, where (PyTorch's convention)

    src = max(0, (H / Hs) * (y + 0.5) - 0.5),  index0 = min(floor(src), H - 1),
    index1 = index0 + (index0 < H - 1),        lambda1 = clamp(src - index0, 0, 1)

and an axis whose size does not change is copied (index0 = index1 = y, lambda1 = 0). The
ratio is computed in the op's accumulation type (float32, or float64 for float64 images) as
PyTorch does, so the kernels reproduce ``interpolate`` to rounding. The tables hold Hs and Ws
entries: every backend reads them instead of building the resized image.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class AxisTaps(NamedTuple):
    index0: torch.Tensor  # (out,) int64
    index1: torch.Tensor  # (out,) int64
    lambda1: torch.Tensor  # (out,) float32 or float64: weight of index1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def axis_taps(in_size: int, out_size: int, dtype: torch.dtype, device) -> AxisTaps:
    """Source indices and weights along one axis (see the module docstring)."""
    dst = torch.arange(out_size, device=device)
    if in_size == out_size:
        return AxisTaps(dst, dst.clone(), torch.zeros(out_size, dtype=dtype, device=device))
    ratio = torch.tensor(in_size, dtype=dtype) / out_size  # rounded to dtype, as in PyTorch
    src = (ratio.to(device) * (dst.to(dtype) + 0.5) - 0.5).clamp_min(0)
    index0 = src.floor().long().clamp_max(in_size - 1)
    lambda1 = (src - index0.to(dtype)).clamp(0, 1)
    index1 = index0 + (index0 < in_size - 1).long()
    return AxisTaps(index0, index1, lambda1)
