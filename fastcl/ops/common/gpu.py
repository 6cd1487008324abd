"""Whether Triton is installed, and the device check every op's ``triton`` backend makes."""
from __future__ import annotations

import importlib.util

import torch

from ..._native import triton_interpreting


def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def check_triton_device(query: torch.Tensor, *_ignored) -> None:
    """Triton runs CUDA tensors, and CPU tensors only in its interpreter (float64 takes the chunked path)."""
    if query.dtype == torch.float64 or query.device.type == "cuda":
        return
    if not triton_interpreting():
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got query on {query.device}"
        )
