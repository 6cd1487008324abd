"""Reference latent-attention pooling (NV-Embed): plain PyTorch, every intermediate materialized.

This is the ground truth for the tests and the "eager reference" of the benchmark. It follows
NV-Embed's computation step by step, except that the keys and values of the latents are
computed once per call (NV-Embed repeats the latents over the batch first, which gives the
same numbers at B times the cost).

Maths, for one sequence with token states ``h`` (L, d) and latents ``R`` (r, d)::

    x = LN(h)                               C = LN_ctx(R)
    q = x Wq^T   (L, H*dh)                  [k | v] = C Wkv^T  (r, 2*H*dh), k first
    a_h = softmax(q_h k_h^T / sqrt(dh)) v_h     for each head h (columns h*dh:(h+1)*dh)
    y = h + [a_0 .. a_{H-1}] Wout^T
    u = LN_ff(y) W1^T + b1  (L, 2F)         g = u[:, :F] * gelu(u[:, F:])  (exact erf GELU)
    z = y + g W2^T + b2
    pooled = sum_t m_t z_t / sum_t m_t      (m = pool_mask), optionally L2-normalized
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def latent_attention_pool(
    hidden_states: torch.Tensor,
    pool_mask: torch.Tensor,
    latents: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    norm_context_weight: torch.Tensor,
    norm_context_bias: torch.Tensor,
    to_q_weight: torch.Tensor,
    to_kv_weight: torch.Tensor,
    to_out_weight: torch.Tensor,
    ff_norm_weight: torch.Tensor,
    ff_norm_bias: torch.Tensor,
    ff_in_weight: torch.Tensor,
    ff_in_bias: torch.Tensor,
    ff_out_weight: torch.Tensor,
    ff_out_bias: torch.Tensor,
    num_heads: int,
    normalize: bool = True,
    eps: float = 1e-5,
    use_sdpa: bool = False,
) -> torch.Tensor:
    """Latent-attention pooling with every intermediate materialized; (B, L, d) -> (B, d).

    Runs in the dtype of ``hidden_states`` (cast everything to float64 for a high-precision
    reference). Argument checking is done by :func:`fastcl.latent_attention_pool`.
    ``use_sdpa``: attention by ``F.scaled_dot_product_attention`` (as NV-Embed's own module
    does) instead of explicit scores and softmax; a second eager baseline for the benchmark.
    """
    batch, length, hidden = hidden_states.shape
    inner = to_q_weight.shape[0]
    head_dim = inner // num_heads
    x = F.layer_norm(hidden_states, (hidden,), norm_weight, norm_bias, eps)
    context = F.layer_norm(latents, (latents.shape[-1],), norm_context_weight, norm_context_bias, eps)
    q = F.linear(x, to_q_weight)                      # (B, L, H*dh)
    k, v = F.linear(context, to_kv_weight).chunk(2, dim=-1)  # (r, H*dh) each, computed once
    q = q.view(batch, length, num_heads, head_dim).transpose(1, 2)      # (B, H, L, dh)
    k = k.view(-1, num_heads, head_dim).transpose(0, 1)                 # (H, r, dh)
    v = v.view(-1, num_heads, head_dim).transpose(0, 1)
    if use_sdpa:
        attended = F.scaled_dot_product_attention(q, k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)  # (B, H, L, r)
        attended = torch.matmul(scores.softmax(dim=-1), v)
    attended = attended.transpose(1, 2).reshape(batch, length, inner)
    y = hidden_states + F.linear(attended, to_out_weight)
    u = F.linear(F.layer_norm(y, (hidden,), ff_norm_weight, ff_norm_bias, eps), ff_in_weight, ff_in_bias)
    value, gate = u.chunk(2, dim=-1)
    z = y + F.linear(value * F.gelu(gate), ff_out_weight, ff_out_bias)
    weights = pool_mask.to(z.dtype).unsqueeze(-1)
    pooled = (z * weights).sum(dim=1) / weights.sum(dim=1)
    if normalize:
        pooled = F.normalize(pooled, p=2, dim=-1)
    return pooled


class _PreNorm(nn.Module):
    """Container whose parameter names match NV-Embed's ``PreNorm`` (norm, norm_context, fn)."""

    def __init__(self, dim: int, fn: nn.Module, context_dim: Optional[int] = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None
        self.fn = fn


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, ff_mult: int):
        super().__init__()
        # net.1 is GEGLU (parameter-free): keeping the index makes the names net.0 / net.2.
        self.net = nn.Sequential(nn.Linear(dim, 2 * ff_mult * dim), nn.Identity(), nn.Linear(ff_mult * dim, dim))


class LatentAttentionParameters(nn.Module):
    """The parameters of NV-Embed's latent-attention layer under NV-Embed's names.

    ``latents`` (r, d); ``cross_attend_blocks.0.norm`` / ``.norm_context`` (LayerNorms);
    ``cross_attend_blocks.0.fn.to_q`` (H*dh, d), ``.to_kv`` (2*H*dh, d), ``.to_out`` (d, H*dh),
    no biases; ``cross_attend_blocks.1.norm``; ``cross_attend_blocks.1.fn.net.0`` (2*F, d) and
    ``.net.2`` (d, F) with biases, F = ff_mult * d.
    """

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8,
                 head_dim: Optional[int] = None, ff_mult: int = 4):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_latents", num_latents),
                            ("num_heads", num_heads), ("ff_mult", ff_mult)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        head_dim = hidden_size if head_dim is None else head_dim
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int or None, got {head_dim!r}")
        self.hidden_size = hidden_size
        self.num_latents = num_latents
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.ff_mult = ff_mult
        inner = num_heads * head_dim
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))
        self.cross_attend_blocks = nn.ModuleList([
            _PreNorm(hidden_size, _CrossAttention(hidden_size, inner), context_dim=hidden_size),
            _PreNorm(hidden_size, _FeedForward(hidden_size, ff_mult)),
        ])

    def flat_parameters(self):
        """The tensors in the order of the functional API's positional parameters."""
        attention, feed_forward = self.cross_attend_blocks
        return (
            self.latents,
            attention.norm.weight, attention.norm.bias,
            attention.norm_context.weight, attention.norm_context.bias,
            attention.fn.to_q.weight, attention.fn.to_kv.weight, attention.fn.to_out.weight,
            feed_forward.norm.weight, feed_forward.norm.bias,
            feed_forward.fn.net[0].weight, feed_forward.fn.net[0].bias,
            feed_forward.fn.net[2].weight, feed_forward.fn.net[2].bias,
        )

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_latents={self.num_latents}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, ff_mult={self.ff_mult}")


class NaiveLatentAttentionPooling(LatentAttentionParameters):
    """Eager reference module: :func:`latent_attention_pool` on its own parameters."""

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8,
                 head_dim: Optional[int] = None, ff_mult: int = 4, normalize: bool = True, use_sdpa: bool = False):
        super().__init__(hidden_size, num_latents, num_heads, head_dim, ff_mult)
        self.normalize = normalize
        self.use_sdpa = use_sdpa

    def forward(self, hidden_states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        return latent_attention_pool(hidden_states, pool_mask, *self.flat_parameters(),
                                     num_heads=self.num_heads, normalize=self.normalize, use_sdpa=self.use_sdpa)
