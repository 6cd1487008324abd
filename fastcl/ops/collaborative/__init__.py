"""Collaborative contrastive loss (CCN, Gao et al. 2024), fused: no (P, L, L) logits.

The items one user saw on one page form a context. Within a page, co-clicked and co-non-clicked
items attract and mono-click pairs (one clicked, one not) repel, InfoNCE-style over the page
(a SupCon form with the click flag as the label):

    z_a  = e_a * t (Hadamard with the page's trigger item, optional), normalized if asked
    L_a  = log sum_{b != a} exp(z_a . z_b / tau) - mean_{b != a, c_b = c_a} z_a . z_b / tau

The published equations were not recoverable (METHODS.md): this is a documented reconstruction
with tau and the weight lambda (the caller's) configurable. ``naive`` materializes the
(P, L, L) logits; ``torch`` does that one block of pages at a time; ``cpu`` and ``triton`` keep
one page on chip (csrc/cpu/collaborative.cpp, :mod:`.triton`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..common.backends import resolve_backend
from . import naive
from .chunked import contributing_anchors
from .op import collaborative_op
from .options import EXTRA_BACKENDS, check_collaborative_args
from ..common.gradients import compute_dtype

__all__ = ["collaborative_contrastive_loss", "CollaborativeContrastiveLoss"]

def collaborative_contrastive_loss(items: torch.Tensor, clicks: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                                   trigger: Optional[torch.Tensor] = None, temperature: float = 0.1,
                                   normalize: bool = True, reduction: str = "mean",
                                   backend: str = "auto") -> torch.Tensor:
    r"""CCN's collaborative contrastive loss of the items of each page.

    Args:
        items: (P, L, D) representations of the L items shown on each of P pages (padded).
        clicks: (P, L) bool or integer click outcome; items with the same value attract.
        mask: (P, L) bool, False at padding (default: every position is an item).
        trigger: (P, D) the page's trigger item; the items enter as ``items * trigger``.
        temperature: tau.
        normalize: cosine similarity (L2-normalize after the Hadamard product).
        reduction: "mean" over the anchors that have a same-outcome partner (0 when none has),
            "sum", or "none" ((P, L), 0 at anchors without a partner and at padding).
        backend: "auto" | "naive" | "torch" | "cpu" | "triton".

    Returns float32 (float64 for float64 items). A page with fewer than two items, or an
    anchor alone in its click outcome, contributes nothing (naive's semantics); NaN in a page
    makes that page's losses NaN, as in the reference.

    Example::

        >>> loss = bce + lam * fastcl.collaborative_contrastive_loss(item_emb, clicked, mask, trigger=trigger_emb)
    """
    mask = check_collaborative_args(items, clicks, mask, trigger, temperature, reduction, backend)
    chosen = resolve_backend(backend, items.device, EXTRA_BACKENDS)
    if chosen == "naive":
        return naive.collaborative_contrastive_loss(items, clicks, mask, trigger=trigger, temperature=float(temperature),
                                                    normalize=normalize, reduction=reduction)
    if chosen in EXTRA_BACKENDS:
        EXTRA_BACKENDS[chosen](items)
    dtype = compute_dtype(items)
    if reduction == "none":
        weights = torch.zeros(mask.shape, dtype=dtype, device=items.device)
    else:
        weights = contributing_anchors(clicks, mask).to(dtype)
        if reduction == "mean":
            count = weights.sum()
            weights = weights / count.clamp_min(1.0)
    losses, total = collaborative_op(items, clicks, mask, trigger, weights, float(temperature), normalize, chosen,
                                     reduction != "none")
    return losses if reduction == "none" else total


class CollaborativeContrastiveLoss(nn.Module):
    """:func:`collaborative_contrastive_loss` with its options fixed at construction.

    Example::

        >>> criterion = fastcl.CollaborativeContrastiveLoss(temperature=0.1)
        >>> loss = criterion(item_emb, clicks, mask, trigger=trigger_emb)
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.options = dict(temperature=temperature, normalize=normalize, reduction=reduction, backend=backend)

    def forward(self, items, clicks, mask=None, *, trigger=None):
        return collaborative_contrastive_loss(items, clicks, mask, trigger=trigger, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
