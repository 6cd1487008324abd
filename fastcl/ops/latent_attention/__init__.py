"""Latent-attention pooling (NV-Embed) as a fused op and a drop-in module.

Maths (per sequence; h the (L, d) token states, R the (r, d) trainable latents)::

    x = LN(h),  C = LN_ctx(R),  q = x Wq^T,  [k | v] = C Wkv^T
    y = h + concat_h(softmax(q_h k_h^T / sqrt(dh)) v_h) Wout^T
    z = y + GEGLU(LN_ff(y) W1^T + b1) W2^T + b2,   GEGLU(u) = u[:, :F] * gelu(u[:, F:])
    out = sum_t m_t z_t / sum_t m_t   (m = pool_mask), then optionally L2-normalized

Backends: ``naive`` (reference, every intermediate materialized), ``torch`` (the fused chunked
algorithm of :mod:`.chunked` with PyTorch elementwise ops, any device), ``cpu`` (same with the
C++ kernels of ``csrc/cpu/latent_attention.cpp``) and ``triton`` (same with Triton kernels, CUDA;
CPU only under ``TRITON_INTERPRET=1``). ``auto`` never picks ``naive``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._native import warn_once
from ..common.backends import resolve_backend as _resolve_backend
from . import naive
from .chunked import ElementwiseKernels
from .naive import LatentAttentionParameters, NaiveLatentAttentionPooling
from .op import LatentAttentionFunction
from .options import check_latent_attention_args

__all__ = ["latent_attention_pool", "LatentAttentionPooling", "LatentAttentionFunction",
           "NaiveLatentAttentionPooling", "resolve_backend"]

# GPU implementations of this op (resolve_backend only checks membership).
EXTRA_BACKENDS = {"triton": None}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run for tensors on ``device``; ``auto`` never picks ``naive``."""
    return _resolve_backend(backend, device, EXTRA_BACKENDS)


def _kernels(backend: str) -> ElementwiseKernels:
    if backend == "cpu":
        from .native import NativeKernels

        return NativeKernels()
    if backend == "triton":
        from .triton import TritonKernels

        return TritonKernels()
    return ElementwiseKernels()


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
    *,
    num_heads: int = 8,
    normalize: bool = True,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    r"""NV-Embed latent-attention pooling of token states into one embedding per sequence.

    Args:
        hidden_states: (B, L, d) token states, float16 / bfloat16 / float32 (float64: naive/torch).
        pool_mask: (B, L) 0/1 (bool, int or float): tokens averaged into the output. Tokens with
            0 (padding, instruction) contribute nothing and are not even computed by the fused
            backends. Every sequence needs at least one pooled token.
        latents: (r, d) trainable latent array (keys and values come from it, computed once).
        norm_weight, norm_bias: (d,) LayerNorm of the tokens before attention.
        norm_context_weight, norm_context_bias: (d,) LayerNorm of the latents.
        to_q_weight: (H*dh, d); to_kv_weight: (2*H*dh, d), keys first; to_out_weight: (d, H*dh).
            Heads are the outer factor of the inner dimension ``(h dh)``. No biases.
        ff_norm_weight, ff_norm_bias: (d,) LayerNorm before the feed-forward.
        ff_in_weight, ff_in_bias: (2F, d), (2F,); ff_out_weight, ff_out_bias: (d, F), (d,).
        num_heads: H; the head size is ``to_q_weight.shape[0] // H``, scores scaled by dh^-1/2.
        normalize: L2-normalize the pooled embedding.
        backend: "auto" | "naive" | "torch" | "cpu" | "triton".

    Returns:
        (B, d) in the dtype of ``hidden_states``; gradients flow to the hidden states and every
        parameter.

    Example::

        >>> pool = fastcl.LatentAttentionPooling(384, num_latents=64, num_heads=4)
        >>> h = torch.randn(2, 10, 384); mask = torch.ones(2, 10)
        >>> emb = fastcl.latent_attention_pool(h, mask, *pool.flat_parameters(), num_heads=4)
        >>> emb.shape
        torch.Size([2, 384])
    """
    params = (latents, norm_weight, norm_bias, norm_context_weight, norm_context_bias, to_q_weight,
              to_kv_weight, to_out_weight, ff_norm_weight, ff_norm_bias, ff_in_weight, ff_in_bias,
              ff_out_weight, ff_out_bias)
    check_latent_attention_args(hidden_states, pool_mask, params, num_heads, eps, backend)
    chosen = resolve_backend(backend, hidden_states.device)
    if chosen == "naive":
        return naive.latent_attention_pool(hidden_states, pool_mask, *params, num_heads=num_heads,
                                           normalize=normalize, eps=eps)
    if chosen == "cpu" and hidden_states.dtype == torch.float64:
        warn_once("latent-cpu-f64", "fastcl.latent_attention_pool: the native CPU kernels are float32; "
                                    "float64 inputs use the PyTorch elementwise path")
        chosen = "torch"
    pooled = LatentAttentionFunction.apply(hidden_states, pool_mask, num_heads, float(eps), _kernels(chosen), *params)
    if normalize:
        wide = pooled if pooled.dtype == torch.float64 else pooled.float()
        pooled = F.normalize(wide, p=2, dim=-1).to(hidden_states.dtype)
    return pooled


class LatentAttentionPooling(LatentAttentionParameters):
    """Drop-in NV-Embed latent-attention pooling layer: ``(B, L, d), (B, L) -> (B, d)``.

    The ``state_dict`` uses NV-Embed's names (``latents``, ``cross_attend_blocks.0.norm.*``,
    ``cross_attend_blocks.0.norm_context.*``, ``cross_attend_blocks.0.fn.to_q/to_kv/to_out.weight``,
    ``cross_attend_blocks.1.norm.*``, ``cross_attend_blocks.1.fn.net.0.*``,
    ``cross_attend_blocks.1.fn.net.2.*``), so NV-Embed's latent-attention weights load with
    ``load_state_dict`` (strip the checkpoint's ``latent_attention_model.`` prefix first).

    Args:
        hidden_size: d. num_latents: r (512 in NV-Embed). num_heads: H (8).
        head_dim: dh; None means ``hidden_size`` (NV-Embed's choice, so H*dh = 8d).
        ff_mult: the feed-forward width is ``ff_mult * d`` (GEGLU input ``2 * ff_mult * d``).
        normalize: L2-normalize the pooled embedding.
        backend: default backend of :func:`latent_attention_pool`.

    Example::

        >>> pool = fastcl.LatentAttentionPooling(384, num_latents=512, num_heads=8)
        >>> emb = pool(hidden_states, attention_mask)   # (B, L, 384), (B, L) -> (B, 384)
    """

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8,
                 head_dim: Optional[int] = None, ff_mult: int = 4, normalize: bool = True, backend: str = "auto"):
        super().__init__(hidden_size, num_latents, num_heads, head_dim, ff_mult)
        self.normalize = normalize
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        return latent_attention_pool(hidden_states, pool_mask, *self.flat_parameters(), num_heads=self.num_heads,
                                     normalize=self.normalize, backend=self.backend)
