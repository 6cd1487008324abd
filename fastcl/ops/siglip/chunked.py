"""Chunked SigLIP loss: elementwise over B x B, so row blocks need no log-sum-exp.

L = -(1/B) sum_ij log sigmoid(y_ij z_ij), z_ij = t x_i.y_j + b, y = +1 on the diagonal, -1
elsewhere. dL/dz_ij = -(1/B) y_ij sigmoid(-y_ij z_ij). The gradients are computed during the
forward pass (inputs need grad) and only scaled in backward (see :mod:`.op`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common.blocks import flush_tiny, similarity_blocks
from ..common.gradients import compute_dtype


def torch_siglip_rows(raw: torch.Tensor, row0: int, scale: float, bias: float, factor: float, with_grad: bool):
    """Block kernel in PyTorch ops: (sum of the block's loss terms, sum dz * raw, sum dz), with
    dz = dL/dz for L = factor * (sum of the terms). With ``with_grad`` it overwrites ``raw`` with
    dL/draw = scale * dz; without, the two sums are zero and ``raw`` is left unchanged."""
    rows = raw.shape[0]
    logits = raw * scale + bias
    diagonal = torch.arange(row0, row0 + rows, device=raw.device)
    local = torch.arange(rows, device=raw.device)
    # signs: -1 everywhere, +1 on the diagonal
    signed = -logits
    signed[local, diagonal] = logits[local, diagonal]
    loss = F.softplus(-signed).sum()
    zero = torch.zeros((), dtype=raw.dtype, device=raw.device)
    if not with_grad:
        return loss, zero, zero
    grad = flush_tiny(torch.sigmoid(-signed))  # dl/d(signed) = -sigmoid(-signed); dz = sign * that
    grad[local, diagonal] = -grad[local, diagonal]
    grad *= factor  # now dL/dz_ij
    d_bias = grad.sum()
    d_scale = (grad * raw).sum()
    torch.mul(grad, scale, out=raw)  # dL/draw
    return loss, d_scale, d_bias


def siglip_blocks(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float, with_grad: bool,
                  block_kernel=torch_siglip_rows):
    """(loss, d_image, d_text, d_scale, d_bias) in the compute dtype (grads None without with_grad)."""
    batch = image.shape[0]
    total = torch.zeros((), dtype=image.dtype, device=image.device)
    d_image = torch.empty_like(image) if with_grad else None
    d_text = torch.zeros_like(text) if with_grad else None
    d_scale = torch.zeros((), dtype=image.dtype, device=image.device)
    d_bias = torch.zeros((), dtype=image.dtype, device=image.device)
    for row0, row1, raw in similarity_blocks(image, text):
        block_loss, block_d_scale, block_d_bias = block_kernel(raw, row0, scale, bias, 1.0 / batch, with_grad)
        total += block_loss
        if with_grad:  # raw now holds dL/draw
            d_scale += block_d_scale
            d_bias += block_d_bias
            torch.mm(raw, text, out=d_image[row0:row1])
            d_text.addmm_(raw.T, image[row0:row1])
    return total / batch, d_image, d_text, d_scale, d_bias


def chunked_siglip(image_features, text_features, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                   compute_grads: bool, block_kernel=torch_siglip_rows):
    """(loss, (d_image, d_text, d_scale, d_bias) or None) on the chunked path, with the PyTorch
    or the native block kernel."""
    dtype = compute_dtype(image_features)
    with torch.no_grad():
        image = image_features.to(dtype)
        text = text_features.to(dtype)
        scale, bias = float(logit_scale.reshape(())), float(logit_bias.reshape(()))
        loss, d_image, d_text, d_scale, d_bias = siglip_blocks(image, text, scale, bias, compute_grads, block_kernel)
    if not compute_grads:
        return loss, None
    return loss, (d_image.to(image_features.dtype), d_text.to(text_features.dtype), d_scale, d_bias)
