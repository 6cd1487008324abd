"""SigLIP: fastcl backends vs the plain PyTorch loss on materialized logits (open_clip's way)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import Case
from ._common import backend_providers, naive_skip, ratio_text

SUITE = "siglip"
BASELINE = "naive"
MODULE = __name__


def naive_loss(image, text, scale, bias):
    """Materialize the B x B logits, -log sigmoid of the signed logits, summed, over B."""
    logits = scale * image @ text.T + bias
    signs = 2 * torch.eye(image.shape[0], device=image.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def make_step(device: str, provider: str, batch: int, dim: int):
    import fastcl

    generator = torch.Generator(device="cpu").manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).to(device).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).to(device).requires_grad_()
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)

    def step():
        for tensor in (image, text, scale, bias):
            tensor.grad = None
        if provider == "naive":
            loss = naive_loss(image, text, scale, bias)
        else:
            loss = fastcl.siglip_loss(image, text, scale, bias, backend=provider)
        loss.backward()
        return loss

    return step


def cases(device: str, full: bool):
    providers = backend_providers(device)
    batches = [1024, 2048, 4096, 8192] + ([16384] if full else [])
    out = []
    for batch in batches:
        for provider in providers:
            # logits, signs, their product and the gradient: about four B x B fp32 tensors
            skip = naive_skip(provider, 4 * batch * batch * 4, device, "logits")
            out.append(Case(SUITE, provider, MODULE, "make_step", {"batch": batch, "dim": 256},
                            x=batch, skip=skip, repeats=3 if batch <= 8192 else 1))
    return out


def summarize(rows, device):
    """Time and memory ratios against naive at the largest batch both ran."""
    ok = {(m.provider, m.params["batch"]): m for m in rows if m.status == "ok"}
    lines = []
    for provider in sorted({m.provider for m in rows} - {BASELINE}):
        shared = [b for (p, b) in ok if p == provider and (BASELINE, b) in ok]
        if not shared:
            continue
        batch = max(shared)
        ours, base = ok[(provider, batch)], ok[(BASELINE, batch)]
        lines.append(f"{provider} D=256 siglip: B={batch} {ratio_text(ours, base)}")
    return "\n".join(lines)
