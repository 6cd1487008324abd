"""Triton kernels for one tile of the ring exchange (``fastcl.distributed``, ``mode="ring"``):
the local anchors against one rank's candidate block, the tile never leaving the chip.

Maths (s_ij = scale * a_i . c_j; "own": the block is the anchors' own rank's, where anchor i's
positive is candidate pos(i) and, for a symmetric loss, candidate j < W's positive is anchor j)::

    forward:  row LSE_i over the block's candidates (less (i, i) with exclude_self, own block),
              s_{i,pos(i)} (own block), and per column j < W the LSE over this rank's anchors
              (each program writes its rows' partial max and sum; the host merges them)
    backward: g_ij = w_i (exp(s_ij - LSE_i) - [own, j = pos(i)])
                   + [j < W] cw_j (exp(s_ij - CLSE_j) - [own, i = j])
              da_i += scale * sum_j g_ij c_j,  dc_j = scale * sum_i g_ij a_i,
              dscale = sum_ij g_ij a_i . c_j

with LSE_i, CLSE_j the complete (all ranks') statistics and w, cw the upstream row and column
weights. Two backward kernels, no atomics, each recomputing the tiles: one owns anchor rows,
one owns candidates (as the fused single-process kernels do). The plain "mask" loss only:
labels, margins and smoothing run on the PyTorch tiles of :mod:`fastcl._ring`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..common.triton_runtime import accumulator_width, dot_operand, dot_settings, load_operand, tile_similarity
from .triton import _online_update

BLOCK_M, BLOCK_N, BLOCK_D = 32, 32, 32
ACC_D_MAX = 512  # embedding columns a backward program accumulates (D = 1024: two programs per tile row)
BACKWARD_WARPS = 8


@triton.jit
def _tile_candidates(rows, cols, row_valid, col_valid, OWN: tl.constexpr, EXCLUDE_SELF: tl.constexpr):
    """(valid, candidate) masks of a tile: inside the matrix; and a candidate of its row, which
    (i, i) of the own block is not with exclude_self."""
    valid = row_valid[:, None] & col_valid[None, :]
    candidate = valid
    if OWN:
        if EXCLUDE_SELF:
            candidate = candidate & (rows[:, None] != cols[None, :])
    return valid, candidate


@triton.jit
def ring_fwd_kernel_tile(anchor_ptr, candidate_ptr, scale_ptr, positive_ptr, row_lse_ptr, positive_score_ptr,
                         column_max_ptr, column_sum_ptr, num_rows, num_candidates, dim, num_columns,
                         OWN: tl.constexpr, EXCLUDE_SELF: tl.constexpr, COLUMNS: tl.constexpr,
                         CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row LSE (and the positive's score) of BLOCK_M anchors over the block; with COLUMNS the
    (max, sum of exp(s - max)) of every column j < num_columns over these rows, at [pid, j]."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    scale = tl.load(scale_ptr)
    positive = tl.load(positive_ptr + rows, mask=row_valid, other=-1) if OWN else rows * 0 - 1
    row_max = tl.zeros((BLOCK_M,), dtype=tl.float32) + float("-inf")
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive_score = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, num_candidates, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_valid = cols < num_candidates
        raw = tile_similarity(anchor_ptr, candidate_ptr, rows, cols, row_valid, col_valid, dim,
                              CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        scores = raw * scale
        valid, candidate = _tile_candidates(rows, cols, row_valid, col_valid, OWN, EXCLUDE_SELF)
        if OWN:
            positive_score += tl.sum(tl.where(valid & (cols[None, :] == positive[:, None]), scores, 0.0), axis=1)
        row_max, row_sum = _online_update(row_max, row_sum, scores, candidate, 1)
        if COLUMNS:
            if n0 < num_columns:
                wanted = col_valid & (cols < num_columns)
                masked = tl.where(row_valid[:, None] & wanted[None, :], scores, float("-inf"))
                column_max = tl.max(masked, axis=0)
                safe_max = tl.where(column_max == float("-inf"), 0.0, column_max)
                column_sum = tl.sum(tl.exp(masked - safe_max[None, :]), axis=0)
                tl.store(column_max_ptr + pid * num_columns + cols, column_max, mask=wanted)
                tl.store(column_sum_ptr + pid * num_columns + cols, column_sum, mask=wanted)
    tl.store(row_lse_ptr + rows, row_max + tl.log(row_sum), mask=row_valid)
    if OWN:
        tl.store(positive_score_ptr + rows, positive_score, mask=row_valid)


@triton.jit
def _ring_gradient_tile(raw, rows, cols, row_valid, col_valid, positive, lse, weights, column_lse_ptr,
                        column_weight_ptr, num_columns, scale, OWN: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                        COLUMNS: tl.constexpr):
    """g = dL/ds of one (BLOCK_M, BLOCK_N) tile, both directions (module docstring)."""
    scores = raw * scale
    valid, candidate = _tile_candidates(rows, cols, row_valid, col_valid, OWN, EXCLUDE_SELF)
    grad = tl.where(candidate, tl.exp(scores - lse[:, None]), 0.0) * weights[:, None]
    if OWN:
        grad -= tl.where(valid & (cols[None, :] == positive[:, None]), weights[:, None], 0.0)
    if COLUMNS:
        wanted = col_valid & (cols < num_columns)
        column_lse = tl.load(column_lse_ptr + cols, mask=wanted, other=0.0)
        column_weights = tl.load(column_weight_ptr + cols, mask=wanted, other=0.0)
        in_columns = row_valid[:, None] & wanted[None, :]
        grad += tl.where(in_columns, tl.exp(scores - column_lse[None, :]), 0.0) * column_weights[None, :]
        if OWN:
            grad -= tl.where(in_columns & (rows[:, None] == cols[None, :]), column_weights[None, :], 0.0)
    return grad


@triton.jit
def ring_bwd_kernel_rows(anchor_ptr, candidate_ptr, scale_ptr, positive_ptr, row_lse_ptr, row_weight_ptr,
                         column_lse_ptr, column_weight_ptr, d_anchor_ptr, d_scale_ptr,
                         num_rows, num_candidates, dim, num_columns,
                         OWN: tl.constexpr, EXCLUDE_SELF: tl.constexpr, COLUMNS: tl.constexpr,
                         CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """d_anchor[rows, group's columns] += scale * g @ c (fp32, read-modify-write: the ring adds
    every block's share); d_scale[rows] = sum_j g_ij raw_ij (group 0)."""
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    scale = tl.load(scale_ptr)
    positive = tl.load(positive_ptr + rows, mask=row_valid, other=-1) if OWN else rows * 0 - 1
    lse = tl.load(row_lse_ptr + rows, mask=row_valid, other=0.0)
    weights = tl.load(row_weight_ptr + rows, mask=row_valid, other=0.0)
    acc_d = group * ACC_D + tl.arange(0, ACC_D)
    acc_valid = acc_d < dim
    acc = tl.zeros((BLOCK_M, ACC_D), dtype=tl.float32)
    d_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    element = anchor_ptr.dtype.element_ty
    for n0 in range(0, num_candidates, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_valid = cols < num_candidates
        raw = tile_similarity(anchor_ptr, candidate_ptr, rows, cols, row_valid, col_valid, dim,
                              CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        grad = _ring_gradient_tile(raw, rows, cols, row_valid, col_valid, positive, lse, weights, column_lse_ptr,
                                   column_weight_ptr, num_columns, scale, OWN, EXCLUDE_SELF, COLUMNS)
        d_scale += tl.sum(grad * raw, axis=1)
        c = load_operand(candidate_ptr, cols, col_valid, acc_d, acc_valid, dim, raw, element, False, CAST_DOT)
        acc = tl.dot(dot_operand(grad, element, CAST_DOT), c, acc, input_precision=DOT_PRECISION)
    pointers = d_anchor_ptr + rows[:, None] * dim + acc_d[None, :]
    mask = row_valid[:, None] & acc_valid[None, :]
    tl.store(pointers, tl.load(pointers, mask=mask, other=0.0) + acc * scale, mask=mask)
    if group == 0:
        tl.store(d_scale_ptr + rows, d_scale, mask=row_valid)


@triton.jit
def ring_bwd_kernel_columns(anchor_ptr, candidate_ptr, scale_ptr, positive_ptr, row_lse_ptr, row_weight_ptr,
                            column_lse_ptr, column_weight_ptr, d_candidate_ptr,
                            num_rows, num_candidates, dim, num_columns,
                            OWN: tl.constexpr, EXCLUDE_SELF: tl.constexpr, COLUMNS: tl.constexpr,
                            CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """d_candidate[cols, group's columns] = scale * g^T @ a (fp32): this rank's share of the
    block's gradient."""
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < num_candidates
    scale = tl.load(scale_ptr)
    acc_d = group * ACC_D + tl.arange(0, ACC_D)
    acc_valid = acc_d < dim
    acc = tl.zeros((BLOCK_N, ACC_D), dtype=tl.float32)
    element = anchor_ptr.dtype.element_ty
    for m0 in range(0, num_rows, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_valid = rows < num_rows
        positive = tl.load(positive_ptr + rows, mask=row_valid, other=-1) if OWN else rows * 0 - 1
        lse = tl.load(row_lse_ptr + rows, mask=row_valid, other=0.0)
        weights = tl.load(row_weight_ptr + rows, mask=row_valid, other=0.0)
        raw = tile_similarity(anchor_ptr, candidate_ptr, rows, cols, row_valid, col_valid, dim,
                              CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        grad = _ring_gradient_tile(raw, rows, cols, row_valid, col_valid, positive, lse, weights, column_lse_ptr,
                                   column_weight_ptr, num_columns, scale, OWN, EXCLUDE_SELF, COLUMNS)
        a = load_operand(anchor_ptr, rows, row_valid, acc_d, acc_valid, dim, lse, element, False, CAST_DOT)
        acc = tl.dot(tl.trans(dot_operand(grad, element, CAST_DOT)), a, acc, input_precision=DOT_PRECISION)
    tl.store(d_candidate_ptr + cols[:, None] * dim + acc_d[None, :], acc * scale,
             mask=col_valid[:, None] & acc_valid[None, :])


def _launch_settings(anchors: torch.Tensor):
    cast, precision = dot_settings(anchors)
    return dict(CAST_DOT=cast, DOT_PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)


def tile_forward(anchors: torch.Tensor, block: torch.Tensor, scale: torch.Tensor, positive: torch.Tensor, own: bool,
                 exclude_self: bool, num_columns: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(row LSE (B,), the positives' scores (B,) on the own block else None, column LSE over these
    anchors (W,) or None), fp32, of contiguous ``anchors`` (B, D) against ``block`` (N, D) (fp32,
    bf16 or fp16: products in that dtype, accumulated in fp32)."""
    rows, dim = anchors.shape
    device = anchors.device
    row_lse = torch.empty(rows, dtype=torch.float32, device=device)
    positive_score = torch.empty(rows, dtype=torch.float32, device=device) if own else row_lse
    programs = triton.cdiv(rows, BLOCK_M)
    column_max = torch.full((programs, max(num_columns, 1)), float("-inf"), dtype=torch.float32, device=device)
    column_sum = torch.zeros_like(column_max)
    scale = scale.detach().to(device=device, dtype=torch.float32).reshape(1)
    ring_fwd_kernel_tile[(programs,)](
        anchors, block, scale, positive, row_lse, positive_score, column_max, column_sum,
        rows, block.shape[0], dim, num_columns, OWN=own, EXCLUDE_SELF=exclude_self, COLUMNS=num_columns > 0,
        **_launch_settings(anchors))
    column_lse = None
    if num_columns > 0:
        column_lse = torch.logsumexp(column_max + column_sum.log(), dim=0)[:num_columns]
    return row_lse, (positive_score if own else None), column_lse


def tile_backward(anchors: torch.Tensor, block: torch.Tensor, scale: torch.Tensor, positive: torch.Tensor, own: bool,
                  exclude_self: bool, row_lse: torch.Tensor, row_weights: torch.Tensor,
                  column_lse: Optional[torch.Tensor], column_weights: Optional[torch.Tensor],
                  grad_anchors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adds the tile's anchor gradient to ``grad_anchors`` (fp32, contiguous); returns (this
    rank's share of the block's gradient (N, D) fp32, dL/dscale of the tile (0-d))."""
    rows, dim = anchors.shape
    num_candidates = block.shape[0]
    num_columns = column_lse.shape[0] if column_lse is not None else 0
    columns_lse = column_lse if column_lse is not None else row_lse
    columns_weight = column_weights if column_weights is not None else row_weights
    scale = scale.detach().to(device=anchors.device, dtype=torch.float32).reshape(1)
    width = min(accumulator_width(dim), ACC_D_MAX)
    groups = triton.cdiv(dim, width)
    d_scale = torch.empty(rows, dtype=torch.float32, device=anchors.device)
    flags = dict(OWN=own, EXCLUDE_SELF=exclude_self, COLUMNS=num_columns > 0, ACC_D=width, num_warps=BACKWARD_WARPS,
                 **_launch_settings(anchors))
    ring_bwd_kernel_rows[(triton.cdiv(rows, BLOCK_M), groups)](
        anchors, block, scale, positive, row_lse, row_weights, columns_lse, columns_weight, grad_anchors, d_scale,
        rows, num_candidates, dim, num_columns, **flags)
    share = torch.empty((num_candidates, dim), dtype=torch.float32, device=anchors.device)
    ring_bwd_kernel_columns[(triton.cdiv(num_candidates, BLOCK_N), groups)](
        anchors, block, scale, positive, row_lse, row_weights, columns_lse, columns_weight, share,
        rows, num_candidates, dim, num_columns, **flags)
    return share, d_scale.sum()
