"""InfoNCE (one direction) and CLIP (symmetric): fastcl backends vs F.cross_entropy on materialized logits."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..harness import Case

SUITE = "info_nce"
BASELINE = "naive"
MODULE = __name__


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def naive_loss(query, key, temperature, symmetric):
    """The plain PyTorch way: materialize the logits, cross-entropy on the diagonal."""
    logits = (query @ key.T).float() / temperature
    target = torch.arange(query.shape[0], device=query.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def make_step(device: str, provider: str, batch: int, dim: int, dtype: str = "float32", symmetric: bool = False):
    import fastcl

    generator = torch.Generator(device="cpu").manual_seed(0)
    query = torch.randn(batch, dim, generator=generator).to(device=device, dtype=_dtype(dtype))
    key = torch.randn(batch, dim, generator=generator).to(device=device, dtype=_dtype(dtype))
    query = F.normalize(query, dim=-1).requires_grad_()
    key = F.normalize(key, dim=-1).requires_grad_()
    temperature = 0.05

    def step():
        query.grad = None
        key.grad = None
        if provider == "naive":
            loss = naive_loss(query, key, temperature, symmetric)
        else:
            loss = fastcl.info_nce(query, key, temperature=temperature, symmetric=symmetric, backend=provider)
        loss.backward()
        return loss

    return step


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cases(device: str, full: bool):
    import fastcl

    available = fastcl.backends()
    providers = ["naive", "torch"]
    if device == "cpu" and available["cpu"].available:
        providers.append("cpu")
    if device == "cuda":
        providers += [name for name in ("triton", "cuda") if available[name].available]
    dims = [256, 768] if full else [256]
    batches = [1024, 2048, 4096, 8192]
    if full:
        batches += [16384, 32768, 65536]
    out = []
    for symmetric in (False, True):
        for dim in dims:
            for batch in batches:
                if symmetric and (dim != 256 or batch > 16384):
                    continue
                if dim != 256 and batch > 8192:  # the D=768 goal is at B=8192
                    continue
                for provider in providers:
                    skip = None
                    if provider == "naive" and 3 * batch * batch * 4 > 0.4 * _available_bytes(device):
                        skip = f"needs ~{3 * batch * batch * 4 / 2**30:.0f} GiB for the logits"
                    if provider == "torch" and device == "cpu" and batch > 16384:
                        skip = "pure-PyTorch path is slow at this size on CPU; see the native row"
                    out.append(Case(SUITE, provider, MODULE, "make_step",
                                    {"batch": batch, "dim": dim, "dtype": "float32", "symmetric": symmetric},
                                    x=batch, skip=skip, repeats=3 if batch <= 8192 else 1))
    return out


def summarize(rows, device):
    """Goal checks: time and memory ratios at B=8192, growth exponent of memory over B."""
    import math

    ok = {(m.provider, m.params["batch"], m.params["dim"], m.params["symmetric"]): m for m in rows if m.status == "ok"}
    lines = []
    for provider in sorted({m.provider for m in rows} - {BASELINE}):
        for (dim, symmetric) in sorted({(m.params["dim"], m.params["symmetric"]) for m in rows}):
            label = f"{provider} D={dim} {'clip' if symmetric else 'info_nce'}"
            ours = ok.get((provider, 8192, dim, symmetric))
            base = ok.get((BASELINE, 8192, dim, symmetric))
            if ours and base:
                lines.append(f"{label}: B=8192 time {ours.time_ms / base.time_ms:.2f}x naive, "
                             f"peak extra memory {ours.peak_mb / base.peak_mb:.3f}x naive ({ours.peak_mb:.0f} MB vs {base.peak_mb:.0f} MB)")
            points = sorted((m.params["batch"], m.peak_mb) for (p, b, d, s), m in ok.items()
                            if p == provider and d == dim and s == symmetric and b >= 4096 and m.peak_mb > 0)
            if len(points) >= 2:
                xs = [math.log(b) for b, _ in points]
                ys = [math.log(mb) for _, mb in points]
                mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
                slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
                lines.append(f"{label}: peak memory ~ B^{slope:.2f} over B = {points[0][0]}..{points[-1][0]} "
                             f"(largest: {points[-1][1]:.0f} MB at B={points[-1][0]})")
    return "\n".join(lines)
