"""The collaborative contrastive loss over blocks of pages in PyTorch (the (pages, L, L) logits of
one block at a time, gradients written out by hand); the native CPU kernel is :mod:`.native`.

Every implementation here has the contract of the ``fastcl::collaborative_forward`` body:
``(losses (P, L), d_items or None, d_trigger or None)`` where the gradients are those of
``sum_a weights_a * losses_a``, computed in the same pass as the loss.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..common.blocks import block_rows_for
from ..common.gradients import compute_dtype
from ..common.checks import checking_values
from .naive import NORM_EPS, page_logsumexp

# bytes of (pages, L, L) logits one PyTorch block may hold (the reference maths keeps a few)
BLOCK_BYTES = 64 << 20


def contributing_anchors(clicks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(P, L) bool: valid anchors with at least one other valid item of the same click label in
    their page (the anchors whose loss counts). Small non-negative labels (click flags) are
    counted per label, O(P * L * K); other labels pairwise, O(P * L * L) booleans."""
    labels = clicks.to(torch.int64)
    if clicks.dtype == torch.bool:
        num_labels = 2
    elif checking_values() and labels.numel() and int(labels.min()) >= 0 and int(labels.max()) < 64:
        num_labels = int(labels.max()) + 1
    else:  # other labels, or under torch.compile (no data-dependent sizes)
        num_labels = None
    if num_labels is not None:
        per_label = torch.zeros(labels.shape[0], num_labels, dtype=torch.int64, device=labels.device)
        per_label.scatter_add_(1, labels, mask.to(torch.int64))
        same = per_label.gather(1, labels)
    else:
        same = ((labels.unsqueeze(2) == labels.unsqueeze(1)) & mask.unsqueeze(1)).sum(-1)
    return mask & (same > 1)


def _block(items, clicks, mask, trigger, weights, temperature: float, normalize: bool, compute_grads: bool):
    """One block of pages in PyTorch ops: (losses, d_items, d_trigger), the gradients written
    out by hand (the same maths as the C++ kernel; autograd does not run inside a custom op)."""
    dtype = compute_dtype(items)
    e = items.to(dtype)
    t = trigger.to(dtype).unsqueeze(1) if trigger is not None else None
    z = e * t if t is not None else e
    norm = z.norm(dim=-1, keepdim=True)
    inv_norm = 1.0 / norm.clamp_min(NORM_EPS)
    if normalize:
        z = z * inv_norm
    logits = z @ z.transpose(1, 2) / temperature
    candidate, positive, num_positive, contributes, masked, lse = page_logsumexp(logits, clicks, mask)
    inv_positive = 1.0 / num_positive.clamp_min(1).to(dtype)
    positive_mean = logits.masked_fill(~positive, 0.0).sum(-1) * inv_positive
    losses = torch.where(contributes, lse - positive_mean, torch.zeros_like(lse))
    if not compute_grads:
        return losses, None, None
    weight = torch.where(contributes, weights.to(dtype), torch.zeros_like(lse))
    grad = torch.exp(masked - lse.unsqueeze(-1)).masked_fill_(~candidate, 0.0)  # softmax
    grad = torch.where(positive, grad - inv_positive.unsqueeze(-1), grad).mul_(weight.unsqueeze(-1))
    grad_z = (grad + grad.transpose(1, 2)) @ z / temperature
    if normalize:
        radial = (z * grad_z).sum(-1, keepdim=True) * (norm > NORM_EPS)
        grad_z = (grad_z - z * radial) * inv_norm
    d_items = grad_z * t if t is not None else grad_z
    d_trigger = (grad_z * e).sum(1) if t is not None else None
    return losses, d_items, d_trigger


def torch_pages(items, clicks, mask, trigger: Optional[torch.Tensor], weights, temperature: float, normalize: bool,
                compute_grads: bool):
    pages, length, _ = items.shape
    step = min(pages, block_rows_for(length * length, 6 * 4, BLOCK_BYTES))
    losses = torch.empty(pages, length, dtype=compute_dtype(items), device=items.device)
    d_items = torch.empty_like(items) if compute_grads else None
    d_trigger = torch.empty_like(trigger) if compute_grads and trigger is not None else None
    for page0 in range(0, pages, step):
        page1 = min(pages, page0 + step)
        block_trigger = trigger[page0:page1] if trigger is not None else None
        block_losses, block_d_items, block_d_trigger = _block(
            items[page0:page1], clicks[page0:page1], mask[page0:page1], block_trigger, weights[page0:page1],
            temperature, normalize, compute_grads)
        losses[page0:page1] = block_losses
        if compute_grads:
            d_items[page0:page1] = block_d_items
            if trigger is not None:
                d_trigger[page0:page1] = block_d_trigger
    return losses, d_items, d_trigger
