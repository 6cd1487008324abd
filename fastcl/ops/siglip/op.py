"""SigLIP registered as a ``torch.library`` custom op (every backend), so
``torch.compile(fullgraph=True)`` traces through ``fastcl.siglip_loss`` without graph breaks.

``fastcl::siglip_forward`` returns the loss and, when asked, its gradients wrt (image, text,
logit_scale, logit_bias), computed in the same pass: the loss is elementwise over B x B, so
nothing has to be finished before the gradients. Autograd then only scales them.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

from ..._tracing import lazy_dynamo_disable, plain_eager
from ..common.gradients import reference_gradients
from ..common.gradients import (compute_dtype, keep_fused_gradients, no_tensor, scalar_tensor, scale_gradients,
                                 take_fused_gradients)
from . import chunked, naive
from .chunked import chunked_siglip


@torch.library.custom_op("fastcl::siglip_forward", mutates_args=())
def siglip_forward(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                   backend: str, compute_grads: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton" and image_features.dtype != torch.float64:
        from .triton import triton_siglip as implementation
    elif backend == "cpu":  # the chunked driver with the native block kernel
        from .native import native_siglip_rows

        implementation = functools.partial(chunked_siglip, block_kernel=native_siglip_rows)
    else:  # "torch", and float64 on the GPU backends
        implementation = chunked_siglip
    loss, grads = implementation(image_features, text_features, logit_scale, logit_bias, compute_grads)
    if grads is None:
        return loss, no_tensor(image_features), no_tensor(text_features), no_tensor(logit_scale), no_tensor(logit_bias)
    d_image, d_text, d_scale, d_bias = grads
    # the scalar gradients in the scalars' own dtype / device / shape
    d_scale = d_scale.to(device=logit_scale.device, dtype=logit_scale.dtype).reshape(logit_scale.shape)
    d_bias = d_bias.to(device=logit_bias.device, dtype=logit_bias.dtype).reshape(logit_bias.shape)
    return loss, d_image, d_text, d_scale, d_bias


@siglip_forward.register_fake
def _(image_features, text_features, logit_scale, logit_bias, backend, compute_grads):
    loss = image_features.new_empty((), dtype=compute_dtype(image_features))
    if not compute_grads:
        return loss, no_tensor(image_features), no_tensor(text_features), no_tensor(logit_scale), no_tensor(logit_bias)
    return (loss, torch.empty_like(image_features), torch.empty_like(text_features), torch.empty_like(logit_scale),
            torch.empty_like(logit_bias))


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[4]
    ctx.fused = inputs[5]
    saved = keep_fused_gradients(ctx, list(inputs[:4]), output[1:], ctx.fused)
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_loss, *_unused_grads_of_gradients):
    saved = ctx.saved_tensors
    inputs = saved[:4]
    if torch.is_grad_enabled() and plain_eager(grad_loss):
        # create_graph=True: differentiable gradients (double backward), through the reference maths
        return (*reference_gradients(naive.siglip_loss, inputs, grad_loss), None, None)
    grads = take_fused_gradients(ctx, grad_loss)
    if grads is not None:
        return (*grads, None, None)
    if ctx.fused and len(saved) > 4:
        grads = saved[4:]
    else:  # a second backward, or the forward ran without gradients: one more pass
        grads = torch.ops.fastcl.siglip_forward(*inputs, ctx.backend, True)[1:]
    return (*scale_gradients(grads, grad_loss), None, None)


siglip_forward.register_autograd(_backward, setup_context=_setup_context)
lazy_dynamo_disable(siglip_forward)


def siglip_op(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, backend: str) -> Tensor:
    """Run the registered op; gradients are computed in the forward pass when they will be needed."""
    logit_scale, logit_bias = scalar_tensor(logit_scale, like=image_features), scalar_tensor(logit_bias, like=image_features)
    compute_grads = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image_features, text_features, logit_scale, logit_bias))
    return torch.ops.fastcl.siglip_forward(image_features, text_features, logit_scale, logit_bias, backend,
                                           compute_grads)[0]
