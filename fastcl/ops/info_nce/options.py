"""InfoNCE's options and argument checks (the checks every op shares are in :mod:`..common.checks`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..common.checks import (BACKENDS, REDUCTIONS, check_choice, check_embeddings, check_same_device, check_scalar,
                             check_scalar_device)
from ..common.checks import checking_values as _checking_values

MASK, SUPCON, PAIRWISE = "mask", "supcon", "pairwise"
MULTI_POSITIVE_MODES = (MASK, SUPCON, PAIRWISE)
@dataclass(frozen=True)
class InfoNCEOptions:
    """The static (non-tensor) options of one InfoNCE call."""

    normalize: bool = False
    symmetric: bool = False
    exclude_self: bool = False
    multi_positive: str = MASK
    margin: Optional[float] = None
    label_smoothing: float = 0.0
    reduction: str = "mean"


def check_temperature(temperature, name: str = "temperature"):
    """A positive float, or a scalar floating tensor (whose gradient the op computes)."""
    temperature = check_scalar(name, temperature)
    if isinstance(temperature, torch.Tensor):
        if _checking_values(temperature):
            value = float(temperature.detach().reshape(()))
            if not (value > 0) or math.isinf(value):
                raise ValueError(f"{name} must be a finite value > 0, got {value}")
        return temperature
    if not (temperature > 0) or math.isinf(temperature):
        raise ValueError(f"{name} must be a finite value > 0, got {temperature}")
    return temperature


def _check_index_vector(name: str, tensor, length: int, length_name: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({length_name},) = ({length},), got {type(tensor).__name__}")
    if tensor.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor (int64), got {tensor.dtype}")
    if tuple(tensor.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length_name},) = ({length},), got {tuple(tensor.shape)}")


def check_info_nce_args(
    query, key, positive, hard_negatives, temperature, normalize, symmetric, exclude_self,
    labels, key_labels, multi_positive, false_negative_margin, label_smoothing, reduction, backend,
) -> Tuple[InfoNCEOptions, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], object]:
    """Validate every argument of ``info_nce``. Returns (options, positive, labels, key_labels, temperature)."""
    check_embeddings("query", query, "(B, D)", 2)
    check_embeddings("key", key, "(N, D)", 2)
    batch, dim = query.shape
    num_keys = key.shape[0]
    if key.shape[1] != dim:
        raise ValueError(f"key must have shape (N, D) with D = query.shape[1] = {dim}, got {tuple(key.shape)}")
    if key.dtype != query.dtype:
        raise TypeError(f"query and key must have the same dtype, got query {query.dtype} and key {key.dtype}")
    if hard_negatives is not None:
        check_embeddings("hard_negatives", hard_negatives, "(B, H, D)", 3)
        if hard_negatives.shape[0] != batch or hard_negatives.shape[2] != dim:
            raise ValueError(
                f"hard_negatives must have shape (B, H, D) = ({batch}, H, {dim}), got {tuple(hard_negatives.shape)}"
            )
        if hard_negatives.dtype != query.dtype:
            raise TypeError(f"hard_negatives must have the query's dtype {query.dtype}, got {hard_negatives.dtype}")
    check_same_device(query=query, key=key, hard_negatives=hard_negatives, positive=positive,
                      labels=labels, key_labels=key_labels,
                      temperature=temperature if isinstance(temperature, torch.Tensor) and temperature.dim() > 0 else None)
    check_scalar_device("temperature", temperature, query)
    temperature = check_temperature(temperature)

    check_choice("multi_positive", multi_positive, MULTI_POSITIVE_MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)

    if (labels is None) != (key_labels is None):
        raise ValueError("labels (B,) and key_labels (N,) must be given together (keys sharing a query's label are not its negatives)")
    if labels is not None:
        _check_index_vector("labels", labels, batch, "B")
        _check_index_vector("key_labels", key_labels, num_keys, "N")
        labels = labels.long()
        key_labels = key_labels.long()

    if multi_positive != MASK:
        if labels is None:
            raise ValueError(f"multi_positive={multi_positive!r} takes its positives from labels: pass labels and key_labels")
        if positive is not None:
            raise ValueError(f"positive must be None with multi_positive={multi_positive!r} (the positives come from the labels)")
        if label_smoothing:
            raise ValueError(f"label_smoothing is only defined for multi_positive='mask', got multi_positive={multi_positive!r}")
        if false_negative_margin is not None:
            raise ValueError(
                f"false_negative_margin compares negatives with the indexed positive: it needs multi_positive='mask', got {multi_positive!r}"
            )

    if symmetric:
        if positive is not None:
            raise ValueError("positive must be None when symmetric=True (the first B keys are the positives, in order)")
        if num_keys < batch:
            raise ValueError(f"symmetric=True needs at least B keys: key has N = {num_keys} rows, query has B = {batch}")

    if positive is None:
        if multi_positive == MASK and num_keys < batch:
            raise ValueError(
                f"key has N = {num_keys} rows but query has B = {batch}: the default positive arange(B) needs N >= B; pass positive"
            )
    else:
        _check_index_vector("positive", positive, batch, "B")
        positive = positive.long()  # any integer dtype, as labels
        if _checking_values(positive) and batch > 0:
            low, high = int(positive.min()), int(positive.max())
            if low < 0 or high >= num_keys:
                raise ValueError(f"positive must index key rows in [0, N) = [0, {num_keys}), got values in [{low}, {high}]")

    if exclude_self and multi_positive == MASK:
        rows = torch.arange(batch, device=query.device)
        if positive is None:
            raise ValueError("exclude_self=True drops logit (i, i), which is the default positive arange(B): pass positive")
        if _checking_values(positive) and bool((positive == rows).any()):
            first = int(torch.nonzero(positive == rows)[0, 0])
            raise ValueError(f"exclude_self=True drops logit (i, i), but positive[{first}] == {first}")

    if false_negative_margin is not None:
        if isinstance(false_negative_margin, bool) or not isinstance(false_negative_margin, (int, float)):
            raise TypeError(f"false_negative_margin must be a float or None, got {type(false_negative_margin).__name__}")
        if math.isnan(false_negative_margin):
            raise ValueError("false_negative_margin must be a number, got nan")
        false_negative_margin = float(false_negative_margin)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float in [0, 1), got {type(label_smoothing).__name__}")
    if not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")

    options = InfoNCEOptions(
        normalize=bool(normalize), symmetric=bool(symmetric), exclude_self=bool(exclude_self),
        multi_positive=multi_positive, margin=false_negative_margin,
        label_smoothing=float(label_smoothing), reduction=reduction,
    )
    return options, positive, labels, key_labels, temperature
