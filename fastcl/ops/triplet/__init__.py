"""Batch-hard triplet margin loss (Hermans et al., "In Defense of the Triplet Loss", 2017) with
in-batch negatives:

    L_i = max(0, m + |a_i - p_i| - min_{j != i} |a_i - p_j|)

for paired (B, D) anchors and positives (the other pairs' positives are anchor i's negatives),
Euclidean distances, on L2-normalized rows by default (``normalize=False`` for raw ones).
``naive`` materializes the B x B distances (the reference); ``torch`` (every device) finds each
row's hardest negative in row blocks and never does (:mod:`.chunked`). Gradients are exact to
every order (the loss is differentiated by autograd through O(B * D) gathers).
"""
from __future__ import annotations

import torch
from torch import nn

from ..common.backends import resolve_backend
from ..common.checks import autocast_disabled, input_dtypes
from . import naive
from .op import hardest_negatives_op
from .options import EXTRA_BACKENDS, check_triplet_args

__all__ = ["triplet_margin_loss", "TripletMarginLoss"]


def triplet_margin_loss(anchor: torch.Tensor, positive: torch.Tensor, *, margin: float = 0.2, normalize: bool = True,
                        reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Batch-hard triplet loss of paired (B, D) ``anchor`` and ``positive`` rows (B >= 2).

    ``reduction``: "mean" (default), "sum" or "none" (the (B,) losses). float32 loss for float16,
    bfloat16 and float32 inputs (float64 for float64); under autocast the inputs are cast as a
    matmul's would be.

    Example::

        >>> loss = fastcl.triplet_margin_loss(anchor_embeddings, positive_embeddings, margin=0.2)
    """
    device_type = anchor.device.type if isinstance(anchor, torch.Tensor) else "cpu"
    cast, autocast = input_dtypes(device_type, anchor=anchor, positive=positive)
    anchor, positive = cast["anchor"], cast["positive"]
    margin = check_triplet_args(anchor, positive, margin, normalize, reduction, backend)
    chosen = resolve_backend(backend, anchor.device, EXTRA_BACKENDS, cpu_kernels=False)
    with autocast_disabled(device_type, autocast):
        if chosen == "naive":
            return naive.triplet_margin_loss(anchor, positive, margin=margin, normalize=normalize, reduction=reduction)
        a, p = naive.prepared(anchor, positive, normalize)
        losses = naive.triplet_losses(a, p, hardest_negatives_op(a.detach(), p.detach()), margin)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


class TripletMarginLoss(nn.Module):
    """:func:`triplet_margin_loss` as a module: ``TripletMarginLoss(margin=0.2)(anchor, positive)``."""

    def __init__(self, margin: float = 0.2, normalize: bool = True, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.margin, self.normalize, self.reduction, self.backend = margin, normalize, reduction, backend

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        return triplet_margin_loss(anchor, positive, margin=self.margin, normalize=self.normalize,
                                   reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}"
