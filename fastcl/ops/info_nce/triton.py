"""Triton kernels for InfoNCE: every option of :func:`fastcl.info_nce`, fp16/bf16/fp32 inputs.

Maths (one *direction*: anchor rows a_i against candidates c_j and private hard negatives
h_ih; s = a.c / tau, with a, c, h unit vectors when ``normalize``)::

    mask:     L_i = LSE_{j in C_i} s_ij - (1 - eps) s_{i,pos(i)} - eps mean_{j in C_i} s_ij
    supcon:   L_i = LSE_{j in C_i} s_ij - mean_{p in P_i} s_ip              (P_i: same label)
    pairwise: L_i = sum_{p in P_i} softplus(LSE_{n in N_i} s_in - s_ip)      (N_i = C_i \\ P_i)

    dL/ds_ij = w_i (softmax_ij - [j = pos(i)] ...);  da_i = sum_j g_ij c_j / tau,
    dc_j = sum_i g_ij a_i / tau,  dtau = -sum_ij g_ij s_ij / tau

Passes over the B x N tiles (never stored):

* forward, one pass: an online max / sum per row gives LSE_i. For the symmetric (CLIP) loss
  the *column* sums come out of the same pass, shifted per column and added with atomics. The
  shift is max(s_jj, norm bound - 80) (see _column_shift), so no term overflows; columns whose
  sum underflowed are recomputed by a launch the device filters (no host decision), over the
  same query x key tiles the backward kernels recompute: at |s| ~ 1e6 the LSE a gradient is
  formed against must come from the very similarities, not from the transposed product. Under
  torch.use_deterministic_algorithms the key->query direction runs as a pass of its own
  instead (no atomics; its forward and backward both read keys x queries tiles).
  ``pairwise`` needs a second pass (its terms need the finished negative LSE).
* backward, no atomics: two kernels, each recomputing every tile and forming the gradient of
  *both* directions for it. One owns anchor rows and accumulates d(anchor) and dtau on chip;
  the other owns candidates and accumulates d(candidate) on chip; each writes its gradient
  once. (A single pass that accumulates d(candidate) with atomics moves (B / BLOCK_M) * N * D
  fp32 atomic adds through L2, 68 GB at B = N = 65536, D = 512: more than the recomputation
  costs.) Programs own an embedding slice of ACC_D columns, so D up to 512 recomputes each
  tile once per kernel. A light third kernel handles the hard negatives.
* for a scalar loss whose inputs need gradients the backward pass runs inside the forward
  (``backward()`` only scales): the saved state is the gradients, not the inputs.

Options covered by the fused kernels: everything. ``symmetric`` with ``supcon``/``pairwise``
runs the row kernel once per direction (keys as anchors for the second) instead of fusing
the columns. float64 inputs go to the chunked PyTorch path (Triton's float64 products are
slow and the reference already runs in float64).

Example::

    >>> loss = fastcl.info_nce(q.cuda(), k.cuda(), symmetric=True, backend="triton")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..common import triton_runtime as triton_common
from ..common.triton_runtime import dot_operand, dot_settings, load_operand, softplus, tile_kernel, tile_similarity
from ..common.blocks import NORM_EPS
from .chunked import count_positives
from ..common.gradients import scale_gradients
from .function import _normalize_backward, temperature_meta
from .options import MASK, PAIRWISE, SUPCON, InfoNCEOptions

MODES = {MASK: 0, SUPCON: 1, PAIRWISE: 2}


@triton.jit
def info_nce_fwd_kernel_pair_dot(a_ptr, b_ptr, index_ptr, out_ptr, rows, dim,
                                 HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = a[r] . b[index[r]] (b[r] without index) in fp32: norms, positive and diagonal similarities."""
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_valid = r < rows
    if HAS_INDEX:
        other = tl.load(index_ptr + r, mask=r_valid, other=0)
    else:
        other = r
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = r_valid[:, None] & (d < dim)[None, :]
        a = tl.load(a_ptr + r[:, None] * dim + d[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + other[:, None] * dim + d[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + r, acc, mask=r_valid)


@triton.jit
def _key_tile_masks(raw, rows, cols, row_valid, col_valid, positive, positive_raw, anchor_labels,
                    candidate_label_ptr, margin,
                    MODE: tl.constexpr, EXCLUDE_SELF: tl.constexpr, HAS_LABELS: tl.constexpr,
                    HAS_MARGIN: tl.constexpr):
    """(candidate, is_positive, same_label) booleans of one key tile for the row direction."""
    candidate = row_valid[:, None] & col_valid[None, :]
    if EXCLUDE_SELF:
        candidate = candidate & (rows[:, None] != cols[None, :])
    if HAS_LABELS:
        candidate_labels = tl.load(candidate_label_ptr + cols, mask=col_valid, other=-1)
        same_label = anchor_labels[:, None] == candidate_labels[None, :]
    else:
        same_label = candidate & False
    if MODE == 0:
        is_positive = (cols[None, :] == positive[:, None]) & candidate
        if HAS_LABELS:
            candidate = candidate & ~(same_label & ~is_positive)
        if HAS_MARGIN:
            candidate = candidate & ~((raw > positive_raw[:, None] - margin) & ~is_positive)
    else:
        is_positive = same_label & candidate
    return candidate, is_positive, same_label


@triton.jit
def _column_tile_masks(raw, rows, cols, row_valid, same_label, column_positive_raw, margin, num_column_anchors,
                       HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr):
    """(candidate, is_diagonal) of the key->query direction: column j's positive is query j."""
    column_valid = cols < num_column_anchors
    candidate = row_valid[:, None] & column_valid[None, :]
    is_diagonal = (rows[:, None] == cols[None, :]) & candidate
    if HAS_LABELS:
        candidate = candidate & ~(same_label & ~is_diagonal)
    if HAS_MARGIN:
        candidate = candidate & ~((raw > column_positive_raw[None, :] - margin) & ~is_diagonal)
    return candidate, is_diagonal


@triton.jit
def _column_terms(raw, rows, cols, row_valid, same_label, positive_raw_ptr, margin, num_column_anchors,
                  HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr):
    """(column_valid, candidate, is_diagonal) of a tile for the fused key->query direction."""
    column_valid = cols < num_column_anchors
    column_positive_raw = tl.load(positive_raw_ptr + cols, mask=column_valid, other=0.0) if HAS_MARGIN else cols * 0.0
    candidate, is_diagonal = _column_tile_masks(raw, rows, cols, row_valid, same_label, column_positive_raw, margin,
                                                num_column_anchors, HAS_LABELS, HAS_MARGIN)
    return column_valid, candidate, is_diagonal


@triton.jit
def _private_similarity(anchor_ptr, private_ptr, rows, row_valid, slot, num_private, dim, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """fp32 (BLOCK_M,) similarity of each anchor row with its hard negative number ``slot``."""
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = row_valid[:, None] & (d < dim)[None, :]
        a = tl.load(anchor_ptr + rows[:, None] * dim + d[None, :], mask=m, other=0.0).to(tl.float32)
        h = tl.load(private_ptr + (rows[:, None] * num_private + slot) * dim + d[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * h, axis=1)
    return acc


@triton.jit
def _inverse_norm(scale_ptr, offsets, valid, NORMALIZE: tl.constexpr):
    """The fp32 inverse norms at ``offsets`` with normalize, else ones."""
    return tl.load(scale_ptr + offsets, mask=valid, other=0.0) if NORMALIZE else offsets * 0.0 + 1.0


@triton.jit
def _row_inputs(rows, row_valid, positive_ptr, positive_raw_ptr, anchor_label_ptr, anchor_scale_ptr,
                MODE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr):
    """(positive, positive_raw, anchor_labels, anchor_scale) of a block of anchor rows."""
    positive = tl.load(positive_ptr + rows, mask=row_valid, other=-1) if MODE == 0 else rows * 0 - 1
    positive_raw = tl.load(positive_raw_ptr + rows, mask=row_valid, other=0.0) if HAS_MARGIN else rows * 0.0
    anchor_labels = tl.load(anchor_label_ptr + rows, mask=row_valid, other=-2) if HAS_LABELS else rows * 0
    anchor_scale = _inverse_norm(anchor_scale_ptr, rows, row_valid, NORMALIZE)
    return positive, positive_raw, anchor_labels, anchor_scale


@triton.jit
def _unit_similarity(anchor_ptr, candidate_ptr, candidate_scale_ptr, rows, cols, row_valid, col_valid, dim,
                     anchor_scale, NORMALIZE: tl.constexpr, CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(fp32 (BLOCK_M, BLOCK_N) similarities, of the unit vectors with normalize; the candidates'
    inverse norms). The norms are loaded after the product, so they are not live across its loop."""
    raw = tile_similarity(anchor_ptr, candidate_ptr, rows, cols, row_valid, col_valid, dim,
                          CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    candidate_scale = _inverse_norm(candidate_scale_ptr, cols, col_valid, NORMALIZE)
    if NORMALIZE:
        raw = raw * anchor_scale[:, None] * candidate_scale[None, :]
    return raw, candidate_scale


@triton.jit
def _private_scores(anchor_ptr, private_ptr, private_scale_ptr, rows, row_valid, slot, num_private, dim, anchor_scale,
                    positive_raw, inv_temperature, margin, NORMALIZE: tl.constexpr, HAS_MARGIN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(scores, candidate, inverse norms) of each row's hard negative number ``slot``: never a
    positive, dropped by the margin like any negative."""
    raw = _private_similarity(anchor_ptr, private_ptr, rows, row_valid, slot, num_private, dim, BLOCK_M, BLOCK_D)
    private_scale = _inverse_norm(private_scale_ptr, rows * num_private + slot, row_valid, NORMALIZE)
    if NORMALIZE:
        raw = raw * anchor_scale * private_scale
    candidate = row_valid
    if HAS_MARGIN:
        candidate = candidate & ~(raw > positive_raw - margin)
    return raw * inv_temperature, candidate, private_scale


@triton.jit
def _online_update(running_max, running_sum, scores, included, AXIS: tl.constexpr):
    """Fold a (BLOCK_M, BLOCK_N) tile into the running max / sum of exp, only where included:
    per row (AXIS = 1) or per column (AXIS = 0)."""
    masked = tl.where(included, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(masked, axis=AXIS))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # no (-inf) - (-inf)
    running_sum = (running_sum * tl.exp(running_max - safe_max)
                   + tl.sum(tl.exp(masked - tl.expand_dims(safe_max, AXIS)), axis=AXIS))
    return new_max, running_sum


@triton.jit
def _online_update_vector(row_max, row_sum, scores, included):
    masked = tl.where(included, scores, float("-inf"))
    new_max = tl.maximum(row_max, masked)
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    row_sum = row_sum * tl.exp(row_max - safe_max) + tl.exp(masked - safe_max)
    return new_max, row_sum


@triton.jit
def _filtered_column_lse(pid, anchor_ptr, candidate_ptr, anchor_scale_ptr, candidate_scale_ptr, positive_raw_ptr,
                         anchor_label_ptr, candidate_label_ptr, lse_ptr, column_filter_ptr, num_rows, dim,
                         num_column_anchors, inv_temperature, margin, NORMALIZE: tl.constexpr,
                         HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr, CAST_DOT: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """LSE_j over the anchor rows of the key->query direction, with an online max, for the
    columns j of block ``pid`` whose column_filter != 0, written to lse_ptr[4 j] (a block with
    none walks no tile).

    The tiles are the fused pass's and the backward kernels' own (anchors on axis 0, the same
    blocks), not those of the transposed product keys . anchors: a product's rounding may depend
    on the operands' order and places in the tile (OpenBLAS's AVX2 kernels under the interpreter
    do), and one ulp of a similarity of 2e4 is 0.2 in exp(s - LSE) at tau = 0.01. Reduced along
    axis 0, the scores are bit for bit those the backward kernels form against this LSE."""
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    wanted = tl.load(column_filter_ptr + cols, mask=cols < num_column_anchors, other=0) != 0
    limit = tl.where(tl.sum(wanted.to(tl.int32), axis=0) > 0, num_rows, 0)
    candidate_labels = tl.load(candidate_label_ptr + cols, mask=wanted, other=-1) if HAS_LABELS else cols * 0
    column_positive_raw = tl.load(positive_raw_ptr + cols, mask=wanted, other=0.0) if HAS_MARGIN else cols * 0.0
    column_max = tl.zeros((BLOCK_N,), dtype=tl.float32) + float("-inf")
    column_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, limit, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_valid = rows < num_rows
        anchor_scale = _inverse_norm(anchor_scale_ptr, rows, row_valid, NORMALIZE)
        raw, _ = _unit_similarity(anchor_ptr, candidate_ptr, candidate_scale_ptr, rows, cols, row_valid, wanted, dim,
                                  anchor_scale, NORMALIZE, CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        anchor_labels = tl.load(anchor_label_ptr + rows, mask=row_valid, other=-2) if HAS_LABELS else rows * 0
        same_label = anchor_labels[:, None] == candidate_labels[None, :]
        candidate, _ = _column_tile_masks(raw, rows, cols, row_valid, same_label, column_positive_raw, margin,
                                          num_column_anchors, HAS_LABELS, HAS_MARGIN)
        column_max, column_sum = _online_update(column_max, column_sum, raw * inv_temperature,
                                                candidate & wanted[None, :], 0)
    tl.store(lse_ptr + cols * 4, column_max + tl.log(column_sum), mask=wanted)


@tile_kernel("forward", grid_size="num_rows", grid_block="BLOCK_M", reset=["column_stats_ptr"])
@triton.jit
def info_nce_fwd_kernel_rows(
    anchor_ptr, candidate_ptr, private_ptr,
    anchor_scale_ptr, candidate_scale_ptr, private_scale_ptr,
    positive_ptr, positive_raw_ptr, anchor_label_ptr, candidate_label_ptr,
    row_stats_ptr, column_shift_ptr, column_stats_ptr, row_filter_ptr,
    num_rows, num_candidates, num_private, dim, num_column_anchors,
    inv_temperature_ptr, margin,
    MODE: tl.constexpr, STAGE: tl.constexpr, HAS_PRIVATE: tl.constexpr, NORMALIZE: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr, SMOOTHING: tl.constexpr,
    FUSED_COLUMNS: tl.constexpr, HAS_FILTER: tl.constexpr, CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row statistics of one direction, row_stats (R, 4) fp32:

    mask / supcon: [LSE over candidates, sum of positive scores, sum of candidate scores, #candidates]
    pairwise STAGE 1: [LSE over negatives, ...]; STAGE 2 (reads column 0): [.., loss, sum of sigmoids, ..]
    FUSED_COLUMNS (symmetric, mask): column_stats (B, 3) += [sum exp(s - shift_j), sum of candidate
    scores, #candidates] over the key->query direction, shift_j = column_shift[j].
    HAS_FILTER (the row direction's pointers, none of the above): the device-side recompute of the
    fused columns whose shifted sum underflowed (row_filter (B,) int8 != 0), no host decision;
    program ``pid`` owns columns [pid * BLOCK_N, (pid + 1) * BLOCK_N), see :func:`_filtered_column_lse`.
    inv_temperature is read from device memory (a learnable temperature costs no host sync).
    """
    pid = tl.program_id(0).to(tl.int64)
    if HAS_FILTER:
        _filtered_column_lse(
            pid, anchor_ptr, candidate_ptr, anchor_scale_ptr, candidate_scale_ptr, positive_raw_ptr,
            anchor_label_ptr, candidate_label_ptr, row_stats_ptr, row_filter_ptr, num_rows, dim,
            num_column_anchors, tl.load(inv_temperature_ptr), margin, NORMALIZE, HAS_LABELS, HAS_MARGIN,
            CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < num_rows
        inv_temperature = tl.load(inv_temperature_ptr)
        positive, positive_raw, anchor_labels, anchor_scale = _row_inputs(
            rows, row_valid, positive_ptr, positive_raw_ptr, anchor_label_ptr, anchor_scale_ptr,
            MODE, NORMALIZE, HAS_LABELS, HAS_MARGIN)
        row_max = tl.zeros((BLOCK_M,), dtype=tl.float32) + float("-inf")
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        positive_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        candidate_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        candidate_count = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sigma_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        negative_lse = tl.load(row_stats_ptr + rows * 4, mask=row_valid, other=0.0) if STAGE == 2 else rows * 0.0

        for n0 in range(0, num_candidates, BLOCK_N):
            cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # 64-bit offsets: N * D may pass 2^31
            col_valid = cols < num_candidates
            raw, candidate_scale = _unit_similarity(
                anchor_ptr, candidate_ptr, candidate_scale_ptr, rows, cols, row_valid, col_valid, dim, anchor_scale,
                NORMALIZE, CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            scores = raw * inv_temperature
            candidate, is_positive, same_label = _key_tile_masks(
                raw, rows, cols, row_valid, col_valid, positive, positive_raw, anchor_labels, candidate_label_ptr,
                margin, MODE, EXCLUDE_SELF, HAS_LABELS, HAS_MARGIN)
            if MODE == 2:
                if STAGE == 1:
                    row_max, row_sum = _online_update(row_max, row_sum, scores, candidate & ~is_positive, 1)
                else:
                    gap = negative_lse[:, None] - scores
                    positive_sum += tl.sum(tl.where(is_positive, softplus(gap), 0.0), axis=1)
                    sigma_sum += tl.sum(tl.where(is_positive, tl.sigmoid(gap), 0.0), axis=1)
            else:
                row_max, row_sum = _online_update(row_max, row_sum, scores, candidate, 1)
                positive_sum += tl.sum(tl.where(is_positive, scores, 0.0), axis=1)
                if SMOOTHING:
                    candidate_sum += tl.sum(tl.where(candidate, scores, 0.0), axis=1)
                    candidate_count += tl.sum(candidate.to(tl.float32), axis=1)
            if FUSED_COLUMNS:
                if n0 < num_column_anchors:
                    column_valid, column_candidate, is_diagonal = _column_terms(
                        raw, rows, cols, row_valid, same_label, positive_raw_ptr, margin, num_column_anchors,
                        HAS_LABELS, HAS_MARGIN)
                    shift = tl.load(column_shift_ptr + cols, mask=column_valid, other=0.0)
                    shifted = tl.where(column_candidate, tl.exp(scores - shift[None, :]), 0.0)
                    tl.atomic_add(column_stats_ptr + cols * 3, tl.sum(shifted, axis=0), mask=column_valid)
                    if SMOOTHING:
                        tl.atomic_add(column_stats_ptr + cols * 3 + 1,
                                      tl.sum(tl.where(column_candidate, scores, 0.0), axis=0), mask=column_valid)
                        tl.atomic_add(column_stats_ptr + cols * 3 + 2,
                                      tl.sum(column_candidate.to(tl.float32), axis=0), mask=column_valid)

        if HAS_PRIVATE:
            if STAGE == 1:
                for slot in range(0, num_private):
                    scores_h, candidate_h, _ = _private_scores(
                        anchor_ptr, private_ptr, private_scale_ptr, rows, row_valid, slot, num_private, dim, anchor_scale,
                        positive_raw, inv_temperature, margin, NORMALIZE, HAS_MARGIN, BLOCK_M, BLOCK_D)
                    row_max, row_sum = _online_update_vector(row_max, row_sum, scores_h, candidate_h)
                    if SMOOTHING:
                        candidate_sum += tl.where(candidate_h, scores_h, 0.0)
                        candidate_count += candidate_h.to(tl.float32)

        if STAGE == 1:
            lse = row_max + tl.log(row_sum)
            tl.store(row_stats_ptr + rows * 4, lse, mask=row_valid)
            tl.store(row_stats_ptr + rows * 4 + 1, positive_sum, mask=row_valid)
            tl.store(row_stats_ptr + rows * 4 + 2, candidate_sum, mask=row_valid)
            tl.store(row_stats_ptr + rows * 4 + 3, candidate_count, mask=row_valid)
        else:
            tl.store(row_stats_ptr + rows * 4 + 1, positive_sum, mask=row_valid)
            tl.store(row_stats_ptr + rows * 4 + 2, sigma_sum, mask=row_valid)


@triton.jit
def _row_terms(rows, row_valid, positive_ptr, positive_raw_ptr, anchor_label_ptr, anchor_scale_ptr, num_positive_ptr,
               row_stats_ptr, row_weight_ptr, label_smoothing,
               MODE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr,
               SMOOTHING: tl.constexpr):
    """Per-row inputs of the gradient tile: (positive, positive_raw, anchor_labels, anchor_scale,
    lse, row_factor, share, sigma_sum). ``share``: the label-smoothing share of each candidate
    (mask mode) or 1 / #positives (supcon); ``sigma_sum``: pairwise's sum of sigmoids."""
    positive, positive_raw, anchor_labels, anchor_scale = _row_inputs(
        rows, row_valid, positive_ptr, positive_raw_ptr, anchor_label_ptr, anchor_scale_ptr,
        MODE, NORMALIZE, HAS_LABELS, HAS_MARGIN)
    lse = tl.load(row_stats_ptr + rows * 4, mask=row_valid, other=0.0)
    weight = tl.load(row_weight_ptr + rows, mask=row_valid, other=0.0)
    sigma_sum = weight * 0.0
    if MODE == 0:
        count = tl.load(row_stats_ptr + rows * 4 + 3, mask=row_valid, other=1.0) if SMOOTHING else rows * 0.0 + 1.0
        share = label_smoothing / tl.maximum(count, 1.0)
        row_factor = weight
    elif MODE == 1:
        num_positive = tl.load(num_positive_ptr + rows, mask=row_valid, other=0).to(tl.float32)
        row_factor = tl.where(num_positive > 0, weight, 0.0)
        share = 1.0 / tl.maximum(num_positive, 1.0)
    else:
        sigma_sum = tl.load(row_stats_ptr + rows * 4 + 2, mask=row_valid, other=0.0)
        row_factor = weight
        share = weight * 0.0
    return positive, positive_raw, anchor_labels, anchor_scale, lse, row_factor, share, sigma_sum


@triton.jit
def _grad_tile(raw, rows, cols, row_valid, col_valid, n0, positive, positive_raw, anchor_labels, lse, row_factor,
               share, sigma_sum, candidate_label_ptr, positive_raw_ptr, column_lse_ptr, column_count_ptr,
               column_weight_ptr, num_column_anchors, inv_temperature, margin, label_smoothing,
               MODE: tl.constexpr, EXCLUDE_SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr,
               SMOOTHING: tl.constexpr, FUSED_COLUMNS: tl.constexpr):
    """(g, s): g = dL/ds (fp32 (BLOCK_M, BLOCK_N)) of one tile, the row direction weighted per
    row plus, with FUSED_COLUMNS, the key->query direction weighted per column; s the scores.
    ``raw`` holds the (unit, with normalize) similarities; ``n0`` is the tile's first column."""
    scores = raw * inv_temperature
    candidate, is_positive, same_label = _key_tile_masks(
        raw, rows, cols, row_valid, col_valid, positive, positive_raw, anchor_labels, candidate_label_ptr,
        margin, MODE, EXCLUDE_SELF, HAS_LABELS, HAS_MARGIN)
    if MODE == 0:
        grad = tl.where(candidate, tl.exp(scores - lse[:, None]), 0.0) - (1.0 - label_smoothing) * is_positive.to(tl.float32)
        if SMOOTHING:
            grad -= tl.where(candidate, share[:, None], 0.0)
    elif MODE == 1:
        grad = tl.where(candidate, tl.exp(scores - lse[:, None]), 0.0) - tl.where(is_positive, share[:, None], 0.0)
    else:
        negative = candidate & ~is_positive
        grad = sigma_sum[:, None] * tl.where(negative, tl.exp(scores - lse[:, None]), 0.0)
        grad -= tl.where(is_positive, tl.sigmoid(lse[:, None] - scores), 0.0)
    # rows with weight 0 and -inf statistics would give nan through 0 * inf: row_factor is finite
    grad = grad * row_factor[:, None]
    if FUSED_COLUMNS:
        if n0 < num_column_anchors:
            column_valid, column_candidate, is_diagonal = _column_terms(
                raw, rows, cols, row_valid, same_label, positive_raw_ptr, margin, num_column_anchors,
                HAS_LABELS, HAS_MARGIN)
            column_lse = tl.load(column_lse_ptr + cols, mask=column_valid, other=0.0)
            column_weight = tl.load(column_weight_ptr + cols, mask=column_valid, other=0.0)
            column_grad = tl.where(column_candidate, tl.exp(scores - column_lse[None, :]), 0.0)
            column_grad -= (1.0 - label_smoothing) * is_diagonal.to(tl.float32)
            if SMOOTHING:
                column_count = tl.load(column_count_ptr + cols, mask=column_valid, other=1.0)
                column_grad -= tl.where(column_candidate, label_smoothing / tl.maximum(column_count, 1.0)[None, :], 0.0)
            grad += column_grad * column_weight[None, :]
    return grad, scores


@tile_kernel("rows", grid_size="num_rows", grid_block="BLOCK_M")
@triton.jit
def info_nce_bwd_kernel_rows(
    anchor_ptr, candidate_ptr,
    anchor_scale_ptr, candidate_scale_ptr,
    positive_ptr, positive_raw_ptr, anchor_label_ptr, candidate_label_ptr, num_positive_ptr,
    row_stats_ptr, row_weight_ptr, column_lse_ptr, column_count_ptr, column_weight_ptr,
    d_anchor_ptr, dtemp_ptr,
    num_rows, num_candidates, dim, num_column_anchors,
    inv_temperature_ptr, margin, label_smoothing, grad_scale_ptr,
    MODE: tl.constexpr, STAGE: tl.constexpr, NORMALIZE: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr, SMOOTHING: tl.constexpr,
    FUSED_COLUMNS: tl.constexpr, CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d(anchor) (R, D) (fp32, or the inputs' dtype) and dtemp (R,) = sum_j g_ij s_ij over the candidates (hard
    negatives: :func:`info_nce_bwd_kernel_private`, launched after this one).

    Program (i, group) owns BLOCK_M anchor rows and the embedding columns
    [group * ACC_D, (group + 1) * ACC_D): it walks over every candidate tile, recomputes the
    similarities (full D), forms g and accumulates g @ c for its columns on chip, then writes
    them once. No atomics, no read-modify-write of global memory. Products take g rounded to the
    input dtype, scaled by ``grad_scale`` (1 / the largest row weight) so float16 keeps its
    precision (read from device memory, like inv_temperature: no host sync)."""
    inv_temperature = tl.load(inv_temperature_ptr)
    grad_scale = tl.load(grad_scale_ptr)
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    positive, positive_raw, anchor_labels, anchor_scale, lse, row_factor, share, sigma_sum = _row_terms(
        rows, row_valid, positive_ptr, positive_raw_ptr, anchor_label_ptr, anchor_scale_ptr, num_positive_ptr,
        row_stats_ptr, row_weight_ptr, label_smoothing, MODE, NORMALIZE, HAS_LABELS, HAS_MARGIN, SMOOTHING)
    acc_d = group * ACC_D + tl.arange(0, ACC_D)
    acc_valid = acc_d < dim
    acc = tl.zeros((BLOCK_M, ACC_D), dtype=tl.float32)
    dtemp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    element = anchor_ptr.dtype.element_ty

    for n0 in range(0, num_candidates, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # 64-bit offsets: N * D may pass 2^31
        col_valid = cols < num_candidates
        raw, candidate_scale = _unit_similarity(
            anchor_ptr, candidate_ptr, candidate_scale_ptr, rows, cols, row_valid, col_valid, dim, anchor_scale,
            NORMALIZE, CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        grad, scores = _grad_tile(
            raw, rows, cols, row_valid, col_valid, n0, positive, positive_raw, anchor_labels, lse, row_factor,
            share, sigma_sum, candidate_label_ptr, positive_raw_ptr, column_lse_ptr, column_count_ptr,
            column_weight_ptr, num_column_anchors, inv_temperature, margin, label_smoothing,
            MODE, EXCLUDE_SELF, HAS_LABELS, HAS_MARGIN, SMOOTHING, FUSED_COLUMNS)
        dtemp += tl.sum(grad * scores, axis=1)
        # gradients wrt the unit vectors (normalize): products with the unit vectors
        c = load_operand(candidate_ptr, cols, col_valid, acc_d, acc_valid, dim, candidate_scale, element,
                         NORMALIZE, CAST_DOT)
        acc = tl.dot(dot_operand(grad * grad_scale, element, CAST_DOT), c, acc, input_precision=DOT_PRECISION)
    acc = acc * (inv_temperature / grad_scale)

    tl.store(d_anchor_ptr + rows[:, None] * dim + acc_d[None, :], acc.to(d_anchor_ptr.dtype.element_ty),
             mask=row_valid[:, None] & acc_valid[None, :])
    if group == 0:
        tl.store(dtemp_ptr + rows, dtemp, mask=row_valid)


@triton.jit
def info_nce_bwd_kernel_private(
    anchor_ptr, private_ptr, anchor_scale_ptr, private_scale_ptr,
    positive_ptr, positive_raw_ptr, anchor_label_ptr, num_positive_ptr, row_stats_ptr, row_weight_ptr,
    d_anchor_ptr, d_private_ptr, dtemp_ptr,
    num_rows, num_private, dim, inv_temperature_ptr, margin, label_smoothing,
    MODE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr,
    SMOOTHING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Hard negatives (never positives): d(private) (R, H, D), their share of d(anchor) added to
    what :func:`info_nce_bwd_kernel_rows` wrote, and their share of dtemp. A kernel of its own
    (after the rows kernel), so the rows kernel's registers go to its main loop."""
    inv_temperature = tl.load(inv_temperature_ptr)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    positive, positive_raw, anchor_labels, anchor_scale, lse, row_factor, share, sigma_sum = _row_terms(
        rows, row_valid, positive_ptr, positive_raw_ptr, anchor_label_ptr, anchor_scale_ptr, num_positive_ptr,
        row_stats_ptr, row_weight_ptr, label_smoothing, MODE, NORMALIZE, HAS_LABELS, HAS_MARGIN, SMOOTHING)
    dtemp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for slot in range(0, num_private):
        scores_h, candidate_h, private_scale = _private_scores(
            anchor_ptr, private_ptr, private_scale_ptr, rows, row_valid, slot, num_private, dim, anchor_scale,
            positive_raw, inv_temperature, margin, NORMALIZE, HAS_MARGIN, BLOCK_M, BLOCK_D)
        grad_h = tl.where(candidate_h, tl.exp(scores_h - lse), 0.0)
        if MODE == 0:
            if SMOOTHING:
                grad_h -= tl.where(candidate_h, share, 0.0)
        if MODE == 2:
            grad_h = grad_h * sigma_sum
        grad_h = grad_h * row_factor
        dtemp += grad_h * scores_h
        coefficient = grad_h * inv_temperature
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = row_valid[:, None] & (d < dim)[None, :]
            h_offsets = (rows[:, None] * num_private + slot) * dim + d[None, :]
            h = tl.load(private_ptr + h_offsets, mask=m, other=0.0).to(tl.float32)
            a = tl.load(anchor_ptr + rows[:, None] * dim + d[None, :], mask=m, other=0.0).to(tl.float32)
            a_ptrs = d_anchor_ptr + rows[:, None] * dim + d[None, :]
            tl.store(a_ptrs, tl.load(a_ptrs, mask=m, other=0.0) + coefficient[:, None] * h * private_scale[:, None], mask=m)
            tl.store(d_private_ptr + h_offsets, coefficient[:, None] * a * anchor_scale[:, None], mask=m)
    tl.store(dtemp_ptr + rows, dtemp, mask=row_valid)


@tile_kernel("columns", grid_size="num_candidates", grid_block="BLOCK_N")
@triton.jit
def info_nce_bwd_kernel_columns(
    anchor_ptr, candidate_ptr,
    anchor_scale_ptr, candidate_scale_ptr,
    positive_ptr, positive_raw_ptr, anchor_label_ptr, candidate_label_ptr, num_positive_ptr,
    row_stats_ptr, row_weight_ptr, column_lse_ptr, column_count_ptr, column_weight_ptr,
    d_candidate_ptr,
    num_rows, num_candidates, dim, num_column_anchors,
    inv_temperature_ptr, margin, label_smoothing, grad_scale_ptr,
    MODE: tl.constexpr, STAGE: tl.constexpr, NORMALIZE: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MARGIN: tl.constexpr, SMOOTHING: tl.constexpr,
    FUSED_COLUMNS: tl.constexpr, CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d(candidate) (M, D) fp32: program (j, group) owns BLOCK_N candidates and the embedding
    columns of its group, walks over every anchor tile, recomputes the same g tiles as
    :func:`info_nce_bwd_kernel_rows` and accumulates g^T @ a on chip. Deterministic (no atomics)."""
    inv_temperature = tl.load(inv_temperature_ptr)
    grad_scale = tl.load(grad_scale_ptr)
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    n0 = pid * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_valid = cols < num_candidates
    acc_d = group * ACC_D + tl.arange(0, ACC_D)
    acc_valid = acc_d < dim
    acc = tl.zeros((BLOCK_N, ACC_D), dtype=tl.float32)
    element = anchor_ptr.dtype.element_ty

    for m0 in range(0, num_rows, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_valid = rows < num_rows
        positive, positive_raw, anchor_labels, anchor_scale, lse, row_factor, share, sigma_sum = _row_terms(
            rows, row_valid, positive_ptr, positive_raw_ptr, anchor_label_ptr, anchor_scale_ptr, num_positive_ptr,
            row_stats_ptr, row_weight_ptr, label_smoothing, MODE, NORMALIZE, HAS_LABELS, HAS_MARGIN, SMOOTHING)
        raw, _ = _unit_similarity(anchor_ptr, candidate_ptr, candidate_scale_ptr, rows, cols, row_valid, col_valid,
                                  dim, anchor_scale, NORMALIZE, CAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        grad, scores = _grad_tile(
            raw, rows, cols, row_valid, col_valid, n0, positive, positive_raw, anchor_labels, lse, row_factor,
            share, sigma_sum, candidate_label_ptr, positive_raw_ptr, column_lse_ptr, column_count_ptr,
            column_weight_ptr, num_column_anchors, inv_temperature, margin, label_smoothing,
            MODE, EXCLUDE_SELF, HAS_LABELS, HAS_MARGIN, SMOOTHING, FUSED_COLUMNS)
        a = load_operand(anchor_ptr, rows, row_valid, acc_d, acc_valid, dim, anchor_scale, element, NORMALIZE, CAST_DOT)
        acc = tl.dot(tl.trans(dot_operand(grad * grad_scale, element, CAST_DOT)), a, acc,
                     input_precision=DOT_PRECISION)
    acc = acc * (inv_temperature / grad_scale)
    tl.store(d_candidate_ptr + cols[:, None] * dim + acc_d[None, :], acc.to(d_candidate_ptr.dtype.element_ty),
             mask=col_valid[:, None] & acc_valid[None, :])


# --------------------------------------------------------------------------------------------
# Host side


def _grid(rows):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),)


def pair_dot(a: torch.Tensor, b: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 (R,) with a[r] . b[index[r]] (or b[r]); a, b contiguous (*, D)."""
    rows, dim = a.shape
    out = torch.empty(rows, dtype=torch.float32, device=a.device)
    block_r = 32
    info_nce_fwd_kernel_pair_dot[(triton.cdiv(rows, block_r),)](
        a, b, index if index is not None else a, out, rows, dim,
        HAS_INDEX=index is not None, BLOCK_R=block_r, BLOCK_D=64 if a.device.type != "cpu" else 32,
    )
    return out


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / max(|x_r|, eps) in fp32 for the rows of a contiguous (*, D) tensor."""
    flat = x.reshape(-1, x.shape[-1])
    return 1.0 / pair_dot(flat, flat).sqrt().clamp_min(NORM_EPS)


@dataclass
class _Direction:
    """One direction (anchors against candidates) as the kernels see it."""

    anchors: torch.Tensor  # (R, D) contiguous, input dtype
    candidates: torch.Tensor  # (M, D)
    private: Optional[torch.Tensor]  # (R, H, D)
    anchor_scale: Optional[torch.Tensor]  # (R,) fp32 inverse norms when normalize
    candidate_scale: Optional[torch.Tensor]
    private_scale: Optional[torch.Tensor]  # (R, H)
    positive: Optional[torch.Tensor]  # (R,) int64, mask mode
    positive_raw: Optional[torch.Tensor]  # (R,) fp32 similarity to the positive (margin, symmetric shift)
    anchor_labels: Optional[torch.Tensor]
    candidate_labels: Optional[torch.Tensor]
    num_positive: Optional[torch.Tensor]  # (R,) int64, supcon / pairwise
    divisor: object  # what "mean" divides the direction's total by: a float, or a device tensor (supcon / pairwise)
    exclude_self: bool
    fused_columns: int = 0  # B when the key->query direction rides along (symmetric, mask mode)


def _flags(direction: _Direction, options: InfoNCEOptions, stage: int) -> dict:
    cast, precision = dot_settings(direction.anchors)
    return dict(
        MODE=MODES[options.multi_positive], STAGE=stage, HAS_PRIVATE=direction.private is not None,
        NORMALIZE=options.normalize, EXCLUDE_SELF=direction.exclude_self,
        HAS_LABELS=direction.anchor_labels is not None,
        HAS_MARGIN=options.margin is not None, SMOOTHING=options.label_smoothing > 0,
        FUSED_COLUMNS=direction.fused_columns > 0, HAS_FILTER=False, CAST_DOT=cast, DOT_PRECISION=precision,
    )


def deterministic_requested() -> bool:
    """``torch.use_deterministic_algorithms(True)``: the symmetric loss's key->query direction
    runs as a pass of its own instead of riding along with atomics (bit-reproducible)."""
    return torch.are_deterministic_algorithms_enabled()


def device_inverse_temperature(temperature: torch.Tensor, device) -> torch.Tensor:
    """1 / temperature as a (1,) fp32 tensor on ``device`` for the kernels to read: a CPU
    temperature (a Python float) is read on the host, a device one stays on the device, so
    neither costs a host synchronization (and both can be captured in a CUDA graph)."""
    temperature = temperature.detach().reshape(1)
    if temperature.device.type == "cpu":
        return torch.full((1,), 1.0 / float(temperature), dtype=torch.float32, device=device)
    return torch.reciprocal(temperature.to(device=device, dtype=torch.float64)).to(torch.float32)


def _pointers(direction: _Direction):
    anchors = direction.anchors
    return [
        anchors, direction.candidates, direction.private if direction.private is not None else anchors,
        *(t if t is not None else anchors for t in (direction.anchor_scale, direction.candidate_scale, direction.private_scale)),
        direction.positive if direction.positive is not None else anchors,
        direction.positive_raw if direction.positive_raw is not None else anchors,
        direction.anchor_labels if direction.anchor_labels is not None else anchors,
        direction.candidate_labels if direction.candidate_labels is not None else anchors,
    ]


def _sizes(direction: _Direction):
    private = direction.private.shape[1] if direction.private is not None else 0
    return [direction.anchors.shape[0], direction.candidates.shape[0], private, direction.anchors.shape[1],
            direction.fused_columns]


def _prepare(query, key, hard_negatives, positive, labels, key_labels, options: InfoNCEOptions) -> List[_Direction]:
    q = query.contiguous()
    k = key.contiguous()
    h = hard_negatives.contiguous() if hard_negatives is not None and hard_negatives.shape[1] > 0 else None
    batch = q.shape[0]
    q_scale = k_scale = h_scale = None
    if options.normalize:
        q_scale, k_scale = inverse_norms(q), inverse_norms(k)
        h_scale = inverse_norms(h).view(h.shape[0], h.shape[1]) if h is not None else None
    mode = options.multi_positive
    if mode == MASK:
        if positive is None:
            positive = torch.arange(batch, device=q.device)
        positive = positive.contiguous()
        positive_raw = None
        if options.margin is not None or options.symmetric:
            positive_raw = pair_dot(q, k, positive)
            if options.normalize:
                positive_raw = positive_raw * q_scale * k_scale[positive]
        if labels is not None:
            labels, key_labels = labels.contiguous(), key_labels.contiguous()
        fused = options.symmetric and not deterministic_requested()
        row = _Direction(q, k, h, q_scale, k_scale, h_scale, positive, positive_raw, labels, key_labels, None,
                         float(batch), options.exclude_self, batch if fused else 0)
        if options.symmetric and not fused:  # deterministic: no atomics, the columns as a direction of their own
            return [row, _column_direction(row)]
        return [row]
    directions = []
    pairs = [(q, k, h, q_scale, k_scale, h_scale, labels, key_labels)]
    if options.symmetric:
        pairs.append((k[:batch], q, None, k_scale[:batch] if k_scale is not None else None, q_scale, None,
                      key_labels[:batch], labels))
    for anchors, candidates, private, a_scale, c_scale, p_scale, a_labels, c_labels in pairs:
        num_positive = count_positives(a_labels, c_labels, options.exclude_self)
        # a device tensor: reading it on the host would be a sync
        if mode == SUPCON:
            divisor = (num_positive > 0).sum().to(torch.float32)
        else:
            divisor = num_positive.sum().to(torch.float32)
        directions.append(_Direction(anchors, candidates, private, a_scale, c_scale, p_scale, None, None,
                                     a_labels.contiguous(), c_labels.contiguous(), num_positive.contiguous(),
                                     divisor, options.exclude_self))
    return directions


def _column_direction(row: _Direction) -> _Direction:
    """The key->query direction of a symmetric loss as a direction of its own (deterministic
    mode: its forward and backward passes both read the transposed tiles)."""
    batch = row.anchors.shape[0]
    return _Direction(row.candidates[:batch], row.anchors, None,
                      row.candidate_scale[:batch] if row.candidate_scale is not None else None, row.anchor_scale,
                      None, torch.arange(batch, device=row.anchors.device), row.positive_raw,
                      row.candidate_labels[:batch] if row.candidate_labels is not None else None, row.anchor_labels,
                      None, float(batch), False)


# The column sums of the fused symmetric pass are shifted by
#     shift_j = max(s_jj, bound_j * (1 + 2^-7) - 80),   bound_j = max_i |a_i| |c_j| / tau >= max_i s_ij,
# so no term exceeds exp(80) (fp32 overflows past 88.7; 2^-7 covers the products' rounding). A
# column sum can then only underflow (below 2^-100) when the bound exceeds the column's largest
# score by more than 167: those columns are recomputed with an online max by a launch filtered
# on the device, so no host synchronization decides anything.
_SHIFT_HEADROOM = 80.0
_BOUND_ROUNDING = 1.0 + 2.0 ** -7
_UNDERFLOW = 2.0 ** -100


def _row_norms(x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """|x_r| in fp32 (of the unit vectors when ``scale`` holds the inverse norms)."""
    norms = pair_dot(x, x).clamp_min(0).sqrt()
    return norms * scale if scale is not None else norms


def _column_shift(direction: _Direction, inv_temperature: torch.Tensor) -> torch.Tensor:
    batch = direction.fused_columns
    diagonal = direction.positive_raw[:batch] * inv_temperature
    anchor_norm = _row_norms(direction.anchors, direction.anchor_scale).max()
    candidate_norm = _row_norms(direction.candidates[:batch], direction.candidate_scale[:batch]
                                if direction.candidate_scale is not None else None)
    bound = anchor_norm * candidate_norm * inv_temperature * _BOUND_ROUNDING
    return torch.maximum(diagonal, bound - _SHIFT_HEADROOM).contiguous()


def _run_forward(direction: _Direction, options: InfoNCEOptions, inv_temperature: torch.Tensor):
    """Launch the forward kernel(s). Returns (row_stats (R, 4), column_stats (B, 3) or None, column_shift)."""
    rows = direction.anchors.shape[0]
    device = direction.anchors.device
    row_stats = torch.zeros(rows, 4, dtype=torch.float32, device=device)
    column_stats = column_shift = None
    if direction.fused_columns:
        column_shift = _column_shift(direction, inv_temperature)
        column_stats = torch.zeros(direction.fused_columns, 3, dtype=torch.float32, device=device)
    stages = (1, 2) if options.multi_positive == PAIRWISE else (1,)
    margin = options.margin if options.margin is not None else 0.0
    # never alias row_stats here: the second pairwise stage reads row_stats
    unused = torch.zeros(1, dtype=torch.float32, device=device)
    for stage in stages:
        info_nce_fwd_kernel_rows[_grid(rows)](
            *_pointers(direction), row_stats,
            column_shift if column_shift is not None else unused,
            column_stats if column_stats is not None else unused, unused,
            *_sizes(direction), inv_temperature, margin, **_flags(direction, options, stage),
        )
    return row_stats, column_stats, column_shift


def _recompute_columns(direction: _Direction, options: InfoNCEOptions, inv_temperature: torch.Tensor,
                       column_filter: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 LSE of the fused key->query direction for the columns with column_filter != 0
    (int8, on the device; the others 0), with an online max: one launch, a program per BLOCK_N
    columns, that walks no tile where its columns need nothing. It reads the row direction's
    own tiles (see :func:`_filtered_column_lse`), not the transposed product."""
    batch = direction.fused_columns
    device = direction.anchors.device
    column_lse = torch.zeros(batch, 4, dtype=torch.float32, device=device)  # LSE in column 0
    unused = torch.zeros(1, dtype=torch.float32, device=device)
    margin = options.margin if options.margin is not None else 0.0
    # the filtered pass reads only NORMALIZE, HAS_LABELS, HAS_MARGIN and the product settings
    flags = dict(_flags(direction, options, 1), HAS_PRIVATE=False, EXCLUDE_SELF=False, SMOOTHING=False,
                 FUSED_COLUMNS=False, HAS_FILTER=True)
    info_nce_fwd_kernel_rows[lambda meta: (triton.cdiv(batch, meta["BLOCK_N"]),)](
        *_pointers(direction), column_lse, unused, unused, column_filter,
        *_sizes(direction), inv_temperature, margin, **flags,
    )
    return column_lse[:, 0]


def _row_losses(direction: _Direction, row_stats: torch.Tensor, options: InfoNCEOptions) -> torch.Tensor:
    lse, positive_sum, candidate_sum, candidate_count = row_stats.unbind(1)
    mode = options.multi_positive
    if mode == MASK:
        eps = options.label_smoothing
        loss = lse - (1.0 - eps) * positive_sum
        if eps > 0:
            loss = loss - eps * candidate_sum / candidate_count.clamp_min(1.0)
        return loss
    if mode == SUPCON:
        valid = direction.num_positive > 0
        loss = lse - positive_sum / direction.num_positive.clamp_min(1).to(torch.float32)
        return torch.where(valid, loss, torch.zeros_like(loss))
    return positive_sum  # pairwise: stage 2 wrote the summed terms there


class _Forward:
    """Everything the backward pass needs from the forward pass, all O(B)."""

    def __init__(self, directions: List[_Direction], options: InfoNCEOptions, inv_temperature: torch.Tensor):
        self.directions = directions
        self.losses = []  # per direction (R,) fp32
        self.row_stats = []
        self.column_lse = self.column_count = None
        for direction in directions:
            row_stats, column_stats, column_shift = _run_forward(direction, options, inv_temperature)
            self.row_stats.append(row_stats)
            self.losses.append(_row_losses(direction, row_stats, options))
            if column_stats is not None:
                self._finish_columns(direction, row_stats, column_stats, column_shift, options, inv_temperature)

    def _finish_columns(self, direction, row_stats, column_stats, column_shift, options, inv_temperature):
        shifted_sum, candidate_sum, candidate_count = column_stats.unbind(1)
        eps = options.label_smoothing
        # column j's positive s_jj is row j's (symmetric: positive = arange): the tile's value, which
        # the LSE was formed from (pair_dot rounds it differently: at |s| = 1e4 a loss of 0 came out
        # as -7e-6)
        positive_score = row_stats[:, 1]
        # columns whose sum underflowed the shift (or is NaN) are recomputed with an online max, by
        # a launch that does nothing when none did (decided on the device)
        underflowed = ~(shifted_sum >= _UNDERFLOW)
        recomputed = _recompute_columns(direction, options, inv_temperature, underflowed.to(torch.int8))
        lse = torch.where(underflowed, recomputed, column_shift + torch.log(shifted_sum))
        loss = lse - (1.0 - eps) * positive_score
        if eps > 0:
            loss = loss - eps * candidate_sum / candidate_count.clamp_min(1.0)
        self.column_lse = lse.contiguous()
        self.column_count = candidate_count.contiguous()
        self.losses.append(loss)

    def divisors(self) -> list:
        """What "mean" divides each direction's total by: floats, or device tensors (supcon /
        pairwise count positives on the device)."""
        divisors = [d.divisor for d in self.directions]
        if self.column_lse is not None:
            divisors.append(float(self.column_lse.shape[0]))
        return divisors

    def reduce(self, reduction: str) -> torch.Tensor:
        if reduction == "none":
            return self.losses[0] if len(self.losses) == 1 else 0.5 * (self.losses[0] + self.losses[1])
        totals = []
        for loss, divisor in zip(self.losses, self.divisors()):
            total = loss.sum()
            if reduction == "mean":
                total = _divide(total, divisor)
            totals.append(total)
        return totals[0] if len(totals) == 1 else 0.5 * (totals[0] + totals[1])

    def weights(self, options: InfoNCEOptions, grad_rows: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """dL_total / dL_row for every direction's rows (fp32)."""
        scale = 0.5 if len(self.losses) == 2 else 1.0
        out = []
        for loss, divisor in zip(self.losses, self.divisors()):
            if options.reduction == "none":
                out.append((grad_rows[: loss.shape[0]].to(torch.float32) * scale).contiguous())
                continue
            value = scale
            if options.reduction == "mean":
                value = _divide(scale, divisor)
            if isinstance(value, torch.Tensor):
                out.append((torch.zeros_like(loss) + value).contiguous())
            else:
                out.append(torch.full_like(loss, value))
        return out


def _divide(total, divisor):
    """total / divisor, 0 where divisor is 0; divisor a float or a device tensor (no host read)."""
    if isinstance(divisor, torch.Tensor):
        return torch.where(divisor > 0, total / divisor.clamp_min(1.0), torch.zeros_like(divisor))
    return total / divisor if divisor > 0 else total * 0.0


# float16 gradient tiles are scaled by this (past the largest row weight) before they are rounded
# for the tensor-core product, so probabilities down to 1.5e-11 keep their value instead of
# flushing to zero below float16's 6e-8; |g| <= 2 per weight in mask / supcon mode, so
# 2 * 2^12 * (1 + smoothing) stays far below float16's 65504. Pairwise tiles (sigma_sum up to
# the number of positives) keep the plain scale.
FLOAT16_GRAD_SCALE = 2.0 ** 12


def _grad_scale(weights: List[torch.Tensor], options: InfoNCEOptions, dtype: torch.dtype) -> torch.Tensor:
    """(1,) fp32 on the device: 1 / the largest row weight (x FLOAT16_GRAD_SCALE for float16), from
    device tensors without reading them on the host."""
    largest = torch.stack([w.abs().max() if w.numel() else w.new_zeros(()) for w in weights]).max()
    scale = torch.where(largest > 0, 1.0 / largest.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(largest))
    if dtype == torch.float16 and options.multi_positive != PAIRWISE:
        scale = scale * FLOAT16_GRAD_SCALE
    return scale.reshape(1).to(torch.float32).contiguous()


def _run_backward(forward: _Forward, options: InfoNCEOptions, inv_temperature: torch.Tensor,
                  weights: List[torch.Tensor]):
    """Gradients wrt the (unit, when normalize) inputs: per direction (d_anchor, d_candidate, d_private) fp32, and sum g*s.

    Two kernels per direction, each recomputing the similarity tiles: one owns anchor rows
    (d_anchor, dtemp), the other owns candidates (d_candidate); every gradient is accumulated on
    chip and written once, without atomics. A third, light kernel adds the hard negatives."""
    grad_scale = _grad_scale(weights, options, forward.directions[0].anchors.dtype)
    margin = options.margin if options.margin is not None else 0.0
    results = []
    dtemp_total = torch.zeros((), dtype=torch.float32, device=weights[0].device)
    for index, direction in enumerate(forward.directions):
        rows, dim = direction.anchors.shape
        num_candidates = direction.candidates.shape[0]
        device = direction.anchors.device
        # the kernels write the gradients in the inputs' dtype when nothing comes after them (no
        # normalization to go back through, no second direction or hard negatives to add)
        direct = not options.normalize and len(forward.directions) == 1 and direction.private is None
        grad_dtype = direction.anchors.dtype if direct else torch.float32
        d_anchor = torch.empty(rows, dim, dtype=grad_dtype, device=device)
        d_candidate = torch.empty(direction.candidates.shape, dtype=grad_dtype, device=device)
        d_private = torch.empty(direction.private.shape, dtype=torch.float32, device=device) if direction.private is not None else None
        dtemp = torch.empty(rows, dtype=torch.float32, device=device)
        fused = direction.fused_columns > 0
        row_stats = forward.row_stats[index]
        statistics = [
            direction.num_positive if direction.num_positive is not None else row_stats, row_stats, weights[index],
            forward.column_lse if fused else row_stats, forward.column_count if fused else row_stats,
            weights[1] if fused else row_stats,
        ]
        flags = _flags(direction, options, 2 if options.multi_positive == PAIRWISE else 1)
        del flags["HAS_FILTER"]
        scalars = (inv_temperature, margin, options.label_smoothing, grad_scale)
        anchors, candidates, private, anchor_scale, candidate_scale, private_scale, *rest = _pointers(direction)
        tile_flags = {name: value for name, value in flags.items() if name != "HAS_PRIVATE"}
        info_nce_bwd_kernel_rows[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(dim, meta["ACC_D"]))](
            anchors, candidates, anchor_scale, candidate_scale, *rest, *statistics, d_anchor, dtemp,
            rows, num_candidates, dim, direction.fused_columns, *scalars, **tile_flags,
        )
        info_nce_bwd_kernel_columns[
            lambda meta: (triton.cdiv(num_candidates, meta["BLOCK_N"]), triton.cdiv(dim, meta["ACC_D"]))
        ](
            anchors, candidates, anchor_scale, candidate_scale, *rest, *statistics, d_candidate,
            rows, num_candidates, dim, direction.fused_columns, *scalars, **tile_flags,
        )
        if d_private is not None:  # after the rows kernel: adds to d_anchor
            positive, positive_raw, anchor_labels, _ = rest
            dtemp_private = torch.empty(rows, dtype=torch.float32, device=device)
            block_m, block_d = (16, 32) if device.type == "cpu" else (32, 64)
            info_nce_bwd_kernel_private[(triton.cdiv(rows, block_m),)](
                anchors, private, anchor_scale, private_scale, positive, positive_raw, anchor_labels, statistics[0],
                row_stats, weights[index], d_anchor, d_private, dtemp_private,
                rows, direction.private.shape[1], dim, inv_temperature, margin, options.label_smoothing,
                MODE=flags["MODE"], NORMALIZE=flags["NORMALIZE"], HAS_LABELS=flags["HAS_LABELS"],
                HAS_MARGIN=flags["HAS_MARGIN"], SMOOTHING=flags["SMOOTHING"], BLOCK_M=block_m, BLOCK_D=block_d,
                num_warps=8,  # ptxas (sm_90): no spills at 32 x 64 with 8 warps, 128-316 bytes with 4
            )
            dtemp += dtemp_private
        results.append((d_anchor, d_candidate, d_private))
        dtemp_total = dtemp_total + dtemp.sum()
    return results, dtemp_total


def _input_gradients(directions, results, dtemp, inv_temperature, inputs, temperature_meta):
    """Combine the directions, go back through the normalization, cast to the inputs' dtypes."""
    query, key, hard_negatives = inputs
    row = directions[0]
    d_query, d_key, d_private = results[0]
    if len(results) == 2:  # composed symmetric: anchors = key[:B], candidates = query
        batch = query.shape[0]
        d_key[:batch] += results[1][0]
        d_query += results[1][1]

    def back(grad, x, scale):
        if scale is None:
            return grad
        norm = (1.0 / scale).reshape(-1, 1)
        unit = x.reshape(-1, x.shape[-1]).to(torch.float32) * scale.reshape(-1, 1)
        return _normalize_backward(grad.reshape(unit.shape), unit, norm).reshape(grad.shape)

    grad_query = back(d_query, row.anchors, row.anchor_scale).to(query.dtype)
    grad_key = back(d_key, row.candidates, row.candidate_scale).to(key.dtype)
    grad_hard = None
    if hard_negatives is not None:
        if d_private is None:  # H == 0
            grad_hard = torch.zeros_like(hard_negatives)
        else:
            grad_hard = back(d_private, row.private, row.private_scale).to(hard_negatives.dtype)
    grad_temperature = None
    if temperature_meta is not None:
        shape, dtype, device = temperature_meta
        grad_temperature = (-dtemp * inv_temperature).to(device=device, dtype=dtype).reshape(shape)
    return grad_query, grad_key, grad_hard, grad_temperature


def triton_forward(query, key, hard_negatives, temperature: torch.Tensor, positive, labels, key_labels,
                   options: InfoNCEOptions, compute_grads: bool):
    """Loss and, when ``compute_grads``, the gradients of the scalar loss wrt (query, key,
    hard_negatives, temperature), computed in this forward pass. The body of the
    ``fastcl::info_nce_forward`` custom op for ``backend="triton"``; arguments validated.
    Nothing here reads a device tensor on the host (no synchronization)."""
    inv_temperature = device_inverse_temperature(temperature, query.device)
    with torch.no_grad(), triton_common.device_guard(query.device):
        directions = _prepare(query, key, hard_negatives, positive, labels, key_labels, options)
        forward = _Forward(directions, options, inv_temperature)
        loss = forward.reduce(options.reduction)
        grads = None
        if compute_grads:
            results, dtemp = _run_backward(forward, options, inv_temperature, forward.weights(options, None))
            grads = _input_gradients(directions, results, dtemp, inv_temperature, (query, key, hard_negatives),
                                     temperature_meta(temperature))
    return loss, grads


def triton_backward(query, key, hard_negatives, temperature: torch.Tensor, positive, labels, key_labels,
                    options: InfoNCEOptions, grad_output: torch.Tensor):
    """Gradients wrt (query, key, hard_negatives, temperature) given dL_total/dloss. The forward
    statistics (O(B)) are recomputed with one forward pass, then one backward pass."""
    inv_temperature = device_inverse_temperature(temperature, query.device)
    per_row = options.reduction == "none"
    with torch.no_grad(), triton_common.device_guard(query.device):
        directions = _prepare(query, key, hard_negatives, positive, labels, key_labels, options)
        forward = _Forward(directions, options, inv_temperature)
        weights = forward.weights(options, grad_output.reshape(-1) if per_row else None)
        results, dtemp = _run_backward(forward, options, inv_temperature, weights)
        grads = _input_gradients(directions, results, dtemp, inv_temperature, (query, key, hard_negatives),
                                 temperature_meta(temperature))
        if not per_row:  # gradients of the unit loss, scaled
            grads = scale_gradients(grads, grad_output)
    return grads
