"""Reference batch-hard triplet loss: the B x B distance matrix materialized (float64-capable)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common.gradients import compute_dtype

__all__ = ["triplet_margin_loss", "hardest_negatives"]


def prepared(anchor, positive, normalize: bool):
    """Both in the compute dtype (float64 stays, the rest float32), L2-normalized when asked."""
    dtype = compute_dtype(anchor)
    a, p = anchor.to(dtype), positive.to(dtype)
    if normalize:
        a, p = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    return a, p


def _distances(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Every |a_i - p_j| from the differences themselves (no ``|a|^2 + |p|^2 - 2 a.p`` rounding)."""
    return torch.cdist(a, p, compute_mode="donot_use_mm_for_euclid_dist")


@torch.no_grad()
def _nearest(a: torch.Tensor, p: torch.Tensor):
    """(index of the closest other positive, rows whose distances hold a NaN) of prepared rows."""
    distance = _distances(a, p)
    distance.fill_diagonal_(float("inf"))
    return distance.argmin(dim=1), distance.isnan().any(dim=1)


def hardest_negatives(anchor: torch.Tensor, positive: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(B,) index j != i of the positive closest to anchor i."""
    return _nearest(*prepared(anchor.detach(), positive.detach(), normalize))[0]


def triplet_losses(a: torch.Tensor, p: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    """(B,) max(0, margin + |a_i - p_i| - |a_i - p_{n_i}|) from the rows themselves, for every
    backend (they differ in how they find ``negatives``)."""
    positive_distance = (a - p).norm(dim=-1)
    negative_distance = (a - p.index_select(0, negatives)).norm(dim=-1)
    return F.relu(margin + positive_distance - negative_distance)


def triplet_margin_loss(anchor: torch.Tensor, positive: torch.Tensor, *, margin: float = 0.2, normalize: bool = True,
                        reduction: str = "mean") -> torch.Tensor:
    """L_i = max(0, margin + |a_i - p_i| - min_{j != i} |a_i - p_j|), every distance materialized.

    The minimum's gradient reaches only its argmin, so the loss is differentiated through the
    two distances of each row recomputed from the rows (differentiable to every order; torch's
    ``cdist`` has no second derivative)."""
    a, p = prepared(anchor, positive, normalize)
    nearest, row_nan = _nearest(a, p)  # a NaN anywhere in a row makes its minimum NaN (argmin may point elsewhere)
    losses = triplet_losses(a, p, nearest, margin)
    losses = torch.where(row_nan, torch.full_like(losses, float("nan")), losses)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.mean()
