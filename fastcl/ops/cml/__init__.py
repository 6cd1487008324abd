"""Fused Collaborative Metric Learning loss (Hsieh et al., WWW'17) and its helpers.

    d(u, x) = |u - x|^2,    h_i = m + d(u_i, p_i) - min_k d(u_i, n_ik)
    M_i = #{k : m + d(u_i, p_i) - d(u_i, n_ik) > 0},    w_i = log(1 + M_i * J / W)
    L_i = w_i * max(h_i, 0)

``naive`` materializes the (B, W, D) differences (the reference); every other backend makes one
pass over the sampled negatives keeping O(B) statistics (:mod:`.chunked`, csrc/cpu/cml.cpp,
:mod:`.triton`), then rebuilds the loss from the closest negative of each row (:mod:`.op`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..common.backends import resolve_backend
from ..common.checks import check_embeddings, checking_values
from . import naive
from .options import EXTRA_BACKENDS, check_cml_args
from .op import cml_row_losses
from ..common.gradients import compute_dtype

__all__ = ["cml_loss", "CMLLoss", "covariance_loss", "clip_norm_"]

def cml_loss(users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor] = None, *,
             negative_indices: Optional[torch.Tensor] = None, item_table: Optional[torch.Tensor] = None,
             margin: float = 1.9, num_items: Optional[int] = None, rank_weight: bool = True,
             reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    r"""CML's weighted hinge of each (user, positive) pair against its closest sampled negative.

    Args:
        users, positives: (B, D) float16 / bfloat16 / float32 / float64.
        negatives: (B, W, D) sampled negatives, or ``None`` with
        negative_indices: (B, W) int64 rows of
        item_table: (J, D) item embeddings; read in place, the gradient is scatter-added into it.
        margin: m (the reference code uses 1.9 with unit-ball embeddings).
        num_items: J of the rank estimate ``M * J / W``; default ``item_table.shape[0]`` (W
            with dense negatives, i.e. rank = M).
        rank_weight: multiply by ``log(1 + rank)`` (WARP-style); False gives the plain hinge.
        reduction: "mean" | "sum" (the reference code's) | "none" (per row, (B,)).
        backend: "auto" | "naive" | "torch" | "cpu" | "triton".

    Returns the loss in float32 (float64 for float64 inputs). Fused backends raise ValueError
    when a distance is NaN or Inf (``naive`` returns NaN).

    Example::

        >>> idx = torch.randint(0, items.weight.shape[0], (B, 256))
        >>> loss = fastcl.cml_loss(users(u), items(i), negative_indices=idx, item_table=items.weight)
    """
    num_items = check_cml_args(users, positives, negatives, negative_indices, item_table, margin, num_items,
                                reduction, backend)
    device = users.device
    chosen = resolve_backend(backend, device, EXTRA_BACKENDS)
    if chosen == "naive":
        return naive.cml_loss(users, positives, negatives, negative_indices=negative_indices, item_table=item_table,
                              margin=float(margin), num_items=num_items, rank_weight=rank_weight, reduction=reduction)
    if chosen in EXTRA_BACKENDS:
        EXTRA_BACKENDS[chosen](users)
    losses = cml_row_losses(users, positives, negatives, negative_indices, item_table, float(margin), num_items,
                            rank_weight, chosen, checking_values())
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()


def covariance_loss(*embeddings: torch.Tensor) -> torch.Tensor:
    r"""CML's covariance regularizer over the rows of ``cat(embeddings)`` (each (N_i, D)):
    ``sum_{a != b} C_ab^2 / N`` with ``C`` the (D, D) covariance of the N rows; it decorrelates
    the embedding dimensions. Computed in float32 (float64 for float64), O(D^2) memory.

    Example::

        >>> loss = loss + 10.0 * fastcl.ops.cml.covariance_loss(user_batch, item_batch)
    """
    if not embeddings:
        raise ValueError("covariance_loss needs at least one (N, D) tensor")
    for index, e in enumerate(embeddings):
        check_embeddings(f"embeddings[{index}]", e, "(N, D)", 2)
    if len({e.shape[1] for e in embeddings}) > 1:
        raise ValueError(f"every embedding tensor needs the same D, got {[tuple(e.shape) for e in embeddings]}")
    dtype = compute_dtype(embeddings[0])
    x = torch.cat([e.to(dtype) for e in embeddings])
    rows = x.shape[0]
    centered = x - x.mean(0)
    covariance = centered.T @ centered / rows
    return ((covariance ** 2).sum() - (torch.diagonal(covariance) ** 2).sum()) / rows


@torch.no_grad()
def clip_norm_(weight: torch.Tensor, max_norm: float = 1.0, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project rows of ``weight`` (N, D) into the ball of radius ``max_norm``, in place (CML does
    this after each step for the users and items of the batch; ``rows`` limits it to them)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    target = weight if rows is None else weight[rows]
    norms = target.norm(dim=-1, keepdim=True)
    scaled = target * (max_norm / norms.clamp_min(max_norm))
    if rows is None:
        weight.copy_(scaled)
    else:
        weight[rows] = scaled
    return weight


class CMLLoss(nn.Module):
    """:func:`cml_loss` with its options fixed at construction.

    Example::

        >>> criterion = fastcl.CMLLoss(margin=1.9, num_items=1682)
        >>> loss = criterion(u, p, negative_indices=idx, item_table=items.weight)
    """

    def __init__(self, margin: float = 1.9, num_items: Optional[int] = None, rank_weight: bool = True,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.options = dict(margin=margin, num_items=num_items, rank_weight=rank_weight, reduction=reduction,
                            backend=backend)

    def forward(self, users, positives, negatives=None, *, negative_indices=None, item_table=None):
        return cml_loss(users, positives, negatives, negative_indices=negative_indices, item_table=item_table,
                        **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
