"""Symmetric (CLIP) InfoNCE in two passes on the native CPU kernels: four products, not six.

The chunked driver runs a symmetric loss as two directions, each with one product for the
similarities and two for the gradients. For the plain CLIP loss (the positive of row i is key i
in both directions; no labels, margin, smoothing, self exclusion or hard negatives) both
directions come from the same blocks of S = Q K^T:

* pass 1, one product per row block: each row's max and sum of exp and its own similarity, and
  the running max and sum of exp of every column of the batch (csrc/cpu/info_nce_symmetric.cpp);
* pass 2, the block again: dL/dS of both directions written in place, then dQ = G K and
  dK += G^T Q.

Memory stays O(B·D) plus O(B) statistics; the block buffer is the driver's.

When a statistic of pass 1 is not finite (NaN or +-inf among the similarities), the loss is
recomputed direction by direction with the row kernel, which sends such rows through the
reference-faithful PyTorch formulas (native.py), so non-finite values land exactly where the
naive reference puts them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._native import typed_kernel
from ..common.blocks import similarity_blocks
from .chunked import Direction, run_direction
from .native import native_row_kernel
from .options import MASK, InfoNCEOptions


def two_pass_applies(options: InfoNCEOptions, positive, labels, key_labels, hard_negatives) -> bool:
    """Whether the loss is the plain symmetric one the two-pass kernels compute."""
    no_hard_negatives = hard_negatives is None or hard_negatives.shape[1] == 0
    return (options.symmetric and options.multi_positive == MASK and positive is None and labels is None
            and key_labels is None and options.margin is None and options.label_smoothing == 0
            and not options.exclude_self and no_hard_negatives)


def two_pass_symmetric(
    q: torch.Tensor,
    k: torch.Tensor,
    inv_temperature: float,
    weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    grads_out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
):
    """(row losses, column losses, dtemp_sum) of the symmetric loss of q (B, D) against k (N, D),
    N >= B, both float32 or both float64 CPU tensors, already normalized when asked.

    With ``weights`` = (row weights (B,), column weights (B,)), the gradients wrt q and k are
    *added* to ``grads_out`` = (dq, dk) and dtemp_sum = sum_ij dL/dS_ij * S_ij; without, no
    gradient pass runs and dtemp_sum is zero.
    """
    statistics = typed_kernel("info_nce_symmetric_statistics", q.dtype)
    gradient = typed_kernel("info_nce_symmetric_gradient", q.dtype)
    batch, cols = q.shape[0], k.shape[0]
    dtype = q.dtype
    threads = torch.get_num_threads()
    row_max = torch.empty(batch, dtype=dtype)
    row_sum = torch.empty(batch, dtype=dtype)
    diagonal = torch.empty(batch, dtype=dtype)
    column_max = torch.full((batch,), float("-inf"), dtype=dtype)
    column_sum = torch.zeros(batch, dtype=dtype)
    for row0, row1, block in similarity_blocks(q, k):
        statistics(similarity=block.data_ptr(), ld=block.stride(0), rows=row1 - row0, cols=cols, row0=row0,
                   tracked=batch, inv_temperature=inv_temperature, row_max_out=row_max[row0:].data_ptr(),
                   row_sum_out=row_sum[row0:].data_ptr(), diagonal_out=diagonal[row0:].data_ptr(), column_max=column_max.data_ptr(),
                   column_sum=column_sum.data_ptr(), num_threads=threads)
    if not all(bool(torch.isfinite(t).all()) for t in (row_max, row_sum, column_max, column_sum)):
        return _per_direction(q, k, inv_temperature, weights, grads_out)
    # maxima and diagonal are raw similarities: loss = (max - S_ii) / tau + log(sum)
    row_loss = (row_max - diagonal) * inv_temperature + torch.log(row_sum)
    column_loss = (column_max - diagonal) * inv_temperature + torch.log(column_sum)
    dtemp = torch.zeros(batch, dtype=dtype)
    if weights is None:
        return row_loss, column_loss, dtemp.sum()
    row_weights, column_weights = (w.to(dtype) for w in weights)
    row_factor = row_weights * inv_temperature / row_sum
    column_factor = column_weights * inv_temperature / column_sum
    positive = (row_weights + column_weights) * inv_temperature
    dq, dk = grads_out
    for row0, row1, block in similarity_blocks(q, k):
        gradient(similarity=block.data_ptr(), ld=block.stride(0), rows=row1 - row0, cols=cols, row0=row0,
                 tracked=batch, inv_temperature=inv_temperature, row_max=row_max[row0:].data_ptr(),
                 row_factor=row_factor[row0:].data_ptr(), column_max=column_max.data_ptr(),
                 column_factor=column_factor.data_ptr(), positive=positive[row0:].data_ptr(), dtemp_out=dtemp[row0:].data_ptr(),
                 num_threads=threads)
        dq[row0:row1].addmm_(block, k)
        dk.addmm_(block.T, q[row0:row1])
    return row_loss, column_loss, dtemp.sum()


def _per_direction(q, k, inv_temperature: float, weights, grads_out):
    """The same loss by the chunked driver, one direction at a time (the non-finite case)."""
    batch = q.shape[0]
    index = torch.arange(batch)
    rows = Direction(q, k, None, index, None, None, None, float(batch), False)
    columns = Direction(k[:batch], q, None, index, None, None, None, float(batch), False)
    options = InfoNCEOptions(symmetric=True)
    if weights is None:
        row_loss = run_direction(rows, options, inv_temperature, native_row_kernel, None)[0]
        column_loss = run_direction(columns, options, inv_temperature, native_row_kernel, None)[0]
        return row_loss, column_loss, torch.zeros((), dtype=q.dtype)
    dq, dk = grads_out
    row_loss, _, row_dtemp = run_direction(rows, options, inv_temperature, native_row_kernel, weights[0],
                                           (dq, dk, None))
    column_loss, _, column_dtemp = run_direction(columns, options, inv_temperature, native_row_kernel, weights[1],
                                                 (dk[:batch], dq, None))
    return row_loss, column_loss, row_dtemp + column_dtemp
