"""What every op's autograd glue shares: the compute dtype, the fused-gradient hand-over of the
custom ops (gradients computed in the forward pass, scaled in the backward), the placeholders a
custom op returns, and the reference gradients with a graph that double backward uses."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..._tracing import plain_eager


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def scale_gradients(grads, grad_output: torch.Tensor):
    """The gradients of a unit scalar loss times dL_total/dloss (None stays None)."""
    scale = grad_output.reshape(())
    return tuple(None if g is None else g * scale.to(device=g.device, dtype=g.dtype) for g in grads)


def keep_fused_gradients(ctx, saved: list, gradients, fused: bool) -> list:
    """Hold the gradients a custom op computed in its forward pass (``fused``; else there are
    none) for its backward; returns what to ``save_for_backward``.

    In eager mode they live on ctx (as ``.data``, with their own version counter), not in
    ``save_for_backward``: the first backward hands them to autograd, which may make them the
    leaves' ``.grad``, and ctx then drops them (:func:`take_fused_gradients`), so a later
    in-place edit of ``.grad`` (clipping between two retained backwards) cannot invalidate the
    node. Tracers get them as saved tensors, appended to ``saved``.
    """
    ctx.fused_grads = None
    if not fused:
        return saved
    if plain_eager(*gradients):
        ctx.fused_grads = [g.data for g in gradients]
        return saved
    return saved + list(gradients)


def take_fused_gradients(ctx, grad_output: torch.Tensor):
    """The gradients :func:`keep_fused_gradients` held, times dL_total/dloss, or None when there
    are none (already taken: a second backward through the node recomputes them). Scaled in
    place: no second copy (at B = 65536, D = 256 that is 128 MB)."""
    if ctx.fused_grads is None:
        return None
    grads, ctx.fused_grads = ctx.fused_grads, None
    scale = grad_output.reshape(())
    for g in grads:
        g.mul_(scale.to(device=g.device, dtype=g.dtype))
    return grads


def no_tensor(like: torch.Tensor) -> torch.Tensor:
    """The empty tensor a custom op returns in place of a gradient it did not compute."""
    return like.new_empty((0,))


def scalar_tensor(value, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A Python number as a 0-d float64 tensor (float64 holds it exactly; float32 would round
    it), a tensor as it is: what the custom ops take for temperature, scale and bias. With meta
    inputs (``like``) the number goes to the meta device too: the op then only propagates shapes."""
    if isinstance(value, torch.Tensor):
        return value
    device = "meta" if like is not None and like.device.type == "meta" else None
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def reference_gradients(loss_of, inputs: Sequence[Optional[torch.Tensor]], grad_loss: torch.Tensor) -> List:
    """d(grad_loss . loss_of(*inputs))/d(input) for each input that requires grad, with a graph.

    Each input is replaced by a fresh alias first, so an input passed twice (``nt_xent`` gives
    the same views as query and key) gets its two partial gradients, not its total twice.
    """
    wanted = [t is not None and t.requires_grad for t in inputs]
    aliases = [t.view_as(t) if w else t for t, w in zip(inputs, wanted)]
    targets = [a for a, w in zip(aliases, wanted) if w]
    if not targets:
        return [None] * len(inputs)
    with torch.enable_grad():
        loss = loss_of(*aliases)
        grads = iter(torch.autograd.grad(loss, targets, grad_loss, create_graph=True, allow_unused=True))
    result = []
    for alias, w in zip(aliases, wanted):
        if not w:
            result.append(None)
            continue
        g = next(grads)
        result.append(torch.zeros_like(alias) if g is None else g)
    return result
