"""Chunked SigLIP loss: elementwise over B x B, so row blocks need no log-sum-exp.

L = -(1/B) sum_ij log sigmoid(y_ij z_ij), z_ij = t x_i.y_j + b, y = +1 on the diagonal, -1
elsewhere. dL/dz_ij = -(1/B) y_ij sigmoid(-y_ij z_ij). The gradients are computed during the
forward pass (inputs need grad) and only scaled in backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..info_nce.chunked import block_rows_for
from ..info_nce.function import compute_dtype


def siglip_blocks(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float, with_grad: bool):
    """(loss, d_image, d_text, d_scale, d_bias) in the compute dtype (grads None without with_grad)."""
    batch = image.shape[0]
    step = min(batch, block_rows_for(batch, image.element_size()))
    buffer = torch.empty(step, batch, dtype=image.dtype, device=image.device)
    total = torch.zeros((), dtype=image.dtype, device=image.device)
    d_image = torch.empty_like(image) if with_grad else None
    d_text = torch.zeros_like(text) if with_grad else None
    d_scale = torch.zeros((), dtype=image.dtype, device=image.device)
    d_bias = torch.zeros((), dtype=image.dtype, device=image.device)
    for row0 in range(0, batch, step):
        row1 = min(batch, row0 + step)
        raw = buffer[: row1 - row0]
        torch.mm(image[row0:row1], text.T, out=raw)
        logits = raw * scale + bias
        diagonal = torch.arange(row0, row1, device=image.device)
        local = torch.arange(row1 - row0, device=image.device)
        # signs: -1 everywhere, +1 on the diagonal
        signed = -logits
        signed[local, diagonal] = logits[local, diagonal]
        total += F.softplus(-signed).sum()
        if with_grad:
            grad = torch.sigmoid(-signed)  # dl/d(signed) = -sigmoid(-signed); dz = sign * that
            grad[local, diagonal] = -grad[local, diagonal]
            grad /= batch  # now dL/dz_ij
            d_bias += grad.sum()
            d_scale += (grad * raw).sum()
            grad *= scale  # dL/draw
            torch.mm(grad, text, out=d_image[row0:row1])
            d_text.addmm_(grad.T, image[row0:row1])
    return total / batch, d_image, d_text, d_scale, d_bias


class SigLipFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, logit_bias):
        dtype = compute_dtype(image_features)
        image = image_features.to(dtype)
        text = text_features.to(dtype)
        scale = float(logit_scale) if not isinstance(logit_scale, torch.Tensor) else float(logit_scale.detach().reshape(()))
        bias = float(logit_bias) if not isinstance(logit_bias, torch.Tensor) else float(logit_bias.detach().reshape(()))
        with_grad = any(ctx.needs_input_grad)
        loss, d_image, d_text, d_scale, d_bias = siglip_blocks(image, text, scale, bias, with_grad)
        if with_grad:
            grads = [d_image.to(image_features.dtype), d_text.to(text_features.dtype)]
            for value, grad in ((logit_scale, d_scale), (logit_bias, d_bias)):
                grads.append(grad.to(device=value.device, dtype=value.dtype).reshape(value.shape)
                             if isinstance(value, torch.Tensor) else None)
            ctx.saved_grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output.reshape(())
        grads = [None if g is None else g * scale.to(device=g.device, dtype=g.dtype) for g in ctx.saved_grads]
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))
