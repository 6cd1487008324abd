"""Chunked SigLIP loss: elementwise over B x B, so row blocks need no log-sum-exp.

L = -(1/B) sum_ij log sigmoid(y_ij z_ij), z_ij = t x_i.y_j + b, y = +1 on the diagonal, -1
elsewhere. dL/dz_ij = -(1/B) y_ij sigmoid(-y_ij z_ij). The gradients are computed during the
forward pass (inputs need grad) and only scaled in backward (see :mod:`.op`).
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


def chunked_siglip(image_features, text_features, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                   compute_grads: bool):
    """(loss, (d_image, d_text, d_scale, d_bias) or None) on the chunked PyTorch path."""
    dtype = compute_dtype(image_features)
    with torch.no_grad():
        image = image_features.to(dtype)
        text = text_features.to(dtype)
        scale, bias = float(logit_scale.reshape(())), float(logit_bias.reshape(()))
        loss, d_image, d_text, d_scale, d_bias = siglip_blocks(image, text, scale, bias, compute_grads)
    if not compute_grads:
        return loss, None
    return loss, (d_image.to(image_features.dtype), d_text.to(text_features.dtype), d_scale, d_bias)
