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
from ..common.backends import materialize_logits
from ..common.checks import checking_values as _checking_values
from ..._native import native_module
from ..._tracing import untraced
from .options import MASK, InfoNCEOptions
from ..common.gradients import compute_dtype


def _finite(loss: torch.Tensor) -> bool:
    if loss.dim() == 0:  # a scalar reduction: one host read (cheaper than isfinite().all())
        return math.isfinite(float(loss.detach()))
    return bool(torch.isfinite(loss.detach()).all())


def plain(options: InfoNCEOptions, labels, key_labels, hard_negatives) -> bool:
    """Whether the call is the plain (optionally symmetric) loss cross-entropy computes."""
    no_hard = hard_negatives is None or hard_negatives.shape[1] == 0
    return (options.multi_positive == MASK and labels is None and key_labels is None and options.margin is None
            and options.label_smoothing == 0 and not options.exclude_self and no_hard)


def plain_cross_entropy(q, k, inv_temperature, positive, normalize: bool, symmetric: bool, reduction: str):
    """The plain loss as users write it: cross-entropy of ``(q k^T) * inv_temperature`` against
    each query's positive (``arange(B)`` when None); CLIP's mean of both directions when
    ``symmetric``. ``q``, ``k`` in the compute dtype."""
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = (q @ k.T) * inv_temperature
    batch = q.shape[0]
    index = torch.arange(batch, device=q.device)
    loss = F.cross_entropy(logits, index if positive is None else positive, reduction=reduction)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits[:, :batch].T, index, reduction=reduction))
    return loss


def dense_info_nce(query, key, positive, hard_negatives, temperature, labels, key_labels,
                   options: InfoNCEOptions) -> torch.Tensor:
    """InfoNCE on materialized logits: cross-entropy for the plain loss, else the reference."""
    if not plain(options, labels, key_labels, hard_negatives):
        return naive.info_nce_with_options(query, key, positive, hard_negatives, temperature, labels, key_labels,
                                           options)
    dtype = compute_dtype(query)
    inv_temperature = 1.0 / temperature.to(dtype) if isinstance(temperature, torch.Tensor) else 1.0 / float(temperature)
    loss = plain_cross_entropy(query.to(dtype), key.to(dtype), inv_temperature, positive, options.normalize,
                               options.symmetric, options.reduction)
    # cross-entropy's log-softmax backward differs from the reference's formulas only in a row
    # with a NaN or +inf logit (NaN / Inf inputs, an overflowed product), and such a row's loss
    # is not finite: then the reference runs instead. Checking the loss, not the B x N logits,
    # costs nothing. (A data-dependent branch: skipped under torch.compile, like the other checks.)
    if _checking_values() and not _finite(loss):
        return naive.info_nce_with_options(query, key, positive, hard_negatives, temperature, labels, key_labels,
                                           options)
    return loss


_COMPUTE_DTYPES = (torch.float32, torch.float64)


def small_plain_call(query, key, temperature, normalize, symmetric, reduction):
    """``auto``'s most common call on the CPU, checked and run in the fewest Python steps: the
    plain (optionally normalized / symmetric) loss of two float32 or float64 CPU tensors of one
    dtype, a temperature that is a positive float, small enough to materialize, outside autocast,
    torch.compile and torch.func. Returns None for anything else (another dtype or device, an
    input the argument checks must name, a non-finite loss the reference must compute): the
    caller then takes the general path, which checks and computes everything. The per-call cost
    of that path's option objects and checks is most of a small call's time
    (benchmarks/bench_auto_crossover.py --overhead)."""
    if type(query) is not torch.Tensor or type(key) is not torch.Tensor or type(temperature) is not float:
        return None
    dtype = query.dtype
    if (dtype not in _COMPUTE_DTYPES or key.dtype is not dtype or query.ndim != 2 or key.ndim != 2
            or not query.is_cpu or not key.is_cpu):
        return None
    (batch, dim), num_keys = query.shape, key.shape[0]
    if (batch == 0 or num_keys < batch or key.shape[1] != dim or not 0.0 < temperature < math.inf
            or type(normalize) is not bool or type(symmetric) is not bool
            or reduction not in ("mean", "sum", "none")):
        return None
    if batch * num_keys > materialize_logits(normalize) or torch.is_autocast_enabled("cpu") \
            or not untraced() or native_module() is None:  # without the kernels: the general path says so once
        return None
    loss = plain_cross_entropy(query, key, 1.0 / temperature, None, normalize, symmetric, reduction)
    return loss if (math.isfinite(loss.item()) if reduction != "none" else _finite(loss)) else None
