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

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


def _start_exchange(tensors: Sequence[torch.Tensor], receive_rows: int, rank: int, world: int, group):
    """Send ``tensors`` to rank + 1 and receive same-width tensors of ``receive_rows`` rows from
    rank - 1 (ranks within ``group``); returns (receive buffers, requests)."""
    to = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    source = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    sends = [t.contiguous() for t in tensors]  # referenced by the requests until they complete
    received = [t.new_empty((receive_rows, *t.shape[1:])) for t in sends]
    operations = []
    for send, receive in zip(sends, received):
        operations.append(dist.P2POp(dist.isend, send, to, group))
        operations.append(dist.P2POp(dist.irecv, receive, source, group))
    return received, (dist.batch_isend_irecv(operations), sends)


def _wait(pending) -> None:
    requests, _sends = pending
    for request in requests:
        request.wait()


class RingRows(torch.autograd.Function):
    """Per-row InfoNCE losses of the local ``anchors`` (B_r, D) against every rank's
    ``candidates`` (N_s, D) rows, each anchor's positive being ``positive[i]`` among its own
    rank's candidates: ``l_i = logsumexp_j(scale * a_i . c_j) - scale * a_i . c_pos(i)``.

    ``sizes``: every rank's candidate count, in rank order. ``scale``: a 0-d tensor (1 / tau, or
    CLIP's logit scale), which gets its gradient.
    """

    @staticmethod
    def forward(ctx, anchors, candidates, scale, positive, sizes: List[int], group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        value = scale.detach().to(anchors.dtype)
        lse = anchors.new_full((anchors.shape[0],), float("-inf"))
        positive_logit = None
        block, owner = candidates.detach(), rank
        for step in range(world):
            pending = None
            if step < world - 1:
                pending = _start_exchange([block], sizes[(owner - 1) % world], rank, world, group)
            logits = (anchors.detach() @ block.T).mul_(value)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
            if owner == rank:
                positive_logit = logits.gather(1, positive[:, None])[:, 0]
            del logits
            if pending is not None:
                received, requests = pending
                _wait(requests)
                block, owner = received[0], (owner - 1) % world
        ctx.save_for_backward(anchors, candidates, scale, positive, lse)
        ctx.sizes, ctx.group = sizes, group
        return lse - positive_logit

    @staticmethod
    def backward(ctx, grad_rows):
        anchors, candidates, scale, positive, lse = ctx.saved_tensors
        sizes, group = ctx.sizes, ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        a = anchors.detach()
        value = scale.detach().to(a.dtype)
        weights = grad_rows.to(a.dtype)
        grad_anchors = torch.zeros_like(a)
        grad_scale = a.new_zeros(())
        rows = torch.arange(a.shape[0], device=a.device)
        block, grad_block, owner = candidates.detach(), torch.zeros_like(candidates, dtype=a.dtype), rank
        for step in range(world):
            pending = None
            if step < world - 1:  # the block goes on at once; its gradient once this rank added to it
                pending = _start_exchange([block], sizes[(owner - 1) % world], rank, world, group)
            raw = a @ block.T
            # softmax times the row weight, in place: two tiles of local x block at a time
            grad_logits = (raw * value).sub_(lse[:, None]).exp_().mul_(weights[:, None])
            if owner == rank:
                grad_logits[rows, positive] -= weights
            grad_scale += torch.vdot(grad_logits.reshape(-1), raw.reshape(-1))
            del raw
            grad_raw = grad_logits.mul_(value)
            grad_anchors.addmm_(grad_raw, block)
            grad_block.addmm_(grad_raw.T, a)
            del grad_raw, grad_logits
            incoming_rows = sizes[(owner - 1) % world]
            if pending is not None:
                received, requests = pending
                gradient, gradient_requests = _start_exchange([grad_block], incoming_rows, rank, world, group)
                _wait(requests)
                _wait(gradient_requests)
                block, grad_block, owner = received[0], gradient[0], (owner - 1) % world
        # the complete gradient of rank r + 1's block is here: one last pass returns it
        if world > 1:
            returned, requests = _start_exchange([grad_block], sizes[rank], rank, world, group)
            _wait(requests)
            grad_block = returned[0]
        grad_candidates = grad_block.to(candidates.dtype)
        needs = ctx.needs_input_grad
        return (grad_anchors.to(anchors.dtype) if needs[0] else None,
                grad_candidates if needs[1] else None,
                grad_scale.to(scale.dtype).reshape(scale.shape) if needs[2] else None,
                None, None, None)


def ring_rows(anchors: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor, positive: Optional[torch.Tensor],
              sizes: List[int], group) -> torch.Tensor:
    """(B_r,) losses of :class:`RingRows`; ``positive`` defaults to ``arange(B_r)``."""
    if positive is None:
        positive = torch.arange(anchors.shape[0], device=anchors.device)
    return RingRows.apply(anchors, candidates, scale, positive.long(), list(sizes), group)
