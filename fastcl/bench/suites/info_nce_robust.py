"""InfoNCE on the inputs users feed it: unnormalized embeddings (raw dot products,
DPR style) at tau = 0.05 and 1, small batches, and the first call in a fresh process.

The baseline is the plain PyTorch loss (cross-entropy on the materialized logits) in the same
run. ``--full`` adds the larger unnormalized sizes; the goal grid is the separate
suite ``info_nce_goals`` (``--full`` only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import Case
from .info_nce import naive_loss

SUITE = "info_nce_robust"
BASELINE = "naive"
MODULE = __name__


def make_step(device: str, provider: str, batch: int, dim: int, normalized: bool, temperature: float,
              dtype: str = "float32", group: str = ""):
    """fwd+bwd of one loss; unnormalized inputs are randn (norms ~ sqrt(D): 16 at D = 256)."""
    import fastcl

    generator = torch.Generator(device="cpu").manual_seed(0)
    query = torch.randn(batch, dim, generator=generator).to(device)
    key = torch.randn(batch, dim, generator=generator).to(device)
    if normalized:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    query.requires_grad_()
    key.requires_grad_()

    def step():
        query.grad = None
        key.grad = None
        if provider == "naive":
            loss = naive_loss(query, key, temperature, False)
        else:
            loss = fastcl.info_nce(query, key, temperature=temperature, backend=provider)
        loss.backward()
        return loss

    return step


def _providers(device: str, extra=("auto",)):
    import fastcl

    providers = ["naive"]
    if device == "cpu" and fastcl.backends()["cpu"].available:
        providers.append("cpu")
    return providers + list(extra)


def cases(device: str, full: bool):
    out = []
    providers = _providers(device)

    def add(group, batch, dim, normalized, temperature, provider, **kw):
        params = {"batch": batch, "dim": dim, "normalized": normalized, "temperature": temperature,
                  "dtype": "float32", "group": group}
        out.append(Case(SUITE, provider, MODULE, "make_step", params, x=batch, **kw))

    # unnormalized: the subnormal / huge-gap inputs
    for temperature in (0.05, 1.0):
        for dim in (256, 768):
            for batch in ([2048, 4096, 8192] if full else [2048]):
                for provider in providers:
                    add("unnormalized", batch, dim, False, temperature, provider, repeats=3 if batch <= 4096 else 2)
    # small batches, normalized, tau = 0.05 (item 9)
    for batch in ([64, 128, 256, 512, 1024, 2048] if full else [64, 256, 1024, 2048]):
        for provider in providers:
            add("small", batch, 256, True, 0.05, provider, repeats=5)
    # first call in a fresh process vs the steady state (item 10): the fused path (B = 4096 is
    # above auto's materializing threshold) and the plain loss for comparison
    for provider in providers:
        add("first_call", 4096, 256, True, 0.05, provider, first_call=True)
    return out


def summarize(rows, device):
    lines = []
    base = {(m.params["group"], m.params["batch"], m.params["dim"], m.params["temperature"]): m
            for m in rows if m.provider == BASELINE and m.status == "ok"}
    for m in rows:
        if m.provider == BASELINE or m.status != "ok":
            continue
        ref = base.get((m.params["group"], m.params["batch"], m.params["dim"], m.params["temperature"]))
        if m.params["group"] == "first_call":
            e = m.extra
            lines.append(f"{m.provider} first call B={m.params['batch']}: {m.time_ms:.0f} ms, {m.peak_mb:.0f} MB vs "
                         f"steady {e['steady_ms']:.0f} ms, {e['steady_peak_mb']:.0f} MB "
                         f"(+{e['first_minus_steady_ms'] / 1e3:.2f} s, +{e['first_minus_steady_mb']:.0f} MB; "
                         f"goal <= +0.5 s, +30 MB)")
        elif ref is not None:
            lines.append(f"{m.provider} {m.params['group']} B={m.params['batch']} D={m.params['dim']} "
                         f"tau={m.params['temperature']}: {m.time_ms / ref.time_ms:.2f}x naive time")
    return "\n".join(lines)
