"""Triton kernel for the collaborative contrastive loss: one program per page, the page's
(L, D) items and (L, L) logits on chip (BLOCK_L >= L, BLOCK_D >= D: pages are short), loss
and gradients in the same pass (see :mod:`.chunked` for the contract). Meant for page lengths
up to a few hundred; longer pages take the chunked path on the GPU (``backend="torch"``)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.gradients import compute_dtype
from .naive import NORM_EPS


@triton.jit
def collaborative_page_kernel(
    items_ptr, clicks_ptr, mask_ptr, trigger_ptr, weights_ptr, losses_ptr, d_items_ptr, d_trigger_ptr,
    length, dim, inv_tau, eps,
    HAS_TRIGGER: tl.constexpr, NORMALIZE: tl.constexpr, WITH_GRAD: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    page = tl.program_id(0).to(tl.int64)
    positions = tl.arange(0, BLOCK_L)
    features = tl.arange(0, BLOCK_D)
    in_page = positions < length
    valid = (tl.load(mask_ptr + page * length + positions, mask=in_page, other=0) != 0) & in_page
    labels = tl.load(clicks_ptr + page * length + positions, mask=in_page, other=-1)
    feature_valid = features < dim
    tile = valid[:, None] & feature_valid[None, :]
    offsets = (page * length + positions)[:, None] * dim + features[None, :]
    e = tl.load(items_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
    z = e
    if HAS_TRIGGER:
        t = tl.load(trigger_ptr + page * dim + features, mask=feature_valid, other=0.0).to(tl.float32)
        z = e * t[None, :]
    inv_norm = tl.full((BLOCK_L,), 1.0, dtype=tl.float32)
    norm = tl.sqrt(tl.sum(z * z, axis=1))
    if NORMALIZE:
        inv_norm = 1.0 / tl.maximum(norm, eps)
        z = z * inv_norm[:, None]
    logits = tl.dot(z, tl.trans(z), input_precision="ieee") * inv_tau
    candidate = valid[:, None] & valid[None, :] & (positions[:, None] != positions[None, :])
    positive = candidate & (labels[:, None] == labels[None, :])
    num_positive = tl.sum(positive.to(tl.float32), axis=1)
    contributes = num_positive > 0
    masked = tl.where(candidate, logits, float("-inf"))
    top = tl.max(masked, axis=1)
    top = tl.where(contributes, top, 0.0)
    exps = tl.where(candidate, tl.exp(masked - top[:, None]), 0.0)
    total = tl.sum(exps, axis=1)
    lse = top + tl.log(tl.where(contributes, total, 1.0))
    inv_positive = 1.0 / tl.maximum(num_positive, 1.0)
    positive_mean = tl.sum(tl.where(positive, logits, 0.0), axis=1) * inv_positive
    loss = tl.where(contributes, lse - positive_mean, 0.0)
    tl.store(losses_ptr + page * length + positions, loss, mask=in_page)
    if WITH_GRAD:
        w = tl.load(weights_ptr + page * length + positions, mask=in_page, other=0.0).to(tl.float32)
        w = tl.where(contributes, w, 0.0)
        softmax = exps / tl.where(contributes, total, 1.0)[:, None]
        grad = w[:, None] * (softmax - tl.where(positive, inv_positive[:, None], 0.0))
        grad = tl.where(candidate, grad, 0.0)
        grad_z = tl.dot(grad + tl.trans(grad), z, input_precision="ieee") * inv_tau
        if NORMALIZE:
            radial = tl.where(norm > eps, tl.sum(z * grad_z, axis=1), 0.0)
            grad_z = (grad_z - z * radial[:, None]) * inv_norm[:, None]
        d_e = grad_z
        if HAS_TRIGGER:
            d_e = grad_z * t[None, :]
            d_t = tl.sum(tl.where(tile, grad_z * e, 0.0), axis=0)
            tl.store(d_trigger_ptr + page * dim + features, d_t, mask=feature_valid)
        tl.store(d_items_ptr + offsets, tl.where(tile, d_e, 0.0), mask=in_page[:, None] & feature_valid[None, :])


def triton_pages(items, clicks, mask, trigger, weights, temperature: float, normalize: bool, compute_grads: bool):
    pages, length, dim = items.shape
    device = items.device
    e = items.detach().contiguous()
    t = trigger.detach().contiguous() if trigger is not None else e
    labels = clicks.to(torch.int64).contiguous()
    valid = mask.to(torch.int8).contiguous()
    w = weights.to(torch.float32).contiguous()
    losses = torch.empty(pages, length, dtype=torch.float32, device=device)
    d_items = torch.empty(pages, length, dim, dtype=torch.float32, device=device) if compute_grads else losses
    d_trigger = torch.empty(pages, dim, dtype=torch.float32, device=device) if compute_grads and trigger is not None else losses
    collaborative_page_kernel[(pages,)](
        e, labels, valid, t, w, losses, d_items, d_trigger, length, dim, 1.0 / temperature, NORM_EPS,
        HAS_TRIGGER=trigger is not None, NORMALIZE=normalize, WITH_GRAD=compute_grads,
        BLOCK_L=max(16, triton.next_power_of_2(length)), BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )
    losses = losses.to(compute_dtype(items))
    if not compute_grads:
        return losses, None, None
    return losses, d_items.to(items.dtype), (d_trigger.to(trigger.dtype) if trigger is not None else None)
