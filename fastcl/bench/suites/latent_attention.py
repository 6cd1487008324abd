"""Latent-attention pooling (NV-Embed): fused backends vs the eager reference module.

The baseline ``naive`` is :class:`fastcl.ops.latent_attention.NaiveLatentAttentionPooling`
(every intermediate materialized, keys/values of the latents computed once per call);
``eager_sdpa`` is the same module with ``F.scaled_dot_product_attention`` for the attention
(what NV-Embed's own module calls), shown for reference. Every
provider runs forward + backward with gradients for the hidden states and all parameters
(parameter gradients are set to None before each step, so they count as extra memory on both
sides). All tokens are pooled (pool_mask of ones): the fused backends' skipping of unpooled
tokens does not help them here.
"""
from __future__ import annotations

import torch

from ..harness import Case

SUITE = "latent_attention"
BASELINE = "naive"
MODULE = __name__


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def make_step(device: str, provider: str, batch: int, length: int, hidden: int, heads: int, head_dim: int,
              latents: int, dtype: str = "float32"):
    from fastcl.ops.latent_attention import LatentAttentionPooling, NaiveLatentAttentionPooling

    torch.manual_seed(0)
    if provider in ("naive", "eager_sdpa"):
        module = NaiveLatentAttentionPooling(hidden, num_latents=latents, num_heads=heads, head_dim=head_dim,
                                             use_sdpa=provider == "eager_sdpa")
    else:
        module = LatentAttentionPooling(hidden, num_latents=latents, num_heads=heads, head_dim=head_dim,
                                        backend=provider)
    module = module.to(device=device, dtype=_dtype(dtype))
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden_states = torch.randn(batch, length, hidden, generator=generator)
    hidden_states = hidden_states.to(device=device, dtype=_dtype(dtype)).requires_grad_()
    pool_mask = torch.ones(batch, length, device=device)
    target = torch.randn(batch, hidden, generator=generator).to(device=device, dtype=_dtype(dtype))

    def step():
        hidden_states.grad = None
        module.zero_grad(set_to_none=True)
        embedding = module(hidden_states, pool_mask)
        loss = (embedding.float() * target.float()).sum()  # a gradient that is not all ones
        loss.backward()
        return loss

    return step


def cases(device: str, full: bool):
    import fastcl

    available = fastcl.backends()
    providers = ["naive", "eager_sdpa", "torch"]
    if device == "cpu" and available["cpu"].available:
        providers.append("cpu")
    if device == "cuda" and available["triton"].available:
        providers.append("triton")
    shapes = []
    if device == "cpu":
        shapes.append(dict(batch=32, length=128, hidden=384, heads=8, head_dim=384, latents=512, dtype="float32"))
        if full:
            shapes.append(dict(batch=64, length=256, hidden=384, heads=8, head_dim=384, latents=512, dtype="float32"))
    else:
        shapes.append(dict(batch=32, length=128, hidden=384, heads=8, head_dim=384, latents=512, dtype="float32"))
        shapes.append(dict(batch=16, length=512, hidden=4096, heads=8, head_dim=4096, latents=512, dtype="bfloat16"))
        if full:
            shapes.append(dict(batch=32, length=512, hidden=4096, heads=8, head_dim=4096, latents=512, dtype="bfloat16"))
    out = []
    for shape in shapes:
        for provider in providers:
            skip = None
            if provider == "torch" and device == "cpu" and available["cpu"].available and not full:
                skip = "same algorithm as 'cpu' with PyTorch elementwise ops; measured with --full"
            out.append(Case(SUITE, provider, MODULE, "make_step", dict(shape), x=shape["batch"] * shape["length"],
                            skip=skip, repeats=3 if device == "cpu" else 5))
    return out
