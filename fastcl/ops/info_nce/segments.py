"""InfoNCE over several candidate *segments*: the path for guide masks, memory-bank negatives
and in-kernel statistics.

A row i of the loss has one positive and candidates from one or more segments; every segment
pairs an anchor matrix with a candidate matrix, and the row's log-sum-exp runs over all of
them::

    L_i = -s_{i,pos(i)} + log sum_{segments} sum_{j kept} exp(s_ij),   s_ij = a_i . c_j / tau

Segment kinds: ``shared`` (every row against every candidate: in-batch keys, a memory bank,
GIST's anchor-anchor block), ``paired`` (row i against candidates[i] only: lightly's positive
when it uses a memory bank) and ``private`` (row i against its own (H, D) hard negatives).
The anchors of a segment need not be the loss's queries (GIST's positive-positive block uses
the positives as anchors). Nothing is concatenated: each segment's similarities are computed
block by block into the block of logits, so a memory bank is read in place.

Masks (a positive is never masked): self pairs (``exclude_diagonal``), same label, same sample
index (memory-bank exclusion), the false-negative margin on raw similarities, and the guide
mask (GIST): candidate j of row i is dropped when ``g_ij > g_{i,pos(i)} - margin`` (absolute)
or ``> g_pos - |g_pos| * margin`` (relative), with g the guide model's cosine similarities,
computed block by block like the logits.

Statistics of each row (``return_stats``): ``lse`` (log-sum-exp over the kept candidates, in
logit units), ``positive_logit`` and ``rank`` = how many kept candidates have a strictly
larger logit than the positive (0 = top-1). O(B) memory, never a B x N tensor.

The driver is pure PyTorch (any device); memory O(B * D) plus one block of logits.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import torch

from ..._tracing import functorch_active
from ..common.blocks import block_rows_for

SHARED, PAIRED, PRIVATE = "shared", "paired", "private"


@dataclass
class Segment:
    """One block of candidates of every anchor row (tensors in the compute dtype, normalized)."""

    anchors: torch.Tensor  # (R, D)
    candidates: torch.Tensor  # shared: (M, D); paired: (R, D); private: (R, H, D)
    kind: str = SHARED
    anchor_labels: Optional[torch.Tensor] = None  # with candidate_labels: same label is not a negative
    candidate_labels: Optional[torch.Tensor] = None
    anchor_ids: Optional[torch.Tensor] = None  # with candidate_ids: same sample index is not a negative
    candidate_ids: Optional[torch.Tensor] = None
    exclude_diagonal: bool = False  # column r of row r is not a candidate (NT-Xent, GIST's aa without guide)
    guide_anchors: Optional[torch.Tensor] = None
    guide_candidates: Optional[torch.Tensor] = None
    candidate_scale: Optional[torch.Tensor] = None  # (M,) shared only: 1/|c_j| for a bank read unnormalized

    def columns(self) -> int:
        if self.kind == SHARED:
            return self.candidates.shape[0]
        if self.kind == PAIRED:
            return 1
        return self.candidates.shape[1]


@dataclass
class SegmentOptions:
    positive: Optional[torch.Tensor]  # (R,) column of the positive in segment 0 (paired: ignored)
    margin: Optional[float] = None  # false-negative margin on raw similarities
    guide_margin: float = 0.0
    guide_relative: bool = False


def _similarity(anchors, candidates, kind, row0, row1, scale=None, differentiable=False):
    block = anchors[row0:row1]
    if kind == SHARED:
        raw = block @ candidates.T
        if scale is None:
            return raw
        return raw * scale[None, :] if differentiable else raw.mul_(scale[None, :])
    if kind == PAIRED:
        return (block * candidates[row0:row1]).sum(1, keepdim=True)
    return torch.bmm(candidates[row0:row1], block[:, :, None])[:, :, 0]


def _segment_drop(segment: Segment, index: int, raw, guide, row0, row1, positive_column, state):
    """Boolean (rows, cols) of the candidates this segment's masks drop, or None when none can
    be; ``state`` carries segment 0's positive similarities (thresholds of every segment)."""
    rows, cols = raw.shape
    device = raw.device
    is_positive = None
    if index == 0:
        is_positive = torch.arange(cols, device=device)[None, :] == positive_column[:, None]
        state["raw_positive"] = raw.gather(1, positive_column[:, None])
        if guide is not None:
            state["guide_positive"] = guide.gather(1, positive_column[:, None])
    drop = None

    def add(condition):
        nonlocal drop
        drop = condition if drop is None else drop.logical_or_(condition)

    if segment.kind == SHARED:
        if segment.exclude_diagonal:
            add(torch.arange(cols, device=device)[None, :] == torch.arange(row0, row1, device=device)[:, None])
        if segment.anchor_labels is not None and segment.candidate_labels is not None:
            add(segment.anchor_labels[row0:row1, None] == segment.candidate_labels[None, :])
        if segment.anchor_ids is not None and segment.candidate_ids is not None:
            add(segment.anchor_ids[row0:row1, None] == segment.candidate_ids[None, :])
    if state["margin"] is not None:
        add(raw > state["raw_positive"] - state["margin"])
    if guide is not None:
        g_pos = state["guide_positive"]
        slack = g_pos.abs() * state["guide_margin"] if state["guide_relative"] else state["guide_margin"]
        add(guide > g_pos - slack)
    if drop is not None and is_positive is not None:
        drop &= ~is_positive  # a positive is never dropped (the diagonal rule included)
    return drop


def run_segments(segments: Sequence[Segment], options: SegmentOptions, inv_temperature: float,
                 weights: Optional[torch.Tensor] = None, grads_out: Optional[List] = None, stats: bool = False):
    """Loss of every row; with ``weights`` (dL/dL_row) the gradients are *added* to
    ``grads_out`` = [(d anchors, d candidates or None) per segment] and dtemp_sum
    (= sum dL/draw * raw) is returned. Returns (loss, dtemp_sum, stats dict or None)."""
    first = segments[0].anchors
    rows, dtype, device = first.shape[0], first.dtype, first.device
    widths = [s.columns() for s in segments]
    total_columns = sum(widths)
    step = min(rows, block_rows_for(total_columns * 2, first.element_size()))
    loss = torch.empty(rows, dtype=dtype, device=device)
    dtemp = torch.zeros((), dtype=dtype, device=device)
    lse_all = torch.empty(rows, dtype=dtype, device=device) if stats else None
    positive_all = torch.empty(rows, dtype=dtype, device=device) if stats else None
    rank_all = torch.empty(rows, dtype=torch.int64, device=device) if stats else None
    state = {"margin": options.margin, "guide_margin": options.guide_margin, "guide_relative": options.guide_relative}
    logits_buffer = torch.empty(step, total_columns, dtype=dtype, device=device)
    for row0 in range(0, rows, step):
        row1 = min(rows, row0 + step)
        if segments[0].kind == PAIRED:
            positive_column = torch.zeros(row1 - row0, dtype=torch.int64, device=device)
        else:
            positive_column = options.positive[row0:row1]
        masked = logits_buffer[: row1 - row0]
        raws = []
        column = 0
        for index, segment in enumerate(segments):
            raw = _similarity(segment.anchors, segment.candidates, segment.kind, row0, row1, segment.candidate_scale)
            guide = None
            if segment.guide_anchors is not None:
                guide = _similarity(segment.guide_anchors, segment.guide_candidates, segment.kind, row0, row1)
            drop = _segment_drop(segment, index, raw, guide, row0, row1, positive_column, state)
            part = masked[:, column:column + widths[index]]
            torch.mul(raw, inv_temperature, out=part)
            if drop is not None:
                part.masked_fill_(drop, float("-inf"))
            raws.append(raw)
            column += widths[index]
        lse = torch.logsumexp(masked, dim=1)
        positive_score = state["raw_positive"][:, 0] * inv_temperature
        loss[row0:row1] = lse - positive_score
        if stats:
            lse_all[row0:row1] = lse
            positive_all[row0:row1] = positive_score
            rank_all[row0:row1] = (masked > positive_score[:, None]).sum(1)
        if weights is None:
            continue
        grad = masked.sub_(lse[:, None]).exp_()  # softmax over the kept candidates (0 where dropped)
        grad[:, :widths[0]].scatter_add_(1, positive_column[:, None],
                                         torch.full((row1 - row0, 1), -1.0, dtype=dtype, device=device))
        grad.mul_(weights[row0:row1, None] * inv_temperature)
        column = 0
        for segment, raw, (d_anchors, d_candidates) in zip(segments, raws, grads_out):
            width = segment.columns()
            part = grad[:, column:column + width]
            column += width
            dtemp += (part * raw).sum()
            block = segment.anchors[row0:row1]
            if segment.kind == SHARED:
                if segment.candidate_scale is not None:
                    part = part * segment.candidate_scale[None, :]
                if d_anchors is not None:
                    d_anchors[row0:row1].addmm_(part, segment.candidates)
                if d_candidates is not None:
                    d_candidates.addmm_(part.T, block)
            elif segment.kind == PAIRED:
                if d_anchors is not None:
                    d_anchors[row0:row1] += part * segment.candidates[row0:row1]
                if d_candidates is not None:
                    d_candidates[row0:row1] += part * block
            else:
                if d_anchors is not None:
                    d_anchors[row0:row1] += torch.bmm(part[:, None, :], segment.candidates[row0:row1])[:, 0]
                if d_candidates is not None:
                    d_candidates[row0:row1] += part[:, :, None] * block[:, None, :]
    statistics = None
    if stats:
        statistics = {"lse": lse_all, "positive_logit": positive_all, "rank": rank_all}
    return loss, dtemp, statistics


def _gradient_buffers(segments, needs):
    buffers, seen = [], {}
    for index, segment in enumerate(segments):
        pair = []
        for position, tensor in enumerate((segment.anchors, segment.candidates)):
            if not needs[2 * index + position]:
                pair.append(None)
                continue
            pair.append(torch.zeros_like(tensor))
        buffers.append(tuple(pair))
    return buffers


def differentiable_loss(segments: Sequence[Segment], options: SegmentOptions, temperature: torch.Tensor,
                        reduction: str, divisor: float) -> torch.Tensor:
    """The same loss in plain differentiable PyTorch, all rows at once (the logits materialized):
    what a double backward differentiates. Masks come from the same rules, on detached values."""
    rows = segments[0].anchors.shape[0]
    device = segments[0].anchors.device
    if segments[0].kind == PAIRED:
        positive_column = torch.zeros(rows, dtype=torch.int64, device=device)
    else:
        positive_column = options.positive
    state = {"margin": options.margin, "guide_margin": options.guide_margin, "guide_relative": options.guide_relative}
    parts, positive_raw = [], None
    for index, segment in enumerate(segments):
        raw = _similarity(segment.anchors, segment.candidates, segment.kind, 0, rows, segment.candidate_scale,
                          differentiable=True)
        guide = None
        if segment.guide_anchors is not None:
            guide = _similarity(segment.guide_anchors, segment.guide_candidates, segment.kind, 0, rows)
        drop = _segment_drop(segment, index, raw.detach(), guide, 0, rows, positive_column, state)
        if index == 0:
            positive_raw = raw.gather(1, positive_column[:, None])[:, 0]
        logits = raw / temperature
        parts.append(logits if drop is None else logits.masked_fill(drop, float("-inf")))
    loss = torch.logsumexp(torch.cat(parts, dim=1), dim=1) - positive_raw / temperature
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / divisor


class _SegmentedLoss(torch.autograd.Function):
    """Scalar reductions: gradients computed in the forward pass (a memory bank may change
    right after the call); ``reduction="none"``: recomputed in backward with the row weights.
    Under ``create_graph=True`` the backward differentiates :func:`differentiable_loss` instead,
    so second-order gradients (Hessian-vector products, gradient penalties) are exact."""

    @staticmethod
    def forward(ctx, spec, temperature, *tensors):
        segments, options, reduction, divisor, stats, holder = spec
        inv_temperature = 1.0 / float(temperature.detach().reshape(()))
        needs = list(ctx.needs_input_grad[2:])
        wants_grad = any(needs) or ctx.needs_input_grad[1]
        rows = segments[0].anchors.shape[0]
        dtype = segments[0].anchors.dtype
        grads = None
        if wants_grad and reduction != "none":
            scale = 1.0 / divisor if reduction == "mean" else 1.0
            weights = torch.full((rows,), scale, dtype=dtype, device=segments[0].anchors.device)
            grads = _gradient_buffers(segments, needs)
            loss, dtemp, statistics = run_segments(segments, options, inv_temperature, weights, grads, stats)
            ctx.unit_grads = [g for pair in grads for g in pair]
            ctx.dtemp = -dtemp * inv_temperature
        else:
            loss, _, statistics = run_segments(segments, options, inv_temperature, None, None, stats)
            ctx.unit_grads = None
        ctx.spec = spec
        ctx.save_for_backward(temperature, *tensors)
        ctx.inv_temperature = inv_temperature
        ctx.temperature_meta = (temperature.shape, temperature.dtype, temperature.device)
        ctx.needs = needs
        if reduction == "none":
            result = loss
        elif reduction == "sum":
            result = loss.sum()
        else:
            result = loss.sum() / divisor
        holder["stats"] = statistics
        return result

    @staticmethod
    def backward(ctx, grad_output):
        segments, options, reduction = ctx.spec[:3]
        shape, t_dtype, t_device = ctx.temperature_meta
        if torch.is_grad_enabled():  # create_graph=True: gradients with a graph of their own
            return (None, *_differentiable_gradients(ctx, grad_output))
        if ctx.unit_grads is not None:
            scale = grad_output.reshape(())
            grads = [None if g is None else g * scale.to(g.dtype) for g in ctx.unit_grads]
            dtemp = ctx.dtemp * scale.to(ctx.dtemp.dtype)
        else:
            weights = grad_output.to(segments[0].anchors.dtype)
            if reduction != "none":
                rows = segments[0].anchors.shape[0]
                weights = weights.reshape(()).expand(rows) / (ctx.spec[3] if reduction == "mean" else 1.0)
            buffers = _gradient_buffers(segments, ctx.needs)
            _, dtemp, _ = run_segments(segments, options, ctx.inv_temperature, weights, buffers)
            grads = [g for pair in buffers for g in pair]
            dtemp = -dtemp * ctx.inv_temperature
        dtemp = dtemp.to(device=t_device, dtype=t_dtype).reshape(shape)
        return (None, dtemp, *grads)


def _differentiable_gradients(ctx, grad_output):
    from ..common.gradients import reference_gradients

    segments, options, reduction, divisor = ctx.spec[:4]
    temperature, *tensors = ctx.saved_tensors

    def loss_of(temperature, *tensors):
        pieces = iter(tensors)
        rebuilt = [replace(segment, anchors=next(pieces), candidates=next(pieces)) for segment in segments]
        return differentiable_loss(rebuilt, options, temperature, reduction, divisor)

    grads = reference_gradients(loss_of, [temperature, *tensors], grad_output)
    if not ctx.needs_input_grad[1]:
        grads[0] = None
    return [g if ctx.needs_input_grad[1 + index] else None for index, g in enumerate(grads)]


def segmented_loss(segments: Sequence[Segment], options: SegmentOptions, temperature: torch.Tensor,
                   reduction: str = "mean", return_stats: bool = False):
    """Differentiable loss over ``segments`` (their anchors / candidates may require grad).

    Returns the loss, or (loss, stats) with ``return_stats``. ``mean`` divides by the rows."""
    rows = segments[0].anchors.shape[0]
    if functorch_active():
        # torch.func (grad, vmap, jacrev): the driver's autograd.Function does not compose with the
        # transforms; the same loss in plain differentiable PyTorch does (the logits materialized)
        if return_stats:
            raise NotImplementedError("return_stats=True is not available inside torch.func transforms "
                                      "(grad, vmap, jacrev): call info_nce outside the transform for the statistics")
        return differentiable_loss(list(segments), options, temperature, reduction, float(rows))
    holder = {}
    spec = (list(segments), options, reduction, float(rows), return_stats, holder)
    tensors = [t for s in segments for t in (s.anchors, s.candidates)]
    loss = _SegmentedLoss.apply(spec, temperature, *tensors)
    if not return_stats:
        return loss
    return loss, holder["stats"]
