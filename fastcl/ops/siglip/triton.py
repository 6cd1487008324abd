"""Triton kernel for the SigLIP loss: one pass over the B x B tiles, loss and gradients together.

    z_ij = t x_i.y_j + b,  y_ij = +1 on the diagonal, -1 elsewhere
    L = (1/B) sum_ij softplus(-y_ij z_ij),   dL/dz_ij = -(1/B) y_ij sigmoid(-y_ij z_ij)

The loss is elementwise, so no normalizer is needed before the gradient: the loss and the
gradients come out of the forward call. Two kernels, no atomics: one owns image rows (loss,
dt, db and d(image), accumulated on chip), the other owns text rows (d(text)); each
recomputes the similarity tiles. ``backward()`` only scales the saved gradients.

Example::

    >>> loss = fastcl.siglip_loss(img.cuda(), txt.cuda(), 10.0, -10.0, backend="triton")
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import triton_runtime as triton_common
from ..common.triton_runtime import (device_scalars, dot_operand, dot_settings, load_operand, softplus, tile_kernel,
                             tile_similarity)


# per-pair gradients lie in [-1, 1]: x 2^12 keeps those down to 1.5e-11 in float16
FLOAT16_TILE_SCALE = 2.0 ** 12


@triton.jit
def _siglip_tile(raw, rows, cols, row_valid, col_valid, logit_scale, logit_bias):
    """(softplus(-y z), B * dL/dz) of one tile, zero outside the matrix; y = +1 on the diagonal."""
    valid = row_valid[:, None] & col_valid[None, :]
    sign = tl.where(rows[:, None] == cols[None, :], 1.0, -1.0)
    signed = sign * (raw * logit_scale + logit_bias)
    # per-pair gradient times B: in [-1, 1], safe to round to the input dtype
    return tl.where(valid, softplus(-signed), 0.0), tl.where(valid, -sign * tl.sigmoid(-signed), 0.0)


@tile_kernel("rows", grid_size="batch", grid_block="BLOCK_M")
@triton.jit
def siglip_kernel_rows(
    image_ptr, text_ptr, row_stats_ptr, d_image_ptr,
    batch, dim, scalars_ptr,
    WITH_GRAD: tl.constexpr, CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """row_stats (B, 3) fp32 = [sum_j softplus(-y z), sum_j dl/dz, sum_j dl/dz * raw] (dl = B dL);
    with WITH_GRAD, d_image (B, D) = dL/dx (``grad_factor`` = t / B) in d_image's dtype for the
    embedding slice of the program's group, accumulated on chip in fp32 and written once.
    scalars (4,) fp32 in device memory: [t, b, t / B, gradient tile scale] (no host sync for
    learnable t, b); float16 tiles are scaled by 2^12 before rounding, so per-pair gradients
    below float16's 6e-8 are kept."""
    logit_scale = tl.load(scalars_ptr)
    logit_bias = tl.load(scalars_ptr + 1)
    grad_factor = tl.load(scalars_ptr + 2)
    grad_scale = tl.load(scalars_ptr + 3)
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < batch
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_bias = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_d = group * ACC_D + tl.arange(0, ACC_D)
    acc_valid = acc_d < dim
    acc = tl.zeros((BLOCK_M, ACC_D), dtype=tl.float32)
    element = image_ptr.dtype.element_ty
    for n0 in range(0, batch, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # 64-bit offsets: N * D may pass 2^31
        col_valid = cols < batch
        raw = tile_similarity(image_ptr, text_ptr, rows, cols, row_valid, col_valid, dim,
                              CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        terms, grad = _siglip_tile(raw, rows, cols, row_valid, col_valid, logit_scale, logit_bias)
        loss += tl.sum(terms, axis=1)
        if WITH_GRAD:
            d_bias += tl.sum(grad, axis=1)
            d_scale += tl.sum(grad * raw, axis=1)
            y = load_operand(text_ptr, cols, col_valid, acc_d, acc_valid, dim, 1.0, element, False, CAST_DOT)
            acc = tl.dot(dot_operand(grad * grad_scale, element, CAST_DOT), y, acc, input_precision=DOT_PRECISION)
    if WITH_GRAD:
        d_image = (acc * (grad_factor / grad_scale)).to(d_image_ptr.dtype.element_ty)
        tl.store(d_image_ptr + rows[:, None] * dim + acc_d[None, :], d_image, mask=row_valid[:, None] & acc_valid[None, :])
    if group == 0:
        tl.store(row_stats_ptr + rows * 3, loss, mask=row_valid)
        tl.store(row_stats_ptr + rows * 3 + 1, d_bias, mask=row_valid)
        tl.store(row_stats_ptr + rows * 3 + 2, d_scale, mask=row_valid)


@tile_kernel("columns", grid_size="batch", grid_block="BLOCK_N")
@triton.jit
def siglip_kernel_columns(
    image_ptr, text_ptr, d_text_ptr,
    batch, dim, scalars_ptr,
    CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d_text (B, D) = dL/dy: program (j, group) owns BLOCK_N text rows, walks over the
    image tiles and accumulates g^T x for its embedding slice on chip (no atomics)."""
    logit_scale = tl.load(scalars_ptr)
    logit_bias = tl.load(scalars_ptr + 1)
    grad_factor = tl.load(scalars_ptr + 2)
    grad_scale = tl.load(scalars_ptr + 3)
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < batch
    acc_d = group * ACC_D + tl.arange(0, ACC_D)
    acc_valid = acc_d < dim
    acc = tl.zeros((BLOCK_N, ACC_D), dtype=tl.float32)
    element = image_ptr.dtype.element_ty
    for m0 in range(0, batch, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_valid = rows < batch
        raw = tile_similarity(image_ptr, text_ptr, rows, cols, row_valid, col_valid, dim,
                              CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        _, grad = _siglip_tile(raw, rows, cols, row_valid, col_valid, logit_scale, logit_bias)
        x = load_operand(image_ptr, rows, row_valid, acc_d, acc_valid, dim, 1.0, element, False, CAST_DOT)
        acc = tl.dot(tl.trans(dot_operand(grad * grad_scale, element, CAST_DOT)), x, acc, input_precision=DOT_PRECISION)
    d_text = (acc * (grad_factor / grad_scale)).to(d_text_ptr.dtype.element_ty)
    tl.store(d_text_ptr + cols[:, None] * dim + acc_d[None, :], d_text, mask=col_valid[:, None] & acc_valid[None, :])


def triton_siglip(image_features, text_features, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                  compute_grads: bool):
    """(loss, (d_image, d_text, d_scale, d_bias) or None): the loss alone is one kernel; with
    gradients a second kernel owns the text rows. The body of the ``fastcl::siglip_forward``
    custom op for ``backend="triton"``."""
    with triton_common.device_guard(image_features.device):
        return _triton_siglip(image_features, text_features, logit_scale, logit_bias, compute_grads)


def _triton_siglip(image_features, text_features, logit_scale, logit_bias, compute_grads):
    image = image_features.contiguous()
    text = text_features.contiguous()
    batch, dim = image.shape
    device = image.device
    scalars = device_scalars(device, logit_scale, logit_bias)
    tile_scale = torch.full((1,), FLOAT16_TILE_SCALE if image.dtype == torch.float16 else 1.0, device=device)
    scalars = torch.cat([scalars, scalars[:1] / batch, tile_scale])  # [t, b, t / B, tile scale]
    row_stats = torch.empty(batch, 3, dtype=torch.float32, device=device)
    d_image = torch.empty(batch, dim, dtype=image_features.dtype, device=device) if compute_grads else row_stats
    cast, precision = dot_settings(image)
    groups = (lambda meta: triton.cdiv(dim, meta["ACC_D"])) if compute_grads else (lambda meta: 1)
    siglip_kernel_rows[lambda meta: (triton.cdiv(batch, meta["BLOCK_M"]), groups(meta))](
        image, text, row_stats, d_image, batch, dim, scalars,
        WITH_GRAD=compute_grads, CAST_DOT=cast, DOT_PRECISION=precision,
    )
    if compute_grads:
        d_text = torch.empty(batch, dim, dtype=text_features.dtype, device=device)
        siglip_kernel_columns[lambda meta: (triton.cdiv(batch, meta["BLOCK_N"]), triton.cdiv(dim, meta["ACC_D"]))](
            image, text, d_text, batch, dim, scalars, CAST_DOT=cast, DOT_PRECISION=precision,
        )
    # (loss, dL/db, dL/dt): separate tensors, since a custom op's outputs may not alias each other
    loss, d_bias, d_scale = (row_stats[:, column].sum() / batch for column in range(3))
    if not compute_grads:
        return loss, None
    return loss, (d_image, d_text, d_scale, d_bias)
