"""CML's backends and argument checks (the checks every op shares are in :mod:`..common.checks`)."""
from __future__ import annotations

import math

import torch

from ..common.checks import BACKENDS, REDUCTIONS, check_choice, check_embeddings, check_same_device, checking_values
from ..common.gpu import check_triton_device, triton_installed

# GPU backends of this op: name -> the check of what it refuses (no native CUDA kernels)
EXTRA_BACKENDS = {"triton": check_triton_device} if triton_installed() else {}
CML_BACKENDS = tuple(b for b in BACKENDS if b != "cuda")


def check_cml_args(users, positives, negatives, negative_indices, item_table, margin, num_items, reduction, backend):
    check_embeddings("users", users, "(B, D)", 2)
    check_embeddings("positives", positives, "(B, D)", 2)
    if positives.shape != users.shape:
        raise ValueError(f"positives must have the shape of users {tuple(users.shape)}, got {tuple(positives.shape)}")
    batch, dim = users.shape
    if (negatives is None) == (negative_indices is None):
        raise ValueError("give either negatives (B, W, D) or negative_indices (B, W) with item_table (J, D), not both")
    if negatives is not None:
        if item_table is not None:
            raise ValueError("item_table is only used with negative_indices")
        check_embeddings("negatives", negatives, "(B, W, D)", 3)
        if negatives.shape[0] != batch or negatives.shape[2] != dim:
            raise ValueError(f"negatives must have shape (B={batch}, W, D={dim}), got {tuple(negatives.shape)}")
        window = negatives.shape[1]
        tensors = dict(users=users, positives=positives, negatives=negatives)
    else:
        if item_table is None:
            raise ValueError("negative_indices needs item_table (J, D)")
        check_embeddings("item_table", item_table, "(J, D)", 2)
        if item_table.shape[1] != dim:
            raise ValueError(f"item_table must have shape (J, D={dim}), got {tuple(item_table.shape)}")
        if not isinstance(negative_indices, torch.Tensor) or negative_indices.dtype != torch.int64:
            raise TypeError(f"negative_indices must be an int64 tensor of shape (B, W), got "
                            f"{getattr(negative_indices, 'dtype', type(negative_indices).__name__)}")
        if negative_indices.dim() != 2 or negative_indices.shape[0] != batch:
            raise ValueError(f"negative_indices must have shape (B={batch}, W), got {tuple(negative_indices.shape)}")
        window = negative_indices.shape[1]
        tensors = dict(users=users, positives=positives, negative_indices=negative_indices, item_table=item_table)
        if window > 0 and checking_values():
            low, high = int(negative_indices.min()), int(negative_indices.max())
            if low < 0 or high >= item_table.shape[0]:
                raise ValueError(f"negative_indices must lie in [0, J={item_table.shape[0]}), got values in [{low}, {high}]")
    if window == 0:
        raise ValueError("cml_loss needs at least one sampled negative per row (W >= 1), got W = 0")
    check_same_device(**tensors)
    dtypes = {t.dtype for name, t in tensors.items() if name != "negative_indices"}
    if len(dtypes) > 1:
        raise TypeError(f"users, positives and the negatives must share one dtype, got {sorted(map(str, dtypes))}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite float, got {margin!r}")
    if num_items is None:
        num_items = item_table.shape[0] if item_table is not None else window
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items must be a positive int (J, the number of items negatives are drawn from), got {num_items!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, CML_BACKENDS)
    return num_items
