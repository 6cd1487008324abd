"""The collaborative contrastive loss registered as a ``torch.library`` custom op (every
backend), so ``torch.compile(fullgraph=True)`` traces through it.

``fastcl::collaborative_forward`` returns the per-anchor losses (P, L), ``total`` =
sum_a weights_a losses_a, and, when asked, the gradients of ``total`` wrt (items, trigger),
computed in the same pass. For "mean"/"sum" the weights are the reduction's, so backward only
scales the saved gradients; for "none" (and a forward run without gradients) backward runs the
op again with the incoming per-anchor gradient as the weights.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._tracing import lazy_dynamo_disable
from ..common.gradients import compute_dtype, no_tensor
from . import chunked


def _implementation(backend: str, items: Tensor):
    if backend == "triton" and items.dtype != torch.float64:
        from .triton import triton_pages

        return triton_pages
    if backend == "cpu":
        from .native import native_pages

        return native_pages
    return chunked.torch_pages


@torch.library.custom_op("fastcl::collaborative_forward", mutates_args=())
def collaborative_forward(items: Tensor, clicks: Tensor, mask: Tensor, trigger: Optional[Tensor], weights: Tensor,
                          temperature: float, normalize: bool, backend: str,
                          compute_grads: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    losses, d_items, d_trigger = _implementation(backend, items)(items, clicks, mask, trigger, weights, temperature,
                                                                 normalize, compute_grads)
    total = (losses * weights.to(losses.dtype)).sum()
    if d_items is None:
        d_items = no_tensor(items)
    if d_trigger is None:
        d_trigger = no_tensor(items)
    return losses, total, d_items, d_trigger


@collaborative_forward.register_fake
def _(items, clicks, mask, trigger, weights, temperature, normalize, backend, compute_grads):
    dtype = compute_dtype(items)
    losses = items.new_empty(items.shape[:2], dtype=dtype)
    total = items.new_empty((), dtype=dtype)
    d_items = torch.empty_like(items) if compute_grads else no_tensor(items)
    d_trigger = torch.empty_like(trigger) if compute_grads and trigger is not None else no_tensor(items)
    return losses, total, d_items, d_trigger


def _setup_context(ctx, inputs, output):
    items, clicks, mask, trigger, weights, temperature, normalize, backend, compute_grads = inputs
    ctx.options = (temperature, normalize, backend)
    ctx.fused = compute_grads
    ctx.has_trigger = trigger is not None
    ctx.set_materialize_grads(False)  # an output nobody used gets None, not zeros (no extra pass)
    saved = [items, clicks, mask, trigger if trigger is not None else no_tensor(items), weights]
    if compute_grads:
        saved += [output[2], output[3]]
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_losses, grad_total, *_unused):
    saved = ctx.saved_tensors
    items, clicks, mask, trigger, weights = saved[:5]
    trigger = trigger if ctx.has_trigger else None
    d_items = d_trigger = None
    rerun_weights = grad_losses
    if grad_total is not None:
        if ctx.fused:  # the gradients of total were computed in the forward pass: scale them
            scale = grad_total.reshape(())
            d_items = saved[5] * scale.to(saved[5].dtype)
            d_trigger = saved[6] * scale.to(saved[6].dtype) if trigger is not None else None
        else:
            total_weights = weights * grad_total.reshape(()).to(weights.dtype)
            rerun_weights = total_weights if rerun_weights is None else rerun_weights + total_weights
    if rerun_weights is not None:
        # per-anchor upstream gradient ("none"), or a forward without gradients: one more pass
        _, _, extra_items, extra_trigger = torch.ops.fastcl.collaborative_forward(
            items, clicks, mask, trigger, rerun_weights, *ctx.options, True)
        d_items = extra_items if d_items is None else d_items + extra_items
        if trigger is not None:
            d_trigger = extra_trigger if d_trigger is None else d_trigger + extra_trigger
    return d_items, None, None, d_trigger, None, None, None, None, None


collaborative_forward.register_autograd(_backward, setup_context=_setup_context)


def collaborative_op(items: Tensor, clicks: Tensor, mask: Tensor, trigger: Optional[Tensor], weights: Tensor,
                     temperature: float, normalize: bool, backend: str, fused_weights: bool):
    """(losses (P, L), total); gradients in the forward pass when they will be needed and the
    weights are the final ones (``fused_weights``)."""
    needs_grad = torch.is_grad_enabled() and (items.requires_grad or (trigger is not None and trigger.requires_grad))
    losses, total, _, _ = torch.ops.fastcl.collaborative_forward(items, clicks, mask, trigger, weights, temperature,
                                                                  normalize, backend, needs_grad and fused_weights)
    return losses, total


lazy_dynamo_disable(collaborative_forward)  # an eager call must not import torch._dynamo
