"""Gradients that are themselves differentiable, for ``create_graph=True`` (double backward).

The fused paths compute first-order gradients outside autograd, so their gradients have no
graph of their own. When autograd asks for a graph (``torch.autograd.grad(...,
create_graph=True)``: gradient penalties, Hessian-vector products), the op's backward instead
recomputes the loss through the reference maths (``naive.py``) under autograd and
differentiates that with ``create_graph=True``. This is exact to all orders, but it
materializes the B x N logits for that call (O(B*N) memory, as the plain PyTorch loss would):
a differentiable graph of the logits is what a second derivative needs.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import naive
from .options import InfoNCEOptions


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


def differentiable_gradients(inputs, positive, labels, key_labels, grad_loss: torch.Tensor,
                             options: InfoNCEOptions) -> List:
    """Gradients wrt (query, key, hard_negatives, temperature) with a graph (None where not needed)."""

    def loss_of(query, key, hard_negatives, temperature):
        return naive.info_nce_with_options(query, key, positive, hard_negatives, temperature, labels, key_labels, options)

    return reference_gradients(loss_of, inputs, grad_loss)
