"""Selective patch encoding (PS3).

* ``op=gather``: ``fastcl.gather_patches`` against interpolate + unfold + index (``naive``), the
  forward pass only (the issue's goal), at 3780 x 3780 RGB, P = 14, K = 2560 in ``--full``.
* ``op=encoder``: ``SelectivePatchEncoder`` (low-res pass + ``budget`` selected high-res
  tokens) against encoding every high-res patch with the same ViT (``naive``), forward +
  backward, both with ``F.scaled_dot_product_attention``; the ``tokens`` column counts the
  tokens each side runs through the ViT. ``--full``: 1512 px, low-res 378, scales 756 + 1512,
  budget 2560 (11,664 vs 729 + 2,560 tokens).
"""
from __future__ import annotations

import torch

from ..harness import Case

SUITE = "patches"
BASELINE = "naive"
MODULE = __name__
PATCH = 14


def make_gather(device: str, provider: str, side: int, size: int, count: int, op: str = "gather"):
    import fastcl
    from fastcl.ops.patches import naive

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, side, side, generator=generator).to(device)
    grid = (size // PATCH) ** 2
    index = torch.randperm(grid, generator=generator)[:count].sort().values[None].to(device)
    cut_at = None if size == side else (size, size)

    def step():
        with torch.no_grad():
            if provider == "naive":
                return naive.gather_patches(images, index, PATCH, cut_at)[0]
            return fastcl.gather_patches(images, index, PATCH, cut_at, backend=provider)[0]

    step.extra = {"patches": count, "grid": grid}
    return step


def make_encoder(device: str, provider: str, side: int, low_res: int, scales, budget: int, dim: int, depth: int,
                 heads: int, op: str = "encoder"):
    import fastcl

    torch.manual_seed(0)
    encoder = fastcl.SelectivePatchEncoder(patch_size=PATCH, low_res=low_res, scales=tuple(scales), budget=budget,
                                           dim=dim, depth=depth, heads=heads).to(device)
    images = torch.rand(1, 3, side, side).to(device)

    def step():
        encoder.zero_grad(set_to_none=True)
        if provider == "naive":
            pooled = encoder.encode_all_patches(images, scales[-1])
        else:
            pooled = encoder(images).pooled
        pooled.square().sum().backward()
        return pooled.detach()

    tokens = (scales[-1] // PATCH) ** 2 if provider == "naive" else budget + (low_res // PATCH) ** 2
    step.extra = {"tokens": tokens}
    return step


def gather_providers(device: str):
    import fastcl

    available = fastcl.backends()
    if device == "cuda":
        return ["naive", "torch"] + [name for name in ("cuda", "triton") if available[name].available]
    return ["naive", "torch"] + (["cpu"] if available["cpu"].available else [])


def cases(device: str, full: bool):
    out = []
    if full:
        gather_shapes = [(3780, 3780, 2560), (3780, 1512, 2560)]
        encoder_shape = dict(side=1512, low_res=378, scales=[756, 1512], budget=2560, dim=384, depth=4, heads=6)
    else:
        gather_shapes = [(1512, 1512, 1024), (1512, 756, 1024)]
        encoder_shape = dict(side=756, low_res=252, scales=[378, 756], budget=640, dim=192, depth=4, heads=3)
    for side, size, count in gather_shapes:
        for provider in gather_providers(device):
            out.append(Case(SUITE, provider, MODULE, "make_gather",
                            {"op": "gather", "side": side, "size": size, "count": count}, x=side, repeats=5 if full else 3))
    for provider in ("naive", "selective"):
        out.append(Case(SUITE, provider, MODULE, "make_encoder", {"op": "encoder", **encoder_shape},
                        x=encoder_shape["side"], repeats=1))
    return out
