"""The triplet loss's backends and argument checks (the shared checks are in :mod:`..common.checks`)."""
from __future__ import annotations

import math

from ..common.checks import REDUCTIONS, check_choice, check_embeddings, check_same_device

# no native or GPU kernels: "torch" (the chunked path) runs on every device
TRIPLET_BACKENDS = ("auto", "naive", "torch")
EXTRA_BACKENDS: dict = {}


def check_triplet_args(anchor, positive, margin, normalize, reduction: str, backend: str) -> float:
    """Checks every argument; returns the margin as a float."""
    check_embeddings("anchor", anchor, "(B, D)", 2)
    check_embeddings("positive", positive, "(B, D)", 2)
    if positive.shape != anchor.shape:
        raise ValueError(f"positive must have the shape of anchor {tuple(anchor.shape)}, got {tuple(positive.shape)}")
    if positive.dtype != anchor.dtype:
        raise TypeError(f"anchor and positive must have the same dtype, got {anchor.dtype} and {positive.dtype}")
    check_same_device(anchor=anchor, positive=positive)
    if anchor.shape[0] < 2:
        raise ValueError(f"the batch holds the negatives: anchor needs at least 2 rows, got {anchor.shape[0]}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite float, got {margin!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, TRIPLET_BACKENDS)
    return float(margin)
