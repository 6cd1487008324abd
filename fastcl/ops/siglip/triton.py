"""Triton kernel for the SigLIP loss: one pass over the B x B tiles, loss and gradients together.

    z_ij = t x_i.y_j + b,  y_ij = +1 on the diagonal, -1 elsewhere
    L = (1/B) sum_ij softplus(-y_ij z_ij),   dL/dz_ij = -(1/B) y_ij sigmoid(-y_ij z_ij)

The loss is elementwise, so no normalizer is needed before the gradient: each program owns a
block of image rows, accumulates d(image) for them, adds d(text) with fp32 atomics, and writes
per-row partial sums for the loss, dt and db. ``backward()`` only scales the saved gradients.

Example::

    >>> loss = fastcl.siglip_loss(img.cuda(), txt.cuda(), 10.0, -10.0, backend="triton")
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import FORWARD_CONFIGS, configs, dot_settings, softplus, tile_similarity


@triton.autotune(configs=configs(FORWARD_CONFIGS), key=["dim", "WITH_GRAD"], reset_to_zero=["d_image_ptr", "d_text_ptr"])
@triton.jit
def siglip_fwd_kernel_rows(
    image_ptr, text_ptr, row_stats_ptr, d_image_ptr, d_text_ptr,
    batch, dim, logit_scale, logit_bias,
    WITH_GRAD: tl.constexpr, CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """row_stats (B, 3) fp32 = [sum_j softplus(-y z), sum_j dl/dz, sum_j dl/dz * raw] (dl = B dL);
    with WITH_GRAD, d_image / d_text (B, D) fp32 accumulate B * dL/dx, B * dL/dy."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < batch
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_bias = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    element = image_ptr.dtype.element_ty
    for n0 in range(0, batch, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # 64-bit offsets: N * D may pass 2^31
        col_valid = cols < batch
        raw = tile_similarity(image_ptr, text_ptr, rows, cols, row_valid, col_valid, dim,
                              CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        valid = row_valid[:, None] & col_valid[None, :]
        sign = tl.where(rows[:, None] == cols[None, :], 1.0, -1.0)
        signed = sign * (raw * logit_scale + logit_bias)
        loss += tl.sum(tl.where(valid, softplus(-signed), 0.0), axis=1)
        if WITH_GRAD:
            # per-pair gradient times B: in [-1, 1], safe to round to the input dtype
            grad = tl.where(valid, -sign * tl.sigmoid(-signed), 0.0)
            d_bias += tl.sum(grad, axis=1)
            d_scale += tl.sum(grad * raw, axis=1)
            grad_low = grad.to(element)
            if CAST_DOT:
                grad_low = grad_low.to(tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_valid = d < dim
                a_mask = row_valid[:, None] & d_valid[None, :]
                c_mask = col_valid[:, None] & d_valid[None, :]
                x = tl.load(image_ptr + rows[:, None] * dim + d[None, :], mask=a_mask, other=0.0)
                y = tl.load(text_ptr + cols[:, None] * dim + d[None, :], mask=c_mask, other=0.0)
                if CAST_DOT:
                    x = x.to(tl.float32)
                    y = y.to(tl.float32)
                x_ptrs = d_image_ptr + rows[:, None] * dim + d[None, :]
                d_x = tl.dot(grad_low, y, input_precision=DOT_PRECISION) * logit_scale
                tl.store(x_ptrs, tl.load(x_ptrs, mask=a_mask, other=0.0) + d_x, mask=a_mask)
                d_y = tl.dot(tl.trans(grad_low), x, input_precision=DOT_PRECISION) * logit_scale
                tl.atomic_add(d_text_ptr + cols[:, None] * dim + d[None, :], d_y, mask=c_mask)
    tl.store(row_stats_ptr + rows * 3, loss, mask=row_valid)
    tl.store(row_stats_ptr + rows * 3 + 1, d_bias, mask=row_valid)
    tl.store(row_stats_ptr + rows * 3 + 2, d_scale, mask=row_valid)


def triton_siglip(image_features, text_features, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                  compute_grads: bool):
    """(loss, (d_image, d_text, d_scale, d_bias) or None): one kernel pass, loss and gradients
    together. The body of the ``fastcl::siglip_forward`` custom op for ``backend="triton"``."""
    image = image_features.contiguous()
    text = text_features.contiguous()
    batch, dim = image.shape
    scale, bias = float(logit_scale.detach().reshape(())), float(logit_bias.detach().reshape(()))
    device = image.device
    row_stats = torch.empty(batch, 3, dtype=torch.float32, device=device)
    d_image = torch.zeros(batch, dim, dtype=torch.float32, device=device) if compute_grads else row_stats
    d_text = torch.zeros(batch, dim, dtype=torch.float32, device=device) if compute_grads else row_stats
    cast, precision = dot_settings(image)
    siglip_fwd_kernel_rows[lambda meta: (triton.cdiv(batch, meta["BLOCK_M"]),)](
        image, text, row_stats, d_image, d_text, batch, dim, scale, bias,
        WITH_GRAD=compute_grads, CAST_DOT=cast, DOT_PRECISION=precision,
    )
    # (loss, dL/db, dL/dt): separate tensors, since a custom op's outputs may not alias each other
    loss, d_bias, d_scale = (row_stats[:, column].sum() / batch for column in range(3))
    if not compute_grads:
        return loss, None
    return loss, ((d_image / batch).to(image_features.dtype), (d_text / batch).to(text_features.dtype), d_scale, d_bias)
