"""Batch-hard triplet loss: fastcl's blocked path vs the plain PyTorch way (``torch.cdist`` of
every anchor to every positive, the diagonal masked, the row minimum): time and peak memory of
forward + backward, normalized rows."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import Case
from ._common import goal_summary, naive_skip

SUITE = "triplet"
BASELINE = "plain"
MODULE = __name__
GOAL = {"batch": 16384, "dim": 128}


def plain_loss(anchor, positive, margin: float):
    """What a user writes: the B x B distances materialized (cdist's matmul form), then the row minimum."""
    a, p = F.normalize(anchor, dim=-1), F.normalize(positive, dim=-1)
    distance = torch.cdist(a, p)
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    hardest = distance.masked_fill(eye, float("inf")).min(dim=1).values
    return F.relu(margin + distance.diagonal() - hardest).mean()


def make_step(device: str, provider: str, batch: int, dim: int):
    import fastcl

    generator = torch.Generator(device="cpu").manual_seed(0)
    anchor = torch.randn(batch, dim, generator=generator)
    positive = (anchor + 0.8 * torch.randn(batch, dim, generator=generator)).to(device).requires_grad_()
    anchor = anchor.to(device).requires_grad_()

    def step():
        anchor.grad = positive.grad = None
        if provider == "plain":
            loss = plain_loss(anchor, positive, 0.2)
        else:
            loss = fastcl.triplet_margin_loss(anchor, positive, margin=0.2, backend=provider)
        loss.backward()
        return loss

    return step


def cases(device: str, full: bool):
    shapes = [(256, 128), (4096, 128), (16384, 128)] + ([(65536, 128)] if full else [])
    out = []
    for batch, dim in shapes:
        for provider in ("plain", "torch"):
            # the distances, their mask and the backward's copies: about three B x B fp32 tensors
            skip = naive_skip("naive" if provider == "plain" else provider, 3 * batch * batch * 4, device, "B x B distances")
            out.append(Case(SUITE, provider, MODULE, "make_step", {"batch": batch, "dim": dim}, x=batch, skip=skip,
                            repeats=3 if batch <= 16384 else 1))
    return out


def summarize(rows, device):
    """Time and memory against the plain loss at B = 16384, D = 128."""
    return goal_summary(rows, BASELINE, GOAL, lambda provider: f"{provider} triplet B={GOAL['batch']} D={GOAL['dim']}")
