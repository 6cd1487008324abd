"""The materializing path ``auto`` takes on the CPU for small calls (docs/robustness.md).

For the plain loss (each query's positive indexed, no labels, margin, smoothing, self exclusion
or hard negatives) it is PyTorch's cross-entropy on the logits, the fastest exact way to run a
loss whose B x N logits are small and whose inputs are finite; every other call runs the naive
reference itself. Both
follow the reference's formulas (logits = (q k^T) / tau in float32, or float64 for float64
inputs), so NaN and Inf land where the reference puts them and double backward works.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import naive
from ..common.checks import checking_values as _checking_values
from .options import MASK, InfoNCEOptions


def _finite(loss: torch.Tensor) -> bool:
    if loss.dim() == 0:  # a scalar reduction: one host read (cheaper than isfinite().all())
        return math.isfinite(float(loss.detach()))
    return bool(torch.isfinite(loss.detach()).all())


def plain(options: InfoNCEOptions, labels, key_labels, hard_negatives) -> bool:
    """Whether the call is the plain (optionally symmetric) loss cross-entropy computes."""
    no_hard = hard_negatives is None or hard_negatives.shape[1] == 0
    return (options.multi_positive == MASK and labels is None and key_labels is None and options.margin is None
            and options.label_smoothing == 0 and not options.exclude_self and no_hard)


def dense_info_nce(query, key, positive, hard_negatives, temperature, labels, key_labels,
                   options: InfoNCEOptions) -> torch.Tensor:
    """InfoNCE on materialized logits: cross-entropy for the plain loss, else the reference."""
    if not plain(options, labels, key_labels, hard_negatives):
        return naive.info_nce_with_options(query, key, positive, hard_negatives, temperature, labels, key_labels,
                                           options)
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k = query.to(dtype), key.to(dtype)
    if options.normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    inv_temperature = 1.0 / temperature.to(dtype) if isinstance(temperature, torch.Tensor) else 1.0 / float(temperature)
    logits = (q @ k.T) * inv_temperature
    batch = q.shape[0]
    index = torch.arange(batch, device=q.device)
    target = index if positive is None else positive
    reduction = options.reduction
    loss = F.cross_entropy(logits, target, reduction=reduction)
    if options.symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits[:, :batch].T, index, reduction=reduction))
    # cross-entropy's log-softmax backward differs from the reference's formulas only in a row
    # with a NaN or +inf logit (NaN / Inf inputs, an overflowed product), and such a row's loss
    # is not finite: then the reference runs instead. Checking the loss, not the B x N logits,
    # costs nothing. (A data-dependent branch: skipped under torch.compile, like the other checks.)
    if _checking_values() and not _finite(loss):
        return naive.info_nce_with_options(query, key, positive, hard_negatives, temperature, labels, key_labels,
                                           options)
    return loss
