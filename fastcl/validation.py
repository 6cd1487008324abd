"""Opt-in validation of data-dependent arguments on GPU tensors.

Some argument checks need the tensors' values on the host: ``positive`` within [0, N), no
``positive[i] == i`` under ``exclude_self``, a positive tensor ``temperature``, patch indices
within the grid, non-NaN scores, a non-empty ``pool_mask``. On a GPU each such check is a host
synchronization, which stalls the pipeline and breaks CUDA-graph capture
(``torch.compile(mode="reduce-overhead")``). So for tensors that are not on the CPU they run
only in validation mode; CPU tensors are always checked (reading them costs nothing). Nothing
is checked while ``torch.compile`` traces.

Turn it on while debugging::

    fastcl.set_validation(True)        # or FASTCL_VALIDATE=1 in the environment
"""
from __future__ import annotations

import os

import torch

from ._tracing import functorch_active, is_compiling

_ENABLED = os.environ.get("FASTCL_VALIDATE", "0") not in ("", "0")


def set_validation(enabled: bool) -> None:
    """Run the data-dependent argument checks on GPU tensors too (each one syncs with the host)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def validation_enabled() -> bool:
    return _ENABLED


def checks_values(*tensors) -> bool:
    """Whether the value checks run for these tensors: never while torch.compile traces, inside a
    torch.func transform or on meta tensors; always
    when every tensor is on the CPU; else only in validation mode."""
    if is_compiling() or functorch_active():
        return False
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if any(t.device.type == "meta" for t in tensors):  # shapes only (deferred initialization)
        return False
    if _ENABLED:
        return True
    return all(t.device.type == "cpu" for t in tensors)
