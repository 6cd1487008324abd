"""Ring exchange for :mod:`fastcl.distributed` (``mode="ring"``): each rank keeps its own rows,
and candidate blocks travel around the ring of ranks instead of being all-gathered.

Forward: at step t rank r holds the candidate block of rank (r - t) mod R, sends it on to r + 1
while it computes that block's logits against its local anchors, and merges the block's row
log-sum-exp into a running one (the positive logit comes from its own block). Backward: the
blocks travel the same way again, each with the gradient of its rows accumulated on the way;
after R steps every block's gradient is complete and one more pass returns it to its owner.

Memory per rank: the local rows, two candidate blocks (the one computed on and the one arriving)
with their gradients, and one local x block logits tile: flat in the number of ranks.
Communication per rank and step: one block forward, a block and its gradient backward.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _start_exchange(tensor: torch.Tensor, receive_rows: int, rank: int, world: int, group):
    """Send ``tensor`` to rank + 1 and receive a same-width tensor of ``receive_rows`` rows from
    rank - 1 (ranks within ``group``); returns (the receive buffer, the pending transfer)."""
    to = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    source = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    send = tensor.contiguous()  # referenced by the pending transfer until it completes
    received = send.new_empty((receive_rows, *send.shape[1:]))
    requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, to, group),
                                       dist.P2POp(dist.irecv, received, source, group)])
    return received, (requests, send)


def _wait(transfer) -> None:
    requests, _send = transfer
    for request in requests:
        request.wait()


def ring_visit(anchors: torch.Tensor, candidates: torch.Tensor, sizes: List[int], group, visit) -> None:
    """Calls ``visit(raw, own)`` with ``raw = anchors @ block.T`` for every rank's candidate
    block (``own``: the block is this rank's), each block arriving while the previous one is
    computed on."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    block, owner = candidates.detach(), rank
    for step in range(world):
        pending = _start_exchange(block, sizes[(owner - 1) % world], rank, world, group) if step < world - 1 else None
        visit(anchors @ block.T, owner == rank)
        if pending is not None:
            block, transfer = pending
            _wait(transfer)
            owner = (owner - 1) % world


def ring_gradients(anchors: torch.Tensor, candidates: torch.Tensor, sizes: List[int], group, tile_gradient):
    """(dL/d anchors, dL/d candidates) of a loss whose gradient wrt ``raw = anchors @ block.T`` is
    ``tile_gradient(raw, own)`` for each block: the blocks travel the ring again, each with the
    gradient of its rows, which every rank adds to and one last pass returns to the owner.

    A block is sent on as soon as it arrives and its gradient as soon as this rank has added to
    it; the gradient coming with the next block is waited for only after that block's tile is
    computed, so both transfers overlap a tile."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    grad_anchors = torch.zeros_like(anchors)
    block, owner = candidates.detach(), rank
    grad_block = torch.zeros_like(candidates, dtype=anchors.dtype)  # this rank's own block starts here
    pending_gradient = None
    for step in range(world):
        incoming_rows = sizes[(owner - 1) % world]
        pending_block = _start_exchange(block, incoming_rows, rank, world, group) if step < world - 1 else None
        grad_raw = tile_gradient(anchors @ block.T, owner == rank)
        grad_anchors.addmm_(grad_raw, block)
        if pending_gradient is not None:  # the gradient of this block, from the ranks before
            grad_block, transfer = pending_gradient
            _wait(transfer)
        grad_block.addmm_(grad_raw.T, anchors)
        del grad_raw
        if pending_block is not None:
            pending_gradient = _start_exchange(grad_block, incoming_rows, rank, world, group)
            block, transfer = pending_block
            _wait(transfer)
            owner = (owner - 1) % world
    if world > 1:  # the complete gradient of rank r + 1's block is here: return it
        grad_block, transfer = _start_exchange(grad_block, sizes[rank], rank, world, group)
        _wait(transfer)
    return grad_anchors, grad_block


def _scalar_gradient(value: torch.Tensor, like: torch.Tensor, needed: bool):
    return value.to(like.dtype).reshape(like.shape) if needed else None


class RingRows(torch.autograd.Function):
    """Per-row InfoNCE losses of the local ``anchors`` (B_r, D) against every rank's
    ``candidates`` (N_s, D) rows, each anchor's positive being ``positive[i]`` among its own
    rank's candidates: ``l_i = logsumexp_j(scale * a_i . c_j) - scale * a_i . c_pos(i)``.

    ``sizes``: every rank's candidate count, in rank order. ``scale``: a 0-d tensor (1 / tau, or
    CLIP's logit scale), which gets its gradient. ``private``: (B_r, H, D) negatives of each
    anchor alone (DPR's hard negatives) or None; they stay on their rank.
    """

    @staticmethod
    def forward(ctx, anchors, candidates, scale, positive, private, sizes: List[int], group):
        value = scale.detach().to(anchors.dtype)
        state = {"lse": anchors.new_full((anchors.shape[0],), float("-inf"))}
        if private is not None and private.shape[1] > 0:
            state["lse"] = torch.logsumexp(_private_raw(anchors.detach(), private.detach()) * value, dim=1)

        def visit(raw, own):
            logits = raw.mul_(value)
            state["lse"] = torch.logaddexp(state["lse"], torch.logsumexp(logits, dim=1))
            if own:
                state["positive"] = logits.gather(1, positive[:, None])[:, 0]

        ring_visit(anchors.detach(), candidates, sizes, group, visit)
        ctx.save_for_backward(anchors, candidates, scale, positive, private, state["lse"])
        ctx.sizes, ctx.group = sizes, group
        return state["lse"] - state["positive"]

    @staticmethod
    def backward(ctx, grad_rows):
        anchors, candidates, scale, positive, private, lse = ctx.saved_tensors
        a = anchors.detach()
        value = scale.detach().to(a.dtype)
        weights = grad_rows.to(a.dtype)
        rows = torch.arange(a.shape[0], device=a.device)
        grad_scale = a.new_zeros(())

        def tile_gradient(raw, own):
            nonlocal grad_scale
            # softmax times the row weight, in place: two tiles of local x block at a time
            grad_logits = (raw * value).sub_(lse[:, None]).exp_().mul_(weights[:, None])
            if own:
                grad_logits[rows, positive] -= weights
            grad_scale = grad_scale + torch.vdot(grad_logits.reshape(-1), raw.reshape(-1))
            return grad_logits.mul_(value)

        grad_anchors, grad_candidates = ring_gradients(a, candidates, ctx.sizes, ctx.group, tile_gradient)
        grad_private = None
        if private is not None:
            h = private.detach()
            private_raw = _private_raw(a, h)
            grad_private_logits = (private_raw * value).sub_(lse[:, None]).exp_().mul_(weights[:, None])
            grad_scale = grad_scale + torch.vdot(grad_private_logits.reshape(-1), private_raw.reshape(-1))
            grad_private_raw = grad_private_logits.mul_(value)
            grad_anchors += torch.bmm(grad_private_raw[:, None, :], h)[:, 0]
            grad_private = (grad_private_raw[:, :, None] * a[:, None, :]).to(private.dtype)
        needs = ctx.needs_input_grad
        return (grad_anchors.to(anchors.dtype) if needs[0] else None,
                grad_candidates.to(candidates.dtype) if needs[1] else None,
                _scalar_gradient(grad_scale, scale, needs[2]), None,
                grad_private if needs[4] else None, None, None)


def _private_raw(anchors: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
    """(B_r, H) products of each anchor with its own private negatives."""
    return torch.bmm(private, anchors[:, :, None])[:, :, 0]


class RingSigmoid(torch.autograd.Function):
    """Per-row SigLIP losses of the local ``anchors`` (B_r, D) against every rank's
    ``candidates``: ``l_i = sum_j softplus(z_ij) - z_ii`` with ``z = scale * a . c + bias``, the
    positive of anchor i being candidate i of its own rank. ``scale``, ``bias``: 0-d tensors."""

    @staticmethod
    def forward(ctx, anchors, candidates, scale, bias, sizes: List[int], group):
        scale_value, bias_value = scale.detach().to(anchors.dtype), bias.detach().to(anchors.dtype)
        state = {"sum": anchors.new_zeros(anchors.shape[0])}

        def visit(raw, own):
            logits = raw.mul_(scale_value).add_(bias_value)
            if own:
                state["positive"] = logits.diagonal().clone()
            state["sum"] += F.softplus(logits).sum(dim=1)

        ring_visit(anchors.detach(), candidates, sizes, group, visit)
        ctx.save_for_backward(anchors, candidates, scale, bias)
        ctx.sizes, ctx.group = sizes, group
        return state["sum"] - state["positive"]

    @staticmethod
    def backward(ctx, grad_rows):
        anchors, candidates, scale, bias = ctx.saved_tensors
        a = anchors.detach()
        scale_value, bias_value = scale.detach().to(a.dtype), bias.detach().to(a.dtype)
        weights = grad_rows.to(a.dtype)
        grads = {"scale": a.new_zeros(()), "bias": a.new_zeros(())}

        def tile_gradient(raw, own):
            grad_logits = torch.sigmoid(raw * scale_value + bias_value).mul_(weights[:, None])  # d softplus(z) = sigmoid(z)
            if own:
                grad_logits.diagonal().sub_(weights)
            grads["scale"] = grads["scale"] + torch.vdot(grad_logits.reshape(-1), raw.reshape(-1))
            grads["bias"] = grads["bias"] + grad_logits.sum()
            return grad_logits.mul_(scale_value)

        grad_anchors, grad_candidates = ring_gradients(a, candidates, ctx.sizes, ctx.group, tile_gradient)
        needs = ctx.needs_input_grad
        return (grad_anchors.to(anchors.dtype) if needs[0] else None,
                grad_candidates.to(candidates.dtype) if needs[1] else None,
                _scalar_gradient(grads["scale"], scale, needs[2]), _scalar_gradient(grads["bias"], bias, needs[3]),
                None, None)


def ring_rows(anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor, positive: Optional[torch.Tensor],
              sizes: List[int], group, private: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B_r,) losses of :class:`RingRows`; ``positive`` defaults to ``arange(B_r)``."""
    if positive is None:
        positive = torch.arange(anchors.shape[0], device=anchors.device)
    return RingRows.apply(anchors, candidates, scale, positive.long(), private, list(sizes), group)


def ring_sigmoid_rows(anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                      sizes: List[int], group) -> torch.Tensor:
    """(B_r,) losses of :class:`RingSigmoid`."""
    return RingSigmoid.apply(anchors, candidates, scale, bias, list(sizes), group)
