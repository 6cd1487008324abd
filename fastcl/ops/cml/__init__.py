"""Fused Collaborative Metric Learning loss (Hsieh et al., WWW'17) and its helpers.

    d(u, x) = |u - x|^2,    h_i = m + d(u_i, p_i) - min_k d(u_i, n_ik)
    M_i = #{k : m + d(u_i, p_i) - d(u_i, n_ik) > 0},    w_i = log(1 + M_i * J / W)
    L_i = w_i * max(h_i, 0)

``naive`` materializes the (B, W, D) differences (the reference); every other backend makes one
pass over the sampled negatives keeping O(B) statistics (:mod:`.chunked`, csrc/cpu/cml.cpp,
:mod:`.triton`), then rebuilds the loss from the closest negative of each row (:mod:`.op`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..info_nce import resolve_backend
from ..info_nce.options import BACKENDS, REDUCTIONS, _checking_values, check_embeddings, check_same_device
from ..info_nce.gpu import check_triton_device, triton_installed
from . import naive
from .op import cml_row_losses

__all__ = ["cml_loss", "CMLLoss", "covariance_loss", "clip_norm_"]

EXTRA_BACKENDS = {"triton": check_triton_device} if triton_installed() else {}
CML_BACKENDS = tuple(b for b in BACKENDS if b != "cuda")


def _check_cml_args(users, positives, negatives, negative_indices, item_table, margin, num_items, reduction, backend):
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
        if window > 0 and _checking_values():
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
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in CML_BACKENDS:
        raise ValueError(f"backend must be one of {CML_BACKENDS}, got {backend!r}")
    return num_items


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
    num_items = _check_cml_args(users, positives, negatives, negative_indices, item_table, margin, num_items,
                                reduction, backend)
    device = users.device
    chosen = resolve_backend(backend, device, EXTRA_BACKENDS)
    if chosen == "naive":
        return naive.cml_loss(users, positives, negatives, negative_indices=negative_indices, item_table=item_table,
                              margin=float(margin), num_items=num_items, rank_weight=rank_weight, reduction=reduction)
    if chosen in EXTRA_BACKENDS:
        EXTRA_BACKENDS[chosen](users)
    losses = cml_row_losses(users, positives, negatives, negative_indices, item_table, float(margin), num_items,
                            rank_weight, chosen, _checking_values())
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
    dtype = torch.float64 if embeddings[0].dtype == torch.float64 else torch.float32
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
