"""Latent-attention pooling's autograd glue: the chunked forward and its recomputing backward
(:mod:`.chunked`) as one ``torch.autograd.Function``, with the elementwise kernels of the chosen
backend.

Unlike the other ops this is not a ``torch.library`` custom op: which tokens are pooled
(``pool_mask != 0``) sets the size of the saved state, a data-dependent shape that a custom op's
fake implementation cannot give without unbacked symbolic sizes.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .chunked import ElementwiseKernels, chunked_backward, chunked_forward


class LatentAttentionFunction(torch.autograd.Function):
    """Masked-mean latent-attention pooling (before the optional L2 norm) with a chunked backward.

    ``forward(hidden_states, pool_mask, num_heads, eps, kernels, *params) -> (B, d)`` float32
    pooled states cast to the input dtype; gradients for the hidden states and every parameter.
    """

    @staticmethod
    def forward(ctx, hidden_states, pool_mask, num_heads, eps, kernels: ElementwiseKernels, *params):
        pooled, saved, chunk = chunked_forward(hidden_states, pool_mask, num_heads, eps, kernels, params)
        ctx.save_for_backward(hidden_states, *params, *saved)
        ctx.setup = (num_heads, eps, kernels, chunk, len(params))
        return pooled

    @staticmethod
    @once_differentiable  # no second-order gradients: a clear error under create_graph, never a silent zero
    def backward(ctx, grad_pooled):
        num_heads, eps, kernels, chunk, num_params = ctx.setup
        hidden_states, *rest = ctx.saved_tensors
        params, saved = rest[:num_params], rest[num_params:]
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[5:])
        grad_hidden, param_grads = chunked_backward(grad_pooled, hidden_states, params, saved, num_heads, eps,
                                                    kernels, chunk, needs)
        return (grad_hidden, None, None, None, None, *param_grads)
