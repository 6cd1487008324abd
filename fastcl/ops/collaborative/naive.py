"""Reference collaborative contrastive loss (CCN, Gao et al. 2024; a documented
reconstruction, see :mod:`fastcl.ops.collaborative`): materializes the (P, L, L) logits.

Per page p with items e_pl (valid where ``mask``), click flags c_pl and optional trigger t_p:

    z_pl = e_pl * t_p (Hadamard, when a trigger is given), then z / max(|z|, eps) if normalize
    s_ab = z_a . z_b / tau                                   (a != b, both valid, same page)
    P_a  = {b != a valid : c_b == c_a}       (co-click and co-non-click pairs attract)
    L_a  = log sum_{b != a valid} exp(s_ab) - (1 / |P_a|) sum_{b in P_a} s_ab
           (mono-click pairs, c_b != c_a, only sit in the denominator: they repel)

Anchors with |P_a| = 0 (alone in their page or in their click outcome) contribute nothing.
"mean" averages over the anchors that contribute (0 when none does).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def page_logsumexp(logits: torch.Tensor, clicks: torch.Tensor, mask: torch.Tensor):
    """The pair sets and the denominator of each anchor, from the (P, L, L) ``logits``:
    ``(candidate, positive, num_positive, contributes, masked, lse)`` where ``candidate`` (P, L, L)
    marks the valid pairs b != a, ``positive`` those with c_b == c_a, ``contributes`` (P, L) the
    anchors with a positive, ``masked`` the logits with the other pairs at -inf and
    ``lse = logsumexp(masked)``. Shared with the hand-written gradient of :mod:`.chunked`."""
    length = logits.shape[-1]
    eye = torch.eye(length, dtype=torch.bool, device=logits.device)
    candidate = mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye
    positive = candidate & (clicks.unsqueeze(2) == clicks.unsqueeze(1))
    num_positive = positive.sum(-1)
    contributes = num_positive > 0
    # rows without a positive are dropped; give them a harmless row so no NaN gradient leaks
    masked = logits.masked_fill(~candidate, float("-inf")).masked_fill(~contributes.unsqueeze(-1), 0.0)
    lse = torch.logsumexp(masked, dim=-1)
    return candidate, positive, num_positive, contributes, masked, lse


def anchor_losses(items: torch.Tensor, clicks: torch.Tensor, mask: torch.Tensor, trigger: Optional[torch.Tensor],
                  temperature: float, normalize: bool) -> torch.Tensor:
    """(P, L) per-anchor losses (0 where the anchor contributes nothing), differentiable."""
    dtype = torch.float64 if items.dtype == torch.float64 else torch.float32
    z = items.to(dtype)
    if trigger is not None:
        z = z * trigger.to(dtype).unsqueeze(1)
    if normalize:
        z = F.normalize(z, dim=-1, eps=NORM_EPS)
    logits = z @ z.transpose(1, 2) / temperature  # (P, L, L)
    _, positive, num_positive, contributes, _, lse = page_logsumexp(logits, clicks, mask)
    positive_mean = (logits * positive).sum(-1) / num_positive.clamp_min(1)
    return torch.where(contributes, lse - positive_mean, torch.zeros_like(lse))


def collaborative_contrastive_loss(items: torch.Tensor, clicks: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                                   trigger: Optional[torch.Tensor] = None, temperature: float = 0.1,
                                   normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    if mask is None:
        mask = torch.ones(items.shape[:2], dtype=torch.bool, device=items.device)
    losses = anchor_losses(items, clicks, mask.bool(), trigger, temperature, normalize)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    same = clicks.unsqueeze(2) == clicks.unsqueeze(1)
    pairs = mask.bool().unsqueeze(2) & mask.bool().unsqueeze(1) & same
    count = ((pairs.sum(-1) - 1) > 0) & mask.bool()
    total = count.sum()
    return losses.sum() / total if int(total) > 0 else losses.sum() * 0.0
