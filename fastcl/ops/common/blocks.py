"""Row blocks of similarities: how many rows fit the block budget, the reused-buffer block
iterator, and the flush of tiny exponentials the native kernels also apply."""
from __future__ import annotations

import math
import os

import torch

NORM_EPS = 1e-12
DEFAULT_BLOCK_BYTES = 8 * 2**20
ACCELERATOR_BLOCK_BYTES = 256 * 2**20  # off the CPU: far larger blocks keep a GPU busy
# exp(x - max) below these is flushed to 0, as the native kernels do (csrc/cpu/fast_math.h:
# 2^-64 in float32, 2^-93 in float64, far below what can change a result at that precision),
# so no subnormal (or normal but tiny value whose products are subnormal) enters a gradient product.
EXP_FLUSH = {torch.float32: 2.0**-64, torch.float64: 2.0**-93}


def flush_tiny(probabilities: torch.Tensor) -> torch.Tensor:
    """Sets entries below the flush threshold to exactly 0, in place (NaN stays NaN)."""
    threshold = EXP_FLUSH.get(probabilities.dtype)
    if threshold is not None:
        probabilities.masked_fill_(probabilities < threshold, 0.0)
    return probabilities


def exp_flushed_(exponents: torch.Tensor) -> torch.Tensor:
    """``flush_tiny(exponents.exp_())``, in place, without PyTorch's slow path: ``exp`` of
    arguments far below the flush threshold (raw dot products at a small temperature: most of a
    tile sits below -87) runs some 10x slower than in range, so they are raised to just under the
    threshold first, where their exponentials are flushed to 0 all the same (NaN and +inf stay)."""
    return flush_tiny(_clamped_exp_(exponents))


def _clamped_exp_(exponents: torch.Tensor) -> torch.Tensor:
    """``exp_`` with the arguments below the flush threshold's logarithm raised to just under it."""
    threshold = EXP_FLUSH.get(exponents.dtype)
    if threshold is not None:
        exponents.clamp_(min=math.log(threshold) - 1.0)
    return exponents.exp_()


def logsumexp_flushed(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.logsumexp(values, dim)`` (within rounding; the same -inf, +inf and NaN) without
    the slow path of ``exp`` that torch's own runs over terms far below the largest (the bulk of
    a tile of raw dot products at a small temperature): those are raised to about the flush
    threshold (2^-65 in float32) relative to the largest, whose own term is 1, so the sum moves
    by less than N * 2^-65 relative."""
    largest = values.amax(dim, keepdim=True)
    shift = torch.where(torch.isfinite(largest), largest, torch.zeros_like(largest))
    return _clamped_exp_(values - shift).sum(dim).log_().add_(shift.squeeze(dim))


def block_rows_for(num_columns: int, bytes_per_element: int, budget: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that one block of similarities fits ``budget`` bytes."""
    override = os.environ.get("FASTCL_BLOCK_ROWS")
    if override:
        return max(1, int(override))
    return max(1, budget // max(1, num_columns * bytes_per_element))


def similarity_blocks(anchors: torch.Tensor, candidates: torch.Tensor):
    """Yields (row0, row1, block): block = anchors[row0:row1] @ candidates.T, for consecutive row
    blocks sized by :func:`block_rows_for`, each computed into the same reused buffer (a block
    is overwritten by the next one, so it is used, or changed in place, before the loop goes on)."""
    rows, cols = anchors.shape[0], candidates.shape[0]
    step = min(rows, block_rows_for(cols, anchors.element_size()))
    buffer = torch.empty(step, cols, dtype=anchors.dtype, device=anchors.device)
    candidates_t = candidates.T
    for row0 in range(0, rows, step):
        row1 = min(rows, row0 + step)
        block = buffer[: row1 - row0]
        torch.mm(anchors[row0:row1], candidates_t, out=block)
        yield row0, row1, block
