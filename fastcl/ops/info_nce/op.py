"""InfoNCE registered as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)``
traces through ``fastcl.info_nce`` without graph breaks.

``fastcl::info_nce_forward`` returns the loss and, when asked, the gradients of the scalar loss
(computed during the forward pass); autograd then only scales them. ``fastcl::info_nce_backward``
recomputes the similarity blocks for a per-row loss (``reduction="none"``). Both take the
static options as plain arguments and dispatch on ``backend``: the chunked driver with the
PyTorch or the native CPU row kernel, or the Triton / native CUDA kernels (float64 inputs of
those two take the chunked PyTorch path). Every backend runs inside the same two ops, so a
compiled graph holds one opaque op whatever the device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._tracing import lazy_dynamo_disable, plain_eager
from .chunked import torch_row_kernel
from .double_backward import differentiable_gradients
from ..common.gradients import (compute_dtype, keep_fused_gradients, no_tensor, scalar_tensor, scale_gradients,
                                take_fused_gradients)
from .function import chunked_backward, chunked_forward
from .options import InfoNCEOptions


def _row_kernel(backend: str):
    if backend == "cpu":
        from .native import native_row_kernel

        return native_row_kernel
    return torch_row_kernel


def _implementation(backend: str, query: Tensor):
    """(forward, backward) with the signatures of ``chunked_forward`` / ``chunked_backward`` less the row kernel."""
    if backend in ("triton", "cuda") and query.dtype != torch.float64:
        from .gpu import gpu_implementation

        return gpu_implementation(backend)
    row_kernel = _row_kernel(backend)

    def forward(*args):
        return chunked_forward(*args[:-1], row_kernel, args[-1])

    def backward(*args):
        return chunked_backward(*args[:-1], row_kernel, args[-1])

    return forward, backward


def _loss_like(query: Tensor, reduction: str) -> Tensor:
    shape = (query.shape[0],) if reduction == "none" else ()
    return query.new_empty(shape, dtype=compute_dtype(query))


@torch.library.custom_op("fastcl::info_nce_forward", mutates_args=())
def info_nce_forward(
    query: Tensor, key: Tensor, hard_negatives: Optional[Tensor], temperature: Tensor,
    positive: Optional[Tensor], labels: Optional[Tensor], key_labels: Optional[Tensor],
    normalize: bool, symmetric: bool, exclude_self: bool, multi_positive: str, margin: Optional[float],
    label_smoothing: float, reduction: str, backend: str, compute_grads: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    options = InfoNCEOptions(normalize, symmetric, exclude_self, multi_positive, margin, label_smoothing, reduction)
    forward, _ = _implementation(backend, query)
    loss, grads = forward(query, key, hard_negatives, temperature, positive, labels, key_labels, options, compute_grads)
    if grads is None:
        return loss, no_tensor(query), no_tensor(key), no_tensor(query), no_tensor(temperature)
    grad_q, grad_k, grad_h, grad_t = grads
    return loss, grad_q, grad_k, grad_h if grad_h is not None else no_tensor(query), grad_t


@info_nce_forward.register_fake
def _(query, key, hard_negatives, temperature, positive, labels, key_labels, normalize, symmetric, exclude_self,
      multi_positive, margin, label_smoothing, reduction, backend, compute_grads):
    loss = _loss_like(query, reduction)
    if not compute_grads:
        return loss, no_tensor(query), no_tensor(key), no_tensor(query), no_tensor(temperature)
    grad_h = torch.empty_like(hard_negatives) if hard_negatives is not None else no_tensor(query)
    return loss, torch.empty_like(query), torch.empty_like(key), grad_h, torch.empty_like(temperature)


@torch.library.custom_op("fastcl::info_nce_backward", mutates_args=())
def info_nce_backward(
    query: Tensor, key: Tensor, hard_negatives: Optional[Tensor], temperature: Tensor,
    positive: Optional[Tensor], labels: Optional[Tensor], key_labels: Optional[Tensor], grad_output: Tensor,
    normalize: bool, symmetric: bool, exclude_self: bool, multi_positive: str, margin: Optional[float],
    label_smoothing: float, reduction: str, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    options = InfoNCEOptions(normalize, symmetric, exclude_self, multi_positive, margin, label_smoothing, reduction)
    _, backward = _implementation(backend, query)
    grad_q, grad_k, grad_h, grad_t = backward(query, key, hard_negatives, temperature, positive, labels, key_labels,
                                              options, grad_output)
    return grad_q, grad_k, grad_h if grad_h is not None else no_tensor(query), grad_t


@info_nce_backward.register_fake
def _(query, key, hard_negatives, temperature, positive, labels, key_labels, grad_output, normalize, symmetric,
      exclude_self, multi_positive, margin, label_smoothing, reduction, backend):
    grad_h = torch.empty_like(hard_negatives) if hard_negatives is not None else no_tensor(query)
    return torch.empty_like(query), torch.empty_like(key), grad_h, torch.empty_like(temperature)


def _setup_context(ctx, inputs, output):
    query, key, hard_negatives, temperature, positive, labels, key_labels = inputs[:7]
    ctx.static = inputs[7:15]
    ctx.fused = inputs[15]
    ctx.has_hard = hard_negatives is not None
    saved = [query, key, hard_negatives, temperature, positive, labels, key_labels]
    saved = keep_fused_gradients(ctx, saved, output[1:], ctx.fused)
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_loss, *_unused_grads_of_gradients):
    saved = ctx.saved_tensors
    query, key, hard_negatives, temperature, positive, labels, key_labels = saved[:7]
    if torch.is_grad_enabled() and plain_eager(grad_loss):
        # create_graph=True: gradients that are themselves differentiable (double backward)
        grads = differentiable_gradients(
            (query, key, hard_negatives, temperature), positive, labels, key_labels, grad_loss,
            InfoNCEOptions(*ctx.static[:7]))
    else:
        # the forward pass's gradients, scaled in place; a second backward through this node
        # (retain_graph=True) finds them taken and recomputes them
        grads = take_fused_gradients(ctx, grad_loss)
        if grads is None and ctx.fused and len(saved) > 7:
            grads = scale_gradients(saved[7:], grad_loss)
        elif grads is None:
            grads = info_nce_backward(query, key, hard_negatives, temperature, positive, labels, key_labels,
                                      grad_loss, *ctx.static)
    grads = list(grads)
    if not ctx.has_hard:
        grads[2] = None
    return (*grads, *([None] * 12))


info_nce_forward.register_autograd(_backward, setup_context=_setup_context)
lazy_dynamo_disable(info_nce_forward)
lazy_dynamo_disable(info_nce_backward)


def info_nce_op(query, key, hard_negatives, temperature, positive, labels, key_labels, options: InfoNCEOptions,
                backend: str) -> Tensor:
    """Run the registered op; gradients are computed in the forward pass when they will be needed."""
    temperature = scalar_tensor(temperature, like=query)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, hard_negatives, temperature))
    compute_grads = needs_grad and options.reduction != "none"
    result = torch.ops.fastcl.info_nce_forward(
        query, key, hard_negatives, temperature, positive, labels, key_labels,
        options.normalize, options.symmetric, options.exclude_self, options.multi_positive, options.margin,
        options.label_smoothing, options.reduction, backend, compute_grads,
    )
    return result[0]
