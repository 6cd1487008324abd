"""Argument checking shared by every latent-attention backend: one place, one set of messages."""
from __future__ import annotations

import torch

from ...validation import checks_values

from ..common.checks import FLOAT_DTYPES, check_choice, check_float_tensor

BACKENDS = ("auto", "naive", "torch", "cpu", "triton")
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + FLOAT_DTYPES

# (name, expected shape in words, shape as a function of (d, r, inner, F)) in positional order.
PARAMETER_SHAPES = (
    ("latents", "(num_latents, d)", lambda d, r, inner, ff: (r, d)),
    ("norm_weight", "(d,)", lambda d, r, inner, ff: (d,)),
    ("norm_bias", "(d,)", lambda d, r, inner, ff: (d,)),
    ("norm_context_weight", "(d,)", lambda d, r, inner, ff: (d,)),
    ("norm_context_bias", "(d,)", lambda d, r, inner, ff: (d,)),
    ("to_q_weight", "(num_heads*head_dim, d)", lambda d, r, inner, ff: (inner, d)),
    ("to_kv_weight", "(2*num_heads*head_dim, d)", lambda d, r, inner, ff: (2 * inner, d)),
    ("to_out_weight", "(d, num_heads*head_dim)", lambda d, r, inner, ff: (d, inner)),
    ("ff_norm_weight", "(d,)", lambda d, r, inner, ff: (d,)),
    ("ff_norm_bias", "(d,)", lambda d, r, inner, ff: (d,)),
    ("ff_in_weight", "(2*F, d) with F = ff_mult*d", lambda d, r, inner, ff: (2 * ff, d)),
    ("ff_in_bias", "(2*F,)", lambda d, r, inner, ff: (2 * ff,)),
    ("ff_out_weight", "(d, F)", lambda d, r, inner, ff: (d, ff)),
    ("ff_out_bias", "(d,)", lambda d, r, inner, ff: (d,)),
)


def checking_values(*tensors) -> bool:
    """Data-dependent checks need the values on the host: CPU tensors always, GPU tensors in
    validation mode only (:mod:`fastcl.validation`), nothing while torch.compile traces."""
    return checks_values(*tensors)


def check_latent_attention_args(hidden_states, pool_mask, params, num_heads, eps, backend) -> None:
    """Raise TypeError / ValueError naming the argument and the expected shape or dtype."""
    check_float_tensor("hidden_states", hidden_states, "(B, L, d)", 3)
    batch, length, hidden = hidden_states.shape
    if batch == 0 or length == 0 or hidden == 0:
        raise ValueError(f"hidden_states is empty (shape {tuple(hidden_states.shape)})")
    if not isinstance(pool_mask, torch.Tensor):
        raise TypeError(f"pool_mask must be a torch.Tensor of shape (B, L) = ({batch}, {length}), got {type(pool_mask).__name__}")
    if tuple(pool_mask.shape) != (batch, length):
        raise ValueError(f"pool_mask must have shape (B, L) = ({batch}, {length}), got {tuple(pool_mask.shape)}")
    if pool_mask.dtype not in MASK_DTYPES:
        raise TypeError(f"pool_mask must be a bool, integer or float tensor of 0/1 weights, got {pool_mask.dtype}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    check_choice("backend", backend, BACKENDS)
    if len(params) != len(PARAMETER_SHAPES):
        raise TypeError(f"expected {len(PARAMETER_SHAPES)} parameter tensors "
                        f"({', '.join(n for n, _, _ in PARAMETER_SHAPES)}), got {len(params)}")
    for (name, _, _), tensor in zip(PARAMETER_SHAPES, params):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    latents, to_q, ff_out = params[0], params[5], params[12]
    if latents.dim() != 2:
        raise ValueError(f"latents must have shape (num_latents, d), got {tuple(latents.shape)}")
    if to_q.dim() != 2 or to_q.shape[0] % num_heads:
        raise ValueError(f"to_q_weight must have shape (num_heads*head_dim, d) with num_heads={num_heads}, "
                         f"got {tuple(to_q.shape)}")
    if ff_out.dim() != 2:
        raise ValueError(f"ff_out_weight must have shape (d, F), got {tuple(ff_out.shape)}")
    sizes = (hidden, latents.shape[0], to_q.shape[0], ff_out.shape[1])
    for (name, words, shape_of), tensor in zip(PARAMETER_SHAPES, params):
        expected = shape_of(*sizes)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} must have shape {words} = {expected} for hidden size d={hidden}, got {tuple(tensor.shape)}")
        if tensor.dtype != hidden_states.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but hidden_states has {hidden_states.dtype}: "
                            f"cast the module (module.to(dtype)) or the hidden states so they match")
        if tensor.device != hidden_states.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden_states is on {hidden_states.device}")
    if pool_mask.device != hidden_states.device:
        raise ValueError(f"pool_mask is on {pool_mask.device} but hidden_states is on {hidden_states.device}")
    if checking_values(pool_mask):
        weights = pool_mask.float()
        if bool((weights < 0).any()):
            raise ValueError("pool_mask must be non-negative (0/1 weights)")
        empty = (weights.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"pool_mask selects no token in sequence(s) {empty[:8]}: every sequence needs at "
                             f"least one pooled token")
