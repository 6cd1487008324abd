"""Reference Collaborative Metric Learning loss (Hsieh et al., WWW'17), as the authors' code
computes it: every sampled negative's difference to the user is materialized, (B, W, D).

    d(u, x) = |u - x|^2
    h_i     = m + d(u_i, p_i) - min_k d(u_i, n_ik)
    M_i     = #{k : m + d(u_i, p_i) - d(u_i, n_ik) > 0}          (impostors among the W sampled)
    w_i     = log(1 + M_i * J / W)                               (rank weight; 1 without it)
    L_i     = w_i * max(h_i, 0)

Computed in float32 (float64 for float64 inputs); autograd gives every gradient.
"""
from __future__ import annotations

from typing import Optional

import torch


def cml_loss(users: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor] = None, *,
             negative_indices: Optional[torch.Tensor] = None, item_table: Optional[torch.Tensor] = None,
             margin: float = 1.9, num_items: Optional[int] = None, rank_weight: bool = True,
             reduction: str = "mean") -> torch.Tensor:
    dtype = torch.float64 if users.dtype == torch.float64 else torch.float32
    if negatives is None:
        negatives = item_table[negative_indices]  # (B, W, D): the gather the fused op avoids
        if num_items is None:
            num_items = item_table.shape[0]
    users, positives, negatives = users.to(dtype), positives.to(dtype), negatives.to(dtype)
    window = negatives.shape[1]
    positive_distance = ((users - positives) ** 2).sum(-1)
    negative_distance = ((users.unsqueeze(1) - negatives) ** 2).sum(-1)  # (B, W)
    closest = negative_distance.min(dim=1).values
    loss = torch.relu(margin + positive_distance - closest)
    if rank_weight:
        with torch.no_grad():
            impostors = ((margin + positive_distance.unsqueeze(1) - negative_distance) > 0).sum(1).to(dtype)
            items = window if num_items is None else num_items
            weight = torch.log1p(impostors * (items / window))
        loss = loss * weight
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def covariance_loss(*embeddings: torch.Tensor) -> torch.Tensor:
    """Reference covariance regularizer: squared off-diagonal entries of the covariance of the
    rows of ``cat(embeddings)``, summed, over the number of rows."""
    x = torch.cat([e.reshape(-1, e.shape[-1]) for e in embeddings]).double()
    rows = x.shape[0]
    centered = x - x.mean(0)
    covariance = centered.T @ centered / rows
    off_diagonal = covariance - torch.diag(torch.diag(covariance))
    return (off_diagonal ** 2).sum() / rows


__all__ = ["cml_loss", "covariance_loss"]
