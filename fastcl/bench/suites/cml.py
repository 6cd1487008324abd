"""CML loss: fastcl backends vs the reference (the authors' way: gather the sampled negatives into
(B, W, D), differences, squares, min). Negatives come by index into a (J, D) item table, as a
CML trainer samples them; the table's gradient is part of the step."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import Case
from ._common import backend_providers, goal_summary, naive_skip

SUITE = "cml"
BASELINE = "naive"
MODULE = __name__
ITEMS = 50_000
GOAL = {"batch": 16384, "window": 256, "dim": 128}


def make_step(device: str, provider: str, batch: int, window: int, dim: int, items: int = ITEMS):
    import fastcl

    generator = torch.Generator(device="cpu").manual_seed(0)
    users = (0.5 * F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)).to(device).requires_grad_()
    table = (0.5 * F.normalize(torch.randn(items, dim, generator=generator), dim=-1)).to(device).requires_grad_()
    positive_ids = torch.randint(0, items, (batch,), generator=generator).to(device)
    negative_ids = torch.randint(0, items, (batch, window), generator=generator).to(device)

    def step():
        users.grad = None
        table.grad = None
        loss = fastcl.cml_loss(users, table[positive_ids], negative_indices=negative_ids, item_table=table,
                               margin=0.5, backend=provider)
        loss.backward()
        return loss

    return step


def cases(device: str, full: bool):
    providers = backend_providers(device)
    shapes = [(4096, 64, 64), (4096, 256, 128), (16384, 256, 128)]
    if full:
        shapes += [(16384, 1024, 128), (65536, 256, 128), (16384, 256, 256), (65536, 1024, 256)]
    out = []
    for batch, window, dim in shapes:
        for provider in providers:
            # gathered negatives, their differences, squares and gradients: about four B x W x D fp32 tensors
            skip = naive_skip(provider, 4 * batch * window * dim * 4, device, "gathered negatives")
            out.append(Case(SUITE, provider, MODULE, "make_step", {"batch": batch, "window": window, "dim": dim},
                            x=batch, skip=skip, repeats=3 if batch * window * dim <= 2**27 else 1))
    return out


def summarize(rows, device):
    """Time and memory against naive at the goal size (B=16384, W=256, D=128) when it ran."""
    return goal_summary(rows, BASELINE, GOAL,
                        lambda provider: f"{provider} cml B={GOAL['batch']} W={GOAL['window']} D={GOAL['dim']}")
