"""Collaborative contrastive loss (CCN): fastcl backends vs the reference on materialized
(P, L, L) page logits. P pages of L items (a quarter of the positions padding on average,
about a third of the items clicked), with a trigger item per page."""
from __future__ import annotations

import torch

from ..harness import Case
from ._common import backend_providers, goal_summary, naive_skip

SUITE = "collaborative"
BASELINE = "naive"
MODULE = __name__
GOAL = {"pages": 4096, "length": 128, "dim": 64}


def make_step(device: str, provider: str, pages: int, length: int, dim: int):
    import fastcl

    generator = torch.Generator(device="cpu").manual_seed(0)
    items = torch.randn(pages, length, dim, generator=generator).to(device).requires_grad_()
    trigger = torch.randn(pages, dim, generator=generator).to(device).requires_grad_()
    clicks = (torch.rand(pages, length, generator=generator) < 0.3).to(device)
    lengths = torch.randint(length // 2, length + 1, (pages, 1), generator=generator)
    mask = (torch.arange(length).unsqueeze(0) < lengths).to(device)

    def step():
        items.grad = None
        trigger.grad = None
        loss = fastcl.collaborative_contrastive_loss(items, clicks, mask, trigger=trigger, temperature=0.1,
                                                     backend=provider)
        loss.backward()
        return loss

    return step


def cases(device: str, full: bool):
    providers = backend_providers(device)
    shapes = [(4096, 64, 64), (4096, 128, 64)]
    if full:
        shapes += [(16384, 128, 128), (65536, 64, 64), (4096, 256, 256), (4096, 1024, 64)]
    out = []
    for pages, length, dim in shapes:
        for provider in providers:
            need = 8 * pages * length * length * 4  # logits, masks, softmax and their gradients
            skip = naive_skip(provider, need, device, "page logits")
            out.append(Case(SUITE, provider, MODULE, "make_step", {"pages": pages, "length": length, "dim": dim},
                            x=pages, skip=skip, repeats=3))
    return out


def summarize(rows, device):
    """Time and memory against naive at the goal size when it ran."""
    return goal_summary(rows, BASELINE, GOAL,
                        lambda provider: f"{provider} collaborative P={GOAL['pages']} L={GOAL['length']} D={GOAL['dim']}")
