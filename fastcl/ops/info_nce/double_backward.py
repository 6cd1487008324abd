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

from typing import List

import torch

from ..common.gradients import reference_gradients
from . import naive
from .options import InfoNCEOptions


def differentiable_gradients(inputs, positive, labels, key_labels, grad_loss: torch.Tensor,
                             options: InfoNCEOptions) -> List:
    """Gradients wrt (query, key, hard_negatives, temperature) with a graph (None where not needed)."""

    def loss_of(query, key, hard_negatives, temperature):
        return naive.info_nce_with_options(query, key, positive, hard_negatives, temperature, labels, key_labels, options)

    return reference_gradients(loss_of, inputs, grad_loss)
