"""The collaborative loss's backends and argument checks (the shared checks are in :mod:`..common.checks`)."""
from __future__ import annotations

import math

import torch

from ..common.checks import (BACKENDS, REDUCTIONS, check_choice, check_embeddings, check_float_tensor,
                             check_same_device)
from ..common.gpu import check_triton_device, triton_installed

# GPU backends of this op: name -> the check of what it refuses (no native CUDA kernels)
EXTRA_BACKENDS = {"triton": check_triton_device} if triton_installed() else {}
COLLABORATIVE_BACKENDS = tuple(b for b in BACKENDS if b != "cuda")


def check_collaborative_args(items, clicks, mask, trigger, temperature, reduction, backend):
    check_embeddings("items", items, "(P, L, D)", 3)
    pages, length, dim = items.shape
    if length == 0:
        raise ValueError(f"items has no context positions (shape {tuple(items.shape)}): pages need L >= 1")
    if not isinstance(clicks, torch.Tensor) or clicks.shape != (pages, length):
        raise ValueError(f"clicks must be a (P={pages}, L={length}) tensor of click flags, got "
                         f"{tuple(clicks.shape) if isinstance(clicks, torch.Tensor) else type(clicks).__name__}")
    if clicks.is_floating_point() or clicks.is_complex():
        raise TypeError(f"clicks must be bool or integer (the click outcome), got {clicks.dtype}")
    if mask is None:
        mask = torch.ones(pages, length, dtype=torch.bool, device=items.device)
    elif not isinstance(mask, torch.Tensor) or mask.shape != (pages, length) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool (P={pages}, L={length}) tensor (True = a real item, False = padding), got "
                         f"{(tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if trigger is not None:
        check_float_tensor("trigger", trigger, "(P, D)", 2)
        if trigger.shape != (pages, dim):
            raise ValueError(f"trigger must have shape (P={pages}, D={dim}), got {tuple(trigger.shape)}")
        if trigger.dtype != items.dtype:
            raise TypeError(f"trigger must have the dtype of items ({items.dtype}), got {trigger.dtype}")
    check_same_device(items=items, clicks=clicks, mask=mask, trigger=trigger)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, COLLABORATIVE_BACKENDS)
    return mask
