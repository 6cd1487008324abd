"""Ring exchange for :mod:`fastcl.distributed` (``mode="ring"``): each rank keeps its own rows,
and candidate blocks travel around the ring of ranks instead of being all-gathered.

Forward: at step t rank r holds the candidate block of rank (r - t) mod R, sends it on to r + 1
while it computes the tile of its local anchors against that block, and merges the tile's row
log-sum-exp into a running one (the positive logit comes from its own block). For a symmetric
loss the same tile also serves the column direction: the block's columns' log-sum-exp travels
with the block (the local anchors are their candidates here), and after R steps one last hop
returns each block's complete column statistics to its owner. Backward: the blocks travel the
same way again, with their column statistics, each followed one hop behind by the gradient of
its rows, which every rank adds to; one last hop returns it to its owner.

Memory per rank: the local rows, two candidate blocks (the one computed on and the one arriving)
with their gradients, and slices of one local x block tile (or none: the fused tile kernels keep
it on chip): flat in the number of ranks.
Work per rank and block: one tile forward, three backward (recompute, anchor and block
gradients), for both directions of a symmetric loss at once.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .ops.common.blocks import (ACCELERATOR_BLOCK_BYTES, DEFAULT_BLOCK_BYTES, block_rows_for, exp_flushed_, flush_tiny,
                                logsumexp_flushed)
from .ops.common.gradients import compute_dtype

# FASTCL_RING_TILES=torch keeps the ring's tiles on PyTorch ops everywhere; =triton runs the
# fused tile kernels on the CPU too (the Triton interpreter, for tests). Read at import.
_RING_TILES = os.environ.get("FASTCL_RING_TILES") or None


def _start_exchange(tensors: Sequence[torch.Tensor], receive_rows: Sequence[int], rank: int, world: int, group):
    """Send each of ``tensors`` to rank + 1 and receive same-width tensors of ``receive_rows`` rows
    from rank - 1 (ranks within ``group``); returns (the receive buffers, the pending transfer)."""
    to = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    source = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    sends = [tensor.contiguous() for tensor in tensors]  # referenced by the pending transfer until it completes
    received = [send.new_empty((rows, *send.shape[1:])) for send, rows in zip(sends, receive_rows)]
    operations = [dist.P2POp(dist.isend, send, to, group) for send in sends]
    operations += [dist.P2POp(dist.irecv, buffer, source, group) for buffer in received]
    return received, (dist.batch_isend_irecv(operations), sends)


def _wait(transfer) -> None:
    requests, _sends = transfer
    for request in requests:
        request.wait()


def _tile_rows(anchors: torch.Tensor, block_rows: int) -> int:
    """Anchor rows per slice of a local x block tile, so no tile is ever whole in memory: three
    slices live at once in backward (the products, the gradient, the columns' softmax), which
    together take the ops floor's block budget (cache-sized on the CPU, larger on a GPU)."""
    budget = DEFAULT_BLOCK_BYTES if anchors.device.type == "cpu" else ACCELERATOR_BLOCK_BYTES
    return max(1, min(anchors.shape[0], block_rows_for(max(block_rows, 1), anchors.element_size(), budget // 3)))


def sliced(anchors: torch.Tensor, visit: Callable) -> Callable:
    """A block visit for :func:`ring_forward` that calls ``columns = visit(raw, row0, owner,
    columns, block_labels)`` with ``raw = anchors[row0:row1] @ block.T``, slice by slice of
    anchor rows (PyTorch ops on a materialized slice)."""
    def visit_block(block, owner, columns, block_labels):
        rows = _tile_rows(anchors, block.shape[0])
        for row0 in range(0, anchors.shape[0], rows):
            columns = visit(anchors[row0:row0 + rows] @ block.T, row0, owner, columns, block_labels)
        return columns
    return visit_block


def sliced_gradient(anchors: torch.Tensor, tile_gradient: Callable) -> Callable:
    """A block gradient for :func:`ring_backward` from ``tile_gradient(raw, row0, owner, columns,
    block_labels)`` = dL/d raw of each slice ``raw = anchors[row0:row1] @ block.T``."""
    def block_gradient(block, owner, columns, block_labels, grad_anchors):
        share = torch.zeros_like(block, dtype=anchors.dtype)
        rows = _tile_rows(anchors, block.shape[0])
        for row0 in range(0, anchors.shape[0], rows):
            grad_raw = tile_gradient(anchors[row0:row0 + rows] @ block.T, row0, owner, columns, block_labels)
            grad_anchors[row0:row0 + rows].addmm_(grad_raw, block)
            share.addmm_(grad_raw.T, anchors[row0:row0 + rows])
            del grad_raw
        return share
    return block_gradient


def ring_forward(anchors: torch.Tensor, candidates: torch.Tensor, sizes: List[int], group,
                 visit_block: Callable, columns: Optional[torch.Tensor] = None, column_sizes: Optional[List[int]] = None,
                 labels: Optional[torch.Tensor] = None):
    """Calls ``columns = visit_block(block, owner, columns, block_labels)`` for every rank's
    candidate block (``owner``: the block's rank; :func:`sliced` makes one from a per-slice
    visit), each block arriving while the previous one is computed on. ``labels``: this rank's
    candidates' labels, which travel with the block (or None). ``columns``: this rank's block's
    running column statistics (rows of ``column_sizes[owner]``), or None; they travel with their
    block once it has been visited. Returns this rank's block's columns after every rank has
    visited it."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    block, owner = candidates.detach(), rank
    travelling = [block] if labels is None else [block, labels]
    for step in range(world):
        last = step == world - 1
        arriving = (owner - 1) % world
        pending_block = None
        if not last:
            pending_block = _start_exchange(travelling, [sizes[arriving]] * len(travelling), rank, world, group)
        block = travelling[0]
        columns = visit_block(block, owner, columns, travelling[1] if labels is not None else None)
        pending_columns = None
        if columns is not None and world > 1:  # on the last step this returns every block's columns to its owner
            pending_columns = _start_exchange([columns], [column_sizes[arriving]], rank, world, group)
        if pending_block is not None:
            travelling, transfer = pending_block
            _wait(transfer)
        if pending_columns is not None:
            (columns,), transfer = pending_columns
            _wait(transfer)
        pending_block = pending_columns = transfer = None  # the sent buffers are free now
        owner = arriving
    return columns


def ring_backward(anchors: torch.Tensor, candidates: torch.Tensor, sizes: List[int], group, block_gradient: Callable,
                  columns: Optional[torch.Tensor] = None, column_sizes: Optional[List[int]] = None,
                  labels: Optional[torch.Tensor] = None):
    """(dL/d anchors, dL/d candidates) of a loss whose tile of each block is differentiated by
    ``share = block_gradient(block, owner, columns, block_labels, grad_anchors)`` (adds the
    tile's anchor gradient to ``grad_anchors``, returns this rank's share of the block's
    gradient; :func:`sliced_gradient` makes one from a per-slice gradient). ``columns``: the
    block's column statistics, travelling with it, or None; ``labels``: the candidates' labels,
    likewise. The blocks travel the ring again, each followed by the gradient of its rows, which
    every rank adds to and one last hop returns to the owner.

    A block is sent on as soon as it arrives and its gradient as soon as this rank has added to
    it; the gradient coming with the next block is waited for only after that block's tile is
    computed (into a block-sized buffer of this rank's share), so both transfers overlap a tile."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    grad_anchors = torch.zeros_like(anchors, dtype=compute_dtype(anchors))
    block, owner, block_labels = candidates.detach(), rank, labels
    grad_block = None  # this rank's own block starts with its share alone
    pending_gradient = None
    for step in range(world):
        arriving = (owner - 1) % world
        pending_block = None
        if step < world - 1:
            travelling = [block] + ([columns] if columns is not None else []) + ([block_labels] if labels is not None else [])
            rows = [sizes[arriving]] + ([column_sizes[arriving]] if columns is not None else []) + (
                [sizes[arriving]] if labels is not None else [])
            pending_block = _start_exchange(travelling, rows, rank, world, group)
        share = block_gradient(block, owner, columns, block_labels, grad_anchors)
        if pending_gradient is not None:  # the gradient of this block, from the ranks before
            (grad_block,), transfer = pending_gradient
            _wait(transfer)
            pending_gradient = transfer = None  # the gradient this rank sent last step is free now
            grad_block += share
        else:
            grad_block = share
        del share
        if pending_block is not None:
            pending_gradient = _start_exchange([grad_block], [sizes[arriving]], rank, world, group)
            travelling, transfer = pending_block
            _wait(transfer)
            pending_block = transfer = None
            block = travelling.pop(0)
            columns = travelling.pop(0) if columns is not None else None
            block_labels = travelling.pop(0) if labels is not None else None
            owner = arriving
    if world > 1:  # the complete gradient of rank r + 1's block is here: return it
        (grad_block,), transfer = _start_exchange([grad_block], [sizes[rank]], rank, world, group)
        _wait(transfer)
    return grad_anchors, grad_block


def _scalar_gradient(value: torch.Tensor, like: torch.Tensor, needed: bool):
    return value.to(like.dtype).reshape(like.shape) if needed else None


class RingOptions(NamedTuple):
    """What the ring's InfoNCE computes beyond the plain loss (``fastcl.info_nce``'s meaning)."""

    exclude_self: bool = False  # anchor i's own rank's candidate i is no candidate
    margin: Optional[float] = None  # false_negative_margin: drop negatives within m of the positive (raw, no grad)
    smoothing: float = 0.0  # label_smoothing over the candidates in each denominator


class RingInfoNCE(torch.autograd.Function):
    """Per-row InfoNCE losses of the local ``anchors`` (B_r, D) against every rank's
    ``candidates`` (N_s, D), each anchor's positive being ``positive[i]`` among its own rank's
    candidates: ``l_i = logsumexp_{j in C_i}(scale * a_i . c_j) - scale * a_i . c_pos(i)``,
    ``C_i`` every candidate but those the options drop.

    ``sizes``: every rank's candidate count, in rank order. ``scale``: a 0-d tensor (1 / tau, or
    CLIP's logit scale), which gets its gradient. ``private``: (B_r, H, D) negatives of each
    anchor alone (DPR's hard negatives) or None; they stay on their rank. ``labels`` (B_r,) and
    ``candidate_labels`` (N_r,) (or None): a candidate with its anchor's label is dropped unless
    it is the positive (``multi_positive="mask"``); the candidates' labels travel with their
    block; hard negatives are never dropped for a label. ``options``: :class:`RingOptions`.

    ``column_sizes`` (symmetric losses; every rank's anchor count B_s, with N_s >= B_s): the
    column direction too, candidate j < B_s of every rank against every rank's anchors, its
    positive the anchor j of its own rank, computed on the same tiles. Returns (row losses
    (B_r,), column losses (B_r,) or an empty tensor).
    """

    @staticmethod
    def forward(ctx, anchors, candidates, scale, positive, private, labels, candidate_labels, options: RingOptions,
                sizes: List[int], column_sizes: Optional[List[int]], group):
        rank = dist.get_rank(group)
        a = anchors.detach()
        fused = fused_tiles(a, labels, options)
        if not fused and a.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"the ring's PyTorch tiles take float32 / float64 rows, got {a.dtype}")
        like = a.new_empty(0, dtype=compute_dtype(a))  # statistics in fp32 for bf16 rows
        value = scale.detach().to(like.dtype)
        batch = a.shape[0]
        tile = _TileMasks(options, positive, labels, like.new_empty(batch))
        lse = like.new_full((batch,), float("-inf"))
        positive_score = like.new_empty(batch)
        totals = like.new_zeros((batch, 2)) if options.smoothing else None  # candidates' score sum, count
        symmetric = column_sizes is not None
        column_positive = like.new_empty(batch) if symmetric else None
        columns = None
        if symmetric:  # of this rank's first B_r candidates: [lse, (score sum, count), (positive similarity)]
            columns = like.new_zeros((batch, 1 + 2 * bool(options.smoothing) + (options.margin is not None)))
            columns[:, 0] = float("-inf")
            if options.margin is not None:
                columns[:, -1] = (a * candidates.detach()[:batch]).sum(-1)

        def visit(raw, row0, owner, block_columns, block_labels):
            rows = slice(row0, row0 + raw.shape[0])
            own = owner == rank
            if own:
                tile.positive_raw[rows] = raw.gather(1, positive[rows, None])[:, 0]
            dropped = tile.row_dropped(raw, row0, own, block_labels)
            column_dropped = tile.column_dropped(raw, row0, own, block_labels, block_columns) if symmetric else None
            logits = raw.mul_(value)
            if own:
                positive_score[rows] = logits.gather(1, positive[rows, None])[:, 0]
            _merge(lse, totals, rows, logits, dropped, dim=1)
            if not symmetric:
                return None
            width = block_columns.shape[0]
            if own:
                column_positive[rows] = logits[:, :width].diagonal(row0)
            _merge(block_columns[:, 0], block_columns[:, 1:3] if options.smoothing else None, slice(None),
                   logits[:, :width], column_dropped, dim=0)
            return block_columns

        visit_block = sliced(a, visit)
        if fused:
            visit_block = _fused_visit(a, value, positive, options, rank, lse, positive_score, column_positive)
        columns = ring_forward(a, candidates, sizes, group, visit_block, columns, column_sizes, candidate_labels)
        private_raw = None
        if private is not None and private.shape[1] > 0:
            private_raw = _private_raw(a, private.detach())
            _merge(lse, totals, slice(None), private_raw * value, tile.private_dropped(private_raw), dim=1)
        rows_loss = _row_losses(lse, positive_score, totals, options.smoothing)
        column_losses = like.new_empty(0)
        if symmetric:
            column_losses = _row_losses(columns[:, 0], column_positive, columns[:, 1:3], options.smoothing)
        ctx.save_for_backward(anchors, candidates, scale, positive, private, labels, candidate_labels, lse,
                              totals, columns, tile.positive_raw)
        ctx.options = (options, sizes, column_sizes, group, fused)
        return rows_loss, column_losses

    @staticmethod
    def backward(ctx, grad_rows, grad_columns):
        (anchors, candidates, scale, positive, private, labels, candidate_labels, lse, totals, columns,
         positive_raw) = ctx.saved_tensors
        options, sizes, column_sizes, group, fused = ctx.options
        rank = dist.get_rank(group)
        a = anchors.detach()
        like = lse  # the statistics' dtype (fp32 for bf16 rows)
        value = scale.detach().to(like.dtype)
        smoothing = options.smoothing
        tile = _TileMasks(options, positive, labels, positive_raw)
        weights = grad_rows.to(like.dtype) if grad_rows is not None else like.new_zeros(a.shape[0])
        # d l_i / d s_ij = p_ij - (1 - eps) [j = pos] - eps / K_i [j in C_i]
        spread = weights * smoothing / totals[:, 1] if smoothing else None
        grads = {"scale": like.new_zeros(())}
        travelling = None
        if column_sizes is not None:  # each block's column statistics and weights travel with it
            column_weights = grad_columns.to(like.dtype) if grad_columns is not None else torch.zeros_like(columns[:, 0])
            column_spread = column_weights * smoothing / columns[:, 2] if smoothing else None
            travelling = torch.stack([columns[:, 0], column_weights] + ([column_spread] if smoothing else []) +
                                     ([columns[:, -1]] if options.margin is not None else []), dim=1)

        def tile_gradient(raw, row0, owner, block_columns, block_labels):
            own = owner == rank
            rows = slice(row0, row0 + raw.shape[0])
            row_weights = weights[rows, None]
            dropped = tile.row_dropped(raw, row0, own, block_labels)
            grad_logits = _softmax_gradient(raw * value, lse[rows, None], row_weights,
                                            spread[rows, None] if smoothing else None, dropped)
            if own:
                grad_logits.scatter_add_(1, positive[rows, None], -(1.0 - smoothing) * row_weights)
            if block_columns is not None:
                width = block_columns.shape[0]
                column_dropped = tile.column_dropped(raw, row0, own, block_labels, block_columns)
                grad_logits[:, :width] += _softmax_gradient(
                    raw[:, :width] * value, block_columns[None, :, 0], block_columns[None, :, 1],
                    block_columns[None, :, 2] if smoothing else None, column_dropped)
                if own:
                    grad_logits.diagonal(row0)[:width] -= (1.0 - smoothing) * block_columns[rows, 1]
            grads["scale"] = grads["scale"] + torch.vdot(grad_logits.reshape(-1), raw.reshape(-1))
            return grad_logits.mul_(value)

        block_gradient = sliced_gradient(a, tile_gradient)
        if fused:
            block_gradient = _fused_gradient(a, value, positive, options, rank, lse, weights, grads)
        grad_anchors, grad_candidates = ring_backward(a, candidates, sizes, group, block_gradient, travelling,
                                                      column_sizes, candidate_labels)
        grad_private = None
        if private is not None:
            h = private.detach()
            private_raw = _private_raw(a, h)
            grad_private_logits = _softmax_gradient(private_raw * value, lse[:, None], weights[:, None],
                                                    spread[:, None] if smoothing else None,
                                                    tile.private_dropped(private_raw))
            grads["scale"] = grads["scale"] + torch.vdot(grad_private_logits.reshape(-1), private_raw.reshape(-1))
            grad_private_raw = grad_private_logits.mul_(value)
            grad_anchors += torch.bmm(grad_private_raw[:, None, :], h)[:, 0]
            grad_private = (grad_private_raw[:, :, None] * a[:, None, :]).to(private.dtype)
        needs = ctx.needs_input_grad
        return (grad_anchors.to(anchors.dtype) if needs[0] else None,
                grad_candidates.to(candidates.dtype) if needs[1] else None,
                _scalar_gradient(grads["scale"], scale, needs[2]), None,
                grad_private if needs[4] else None, None, None, None, None, None, None)


# bf16 rows multiply in bf16 on the kernels (fp32 accumulation and statistics), as the single-process
# Triton kernels do; fp16 rows are widened first (a gradient tile rounded to fp16 would underflow)
FUSED_TILE_DTYPES = (torch.float32, torch.bfloat16)


def fused_tiles(anchors: torch.Tensor, labels, options: RingOptions) -> bool:
    """Whether the Triton tile kernels (:mod:`fastcl.ops.info_nce.ring_triton`) run the tiles:
    float32 / bf16 CUDA rows and the plain loss, unless ``FASTCL_RING_TILES=torch``;
    ``FASTCL_RING_TILES=triton`` asks for them on the CPU too (the Triton interpreter, for tests).
    bf16 rows then travel and multiply in their own dtype, as the single-process kernels do."""
    if _RING_TILES == "torch" or labels is not None or options.margin is not None or options.smoothing:
        return False
    if anchors.dtype not in FUSED_TILE_DTYPES or not (anchors.is_cuda or _RING_TILES == "triton"):
        return False
    return importlib.util.find_spec("triton") is not None


def _fused_visit(anchors, value, positive, options: RingOptions, rank: int, lse, positive_score, column_positive):
    """A block visit for :func:`ring_forward` by the fused forward tile kernel."""
    from .ops.info_nce import ring_triton

    anchors = anchors.contiguous()

    def visit_block(block, owner, columns, _labels):
        own = owner == rank
        width = columns.shape[0] if columns is not None else 0
        tile_lse, tile_positive, column_lse = ring_triton.tile_forward(
            anchors, block.contiguous(), value, positive, own, options.exclude_self, width)
        lse.copy_(torch.logaddexp(lse, tile_lse))
        if own:
            positive_score.copy_(tile_positive)
        if columns is None:
            return None
        if own:  # candidate j's positive is anchor j of its own rank
            column_positive.copy_((anchors[:width].float() * block[:width].float()).sum(-1).to(value.dtype) * value)
        columns[:, 0] = torch.logaddexp(columns[:, 0], column_lse)
        return columns
    return visit_block


def _fused_gradient(anchors, value, positive, options: RingOptions, rank: int, lse, weights, grads):
    """A block gradient for :func:`ring_backward` by the fused backward tile kernels."""
    from .ops.info_nce import ring_triton

    anchors = anchors.contiguous()
    weights = weights.contiguous()

    def block_gradient(block, owner, columns, _labels, grad_anchors):
        column_lse = columns[:, 0].contiguous() if columns is not None else None
        column_weights = columns[:, 1].contiguous() if columns is not None else None
        share, grad_scale = ring_triton.tile_backward(anchors, block.contiguous(), value, positive, owner == rank,
                                                      options.exclude_self, lse, weights, column_lse, column_weights,
                                                      grad_anchors)
        grads["scale"] = grads["scale"] + grad_scale
        return share
    return block_gradient


class _TileMasks:
    """The candidates a tile slice drops, for the rows (anchor i against the block's candidates)
    and for the columns (candidate j < B_s of the block against the local anchors): True where
    dropped, or None where nothing is (the plain loss builds no mask)."""

    def __init__(self, options: RingOptions, positive: torch.Tensor, labels: Optional[torch.Tensor],
                 positive_raw: torch.Tensor):
        self.options, self.positive, self.labels = options, positive, labels
        # each anchor's similarity with its positive (the margin's reference): the own block sets it
        self.positive_raw = positive_raw

    def _positive_mask(self, raw, row0, own):
        if not own:
            return None
        is_positive = torch.zeros_like(raw, dtype=torch.bool)
        return is_positive.scatter_(1, self.positive[row0:row0 + raw.shape[0], None], True)

    def row_dropped(self, raw, row0, own, block_labels):
        options, rows = self.options, slice(row0, row0 + raw.shape[0])
        dropped = None
        if own and options.exclude_self:
            dropped = torch.zeros_like(raw, dtype=torch.bool)
            dropped.diagonal(row0).fill_(True)
        if self.labels is not None or options.margin is not None:
            is_positive = self._positive_mask(raw, row0, own)
            extra = torch.zeros_like(raw, dtype=torch.bool)
            if self.labels is not None:
                extra |= self.labels[rows, None] == block_labels[None, :]
            if options.margin is not None:
                extra |= raw > (self.positive_raw[rows, None] - options.margin)
            if is_positive is not None:
                extra &= ~is_positive
            dropped = extra if dropped is None else dropped | extra
        return dropped

    def column_dropped(self, raw, row0, own, block_labels, block_columns):
        options, rows = self.options, slice(row0, row0 + raw.shape[0])
        if self.labels is None and options.margin is None:
            return None
        width = block_columns.shape[0]
        columns_raw = raw[:, :width]
        dropped = torch.zeros_like(columns_raw, dtype=torch.bool)
        if self.labels is not None:
            dropped |= block_labels[None, :width] == self.labels[rows, None]
        if options.margin is not None:
            dropped |= columns_raw > (block_columns[None, :, -1] - options.margin)  # the columns' positives
        if own:
            dropped.diagonal(row0).fill_(False)  # candidate j's positive is anchor j of its own rank
        return dropped

    def private_dropped(self, private_raw):
        if self.options.margin is None:
            return None
        return private_raw > (self.positive_raw[:, None] - self.options.margin)


def _merge(lse, totals, rows, logits, dropped, dim):
    """Fold a slice's logits into the running log-sum-exp (and, with smoothing, the candidates'
    score sum and count) along ``dim`` (1: per anchor row, 0: per column), leaving out the
    dropped ones."""
    kept = logits if dropped is None else logits.masked_fill(dropped, float("-inf"))
    lse[rows] = torch.logaddexp(lse[rows], logsumexp_flushed(kept, dim))
    if totals is not None:
        totals[rows, 0] += (logits if dropped is None else logits.masked_fill(dropped, 0.0)).sum(dim)
        totals[rows, 1] += logits.shape[dim] - (0 if dropped is None else dropped.sum(dim))


def _row_losses(lse, positive_score, totals, smoothing):
    loss = lse - (1.0 - smoothing) * positive_score
    if smoothing:
        loss = loss - smoothing * totals[:, 0] / totals[:, 1]
    return loss


def _softmax_gradient(logits, lse, weights, spread, dropped):
    """``weights * exp(logits - lse) - spread`` on the kept candidates, 0 on the dropped ones (in
    place on ``logits``; tiny exponentials flushed to 0, as every fused path does)."""
    grad = exp_flushed_(logits.sub_(lse)).mul_(weights)
    if spread is not None:
        grad.sub_(spread)
    if dropped is not None:
        grad.masked_fill_(dropped, 0.0)
    return grad


def _private_raw(anchors: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
    """(B_r, H) products of each anchor with its own private negatives."""
    return torch.bmm(private, anchors[:, :, None])[:, :, 0]


class RingSigmoid(torch.autograd.Function):
    """Per-row SigLIP losses of the local ``anchors`` (B_r, D) against every rank's
    ``candidates``: ``l_i = sum_j softplus(z_ij) - z_ii`` with ``z = scale * a . c + bias``, the
    positive of anchor i being candidate i of its own rank. ``scale``, ``bias``: 0-d tensors."""

    @staticmethod
    def forward(ctx, anchors, candidates, scale, bias, sizes: List[int], group):
        rank = dist.get_rank(group)
        scale_value, bias_value = scale.detach().to(anchors.dtype), bias.detach().to(anchors.dtype)
        state = {"sum": anchors.new_zeros(anchors.shape[0])}

        positive_logits = anchors.new_empty(anchors.shape[0])

        def visit(raw, row0, owner, _columns, _labels):
            rows = slice(row0, row0 + raw.shape[0])
            logits = raw.mul_(scale_value).add_(bias_value)
            if owner == rank:
                positive_logits[rows] = logits.diagonal(row0)
            state["sum"][rows] += F.softplus(logits).sum(dim=1)

        ring_forward(anchors.detach(), candidates, sizes, group, sliced(anchors.detach(), visit))
        ctx.save_for_backward(anchors, candidates, scale, bias)
        ctx.sizes, ctx.group = sizes, group
        return state["sum"] - positive_logits

    @staticmethod
    def backward(ctx, grad_rows):
        anchors, candidates, scale, bias = ctx.saved_tensors
        rank = dist.get_rank(ctx.group)
        a = anchors.detach()
        scale_value, bias_value = scale.detach().to(a.dtype), bias.detach().to(a.dtype)
        weights = grad_rows.to(a.dtype)
        grads = {"scale": a.new_zeros(()), "bias": a.new_zeros(())}

        def tile_gradient(raw, row0, owner, _columns, _labels):
            rows = slice(row0, row0 + raw.shape[0])
            # d softplus(z) = sigmoid(z)
            grad_logits = flush_tiny(torch.sigmoid(raw * scale_value + bias_value)).mul_(weights[rows, None])
            if owner == rank:
                grad_logits.diagonal(row0).sub_(weights[rows])
            grads["scale"] = grads["scale"] + torch.vdot(grad_logits.reshape(-1), raw.reshape(-1))
            grads["bias"] = grads["bias"] + grad_logits.sum()
            return grad_logits.mul_(scale_value)

        grad_anchors, grad_candidates = ring_backward(a, candidates, ctx.sizes, ctx.group, sliced_gradient(a, tile_gradient))
        needs = ctx.needs_input_grad
        return (grad_anchors.to(anchors.dtype) if needs[0] else None,
                grad_candidates.to(candidates.dtype) if needs[1] else None,
                _scalar_gradient(grads["scale"], scale, needs[2]), _scalar_gradient(grads["bias"], bias, needs[3]),
                None, None)


def ring_info_nce(anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor, positive: Optional[torch.Tensor],
                  sizes: List[int], group, private: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                  candidate_labels: Optional[torch.Tensor] = None, options: RingOptions = RingOptions(),
                  column_sizes: Optional[List[int]] = None):
    """(row losses (B_r,), column losses (B_r,) or None) of :class:`RingInfoNCE`; ``positive``
    defaults to ``arange(B_r)``; ``column_sizes`` (every rank's B) asks for the column direction."""
    if positive is None:
        positive = torch.arange(anchors.shape[0], device=anchors.device)
    rows, columns = RingInfoNCE.apply(anchors, candidates, scale, positive.long(), private, labels, candidate_labels,
                                      options, list(sizes), list(column_sizes) if column_sizes is not None else None,
                                      group)
    return rows, (columns if column_sizes is not None else None)


def ring_sigmoid_rows(anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                      sizes: List[int], group) -> torch.Tensor:
    """(B_r,) losses of :class:`RingSigmoid`."""
    return RingSigmoid.apply(anchors, candidates, scale, bias, list(sizes), group)
