"""Collaborative contrastive loss (CCN): fastcl backends vs the reference on materialized
(P, L, L) page logits. P pages of L items (a quarter of the positions padding on average,
about a third of the items clicked), with a trigger item per page."""
from __future__ import annotations

import torch

from ..harness import Case
from .info_nce import _available_bytes

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
    import fastcl

    available = fastcl.backends()
    providers = ["naive", "torch"]
    if device == "cpu" and available["cpu"].available:
        providers.append("cpu")
    if device == "cuda" and available["triton"].available:
        providers.append("triton")
    shapes = [(4096, 64, 64), (4096, 128, 64)]
    if full:
        shapes += [(16384, 128, 128), (65536, 64, 64), (4096, 256, 256), (4096, 1024, 64)]
    out = []
    for pages, length, dim in shapes:
        for provider in providers:
            skip = None
            need = 8 * pages * length * length * 4  # logits, masks, softmax and their gradients
            if provider == "naive" and need > 0.4 * _available_bytes(device):
                skip = f"needs ~{need / 2**30:.0f} GiB for the page logits"
            out.append(Case(SUITE, provider, MODULE, "make_step", {"pages": pages, "length": length, "dim": dim},
                            x=pages, skip=skip, repeats=3))
    return out


def summarize(rows, device):
    """Time and memory against naive at the goal size when it ran."""
    ok = {(m.provider, tuple(m.params[k] for k in ("pages", "length", "dim"))): m for m in rows if m.status == "ok"}
    goal = tuple(GOAL.values())
    base = ok.get((BASELINE, goal))
    lines = []
    for provider in sorted({m.provider for m in rows} - {BASELINE}):
        ours = ok.get((provider, goal))
        if ours and base:
            lines.append(f"{provider} collaborative P={goal[0]} L={goal[1]} D={goal[2]}: time "
                         f"{ours.time_ms / base.time_ms:.2f}x naive, peak extra memory {ours.peak_mb / base.peak_mb:.3f}x "
                         f"naive ({ours.peak_mb:.0f} MB vs {base.peak_mb:.0f} MB)")
    return "\n".join(lines)
