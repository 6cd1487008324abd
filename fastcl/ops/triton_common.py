"""What every fastcl Triton kernel shares: tile configurations, the pinned-config switch, the
interpreter switches, and the small similarity helpers.

Imported lazily (only when a Triton backend runs), so ``import fastcl`` never imports triton.

Configurations: a short fixed list is autotuned on the GPU (the choice is cached per head
dimension and dtype). ``FASTCL_TRITON_CONFIG="BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages"``
pins one configuration (tests, reproducible benchmarks, very large runs where autotuning
would take too long). Under ``TRITON_INTERPRET=1`` a small configuration is pinned unless the
variable says otherwise: the interpreter would otherwise "benchmark" every configuration.
"""
from __future__ import annotations

import contextlib
import os
from typing import List

import torch
import triton
import triton.language as tl

from .._native import triton_interpreting

CONFIG_ENV = "FASTCL_TRITON_CONFIG"
INTERPRETER_CONFIG = (32, 32, 32, 4, 1)

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages). Forward tiles keep one fp32 BLOCK_M x
# BLOCK_N similarity block live. ptxas (sm_90, bf16, CLIP flags): no spills for the 2nd and 3rd,
# under 300 bytes for the others; 4-warp variants spilled 700-900 bytes and were dropped.
FORWARD_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 8, 3),
]
# Backward kernels: (BLOCK_M, BLOCK_N, BLOCK_D, ACC_D, num_warps, num_stages). The rows kernel
# keeps a BLOCK_M x ACC_D fp32 gradient accumulator on chip, the columns kernel a BLOCK_N x
# ACC_D one, for the embedding slice [g * ACC_D, (g + 1) * ACC_D) of program group g; each
# slice recomputes the similarity tiles, so ACC_D >= D (one slice) costs the least arithmetic
# but the most registers. The lists mix both ends; ptxas reports (sm_90, bf16) no or small
# spills for each, and the autotuner picks on the device. ACC_D is clamped to D's power of two.
# The last entry of each list is small enough for float32 inputs on an A100 (40 KB of shared
# memory); the others need up to 192 KB in float32 (the autotuner skips what does not fit).
BACKWARD_ROWS_CONFIGS = [
    (64, 64, 64, 256, 8, 2),
    (64, 64, 64, 256, 8, 3),
    (32, 64, 64, 512, 8, 2),
    (64, 128, 64, 256, 16, 2),
    (32, 64, 32, 128, 4, 2),
]
BACKWARD_COLUMNS_CONFIGS = [
    (64, 64, 64, 256, 8, 2),
    (64, 64, 64, 256, 8, 3),
    (64, 32, 64, 512, 8, 2),
    (128, 64, 64, 256, 16, 2),
    (64, 32, 32, 128, 4, 2),
]
ACC_D_MAX = 512
# In the interpreter a small slice, so the tests' D (24, 40) cover one slice and several.
INTERPRETER_ACC_D = 32


def accumulator_width(dim: int) -> int:
    """The embedding slice a backward program accumulates when the tile configuration is pinned."""
    limit = INTERPRETER_ACC_D if interpreting() else ACC_D_MAX
    return max(16, min(triton.next_power_of_2(dim), limit))


def accumulator_configs(candidates) -> List[triton.Config]:
    """The backward autotuning list; with a pinned configuration one entry per slice width
    (:func:`prune_accumulator` keeps the one for the call's D); in the interpreter one entry."""
    pinned = os.environ.get(CONFIG_ENV)
    if pinned or interpreting():
        m, n, d, warps, stages = parse_config(pinned) if pinned else INTERPRETER_CONFIG
        widths = [INTERPRETER_ACC_D] if not pinned else [16 << i for i in range(ACC_D_MAX.bit_length() - 4)]
        candidates = [(m, n, d, width, warps, stages) for width in widths]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d, "ACC_D": width}, num_warps=warps, num_stages=stages)
        for m, n, d, width, warps, stages in candidates
    ]


def prune_accumulator(configs, named_args, **_kwargs):
    """Autotuner hook: ACC_D no wider than D's power of two (duplicates dropped); a pinned
    configuration keeps exactly the slice width :func:`accumulator_width` gives."""
    dim = named_args["dim"]
    if os.environ.get(CONFIG_ENV):
        width = accumulator_width(dim)
        return [c for c in configs if c.kwargs["ACC_D"] == width][:1] or configs[:1]
    limit = max(16, triton.next_power_of_2(dim))
    kept, seen = [], set()
    for config in configs:
        kwargs = dict(config.kwargs, ACC_D=min(config.kwargs["ACC_D"], limit))
        signature = (tuple(sorted(kwargs.items())), config.num_warps, config.num_stages)
        if signature not in seen:
            seen.add(signature)
            kept.append(triton.Config(kwargs, num_warps=config.num_warps, num_stages=config.num_stages))
    return kept


interpreting = triton_interpreting


def _triton_version():
    return tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2])


def _fix_interpreter_scalar_index() -> None:
    """Let triton < 3.7's interpreter use scalar kernel arguments as loop bounds with numpy >= 2.4.

    That interpreter turns a scalar argument into a Python int with ``int(array([x]))``, which
    numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every
    ``range(0, n, BLOCK)`` over a runtime size fails (triton-lang/triton#9171). Triton 3.7.1 and
    later squeeze the array first; this applies the same one-line change to the older interpreter.
    """
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_fastcl_squeezes", False):
        return

    def patch_tensor_squeezing(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_tensor_squeezing._fastcl_squeezes = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing


if interpreting() and _triton_version() < (3, 7):
    _fix_interpreter_scalar_index()


def parse_config(text: str):
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 5 or any(v <= 0 for v in values) or any(v < 16 or v & (v - 1) for v in values[:3]):
        raise ValueError(
            f"{CONFIG_ENV} must be 'BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages' with block sizes powers of two >= 16, got {text!r}"
        )
    return values


def configs(candidates) -> List[triton.Config]:
    """The autotuning list, or the single pinned configuration."""
    pinned = os.environ.get(CONFIG_ENV)
    if pinned:
        candidates = [parse_config(pinned)]
    elif interpreting():
        candidates = [INTERPRETER_CONFIG]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}, num_warps=warps, num_stages=stages)
        for m, n, d, warps, stages in candidates
    ]


def dot_settings(tensor: torch.Tensor):
    """(CAST_DOT, DOT_PRECISION) for kernels reading ``tensor``.

    CAST_DOT: the interpreter's ``tl.dot`` returns garbage for bfloat16 operands (loads are
    fine), so on CPU tensors operands are widened to float32 before each product. On the GPU
    the product stays on the tensor cores in the input dtype. DOT_PRECISION follows torch's own
    switch for float32 matrix products (TF32 only when the user allowed it); the interpreter
    always multiplies exactly.
    """
    cast = tensor.device.type == "cpu"
    if cast or (tensor.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return cast, "ieee"
    # fp16 / bf16 operands: "tf32" is Triton's default on NVIDIA and only affects fp32 operands
    return cast, "tf32"


@triton.jit
def tile_similarity(anchor_ptr, candidate_ptr, rows, cols, row_valid, col_valid, dim,
                    CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) block of anchor_rows . candidate_cols over any dim (masked tail)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_valid = d < dim
        a = tl.load(anchor_ptr + rows[:, None] * dim + d[None, :], mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        # the candidate block is loaded transposed (BLOCK_D, BLOCK_N), ready for the product
        c = tl.load(candidate_ptr + cols[None, :] * dim + d[:, None], mask=col_valid[None, :] & d_valid[:, None], other=0.0)
        if CAST_DOT:
            a = a.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(a, c, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def dot_operand(x, element, CAST_DOT: tl.constexpr):
    """``x`` rounded to the input dtype for a tensor-core product (widened back to fp32 under
    the interpreter, whose bfloat16 products are wrong)."""
    x = x.to(element)
    if CAST_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def load_operand(ptr, index, index_valid, columns, columns_valid, dim, scale, element, SCALE: tl.constexpr,
                 CAST_DOT: tl.constexpr):
    """Rows ``index``, columns ``columns`` of a row-major (*, dim) matrix as a product operand;
    each row times ``scale`` (fp32) when SCALE."""
    x = tl.load(ptr + index[:, None] * dim + columns[None, :], mask=index_valid[:, None] & columns_valid[None, :],
                other=0.0)
    if SCALE:
        x = x.to(tl.float32) * scale[:, None]
    return dot_operand(x, element, CAST_DOT)


def device_guard(device):
    """The context every Triton launch runs in: the tensors' GPU made current (Triton launches
    on the current device, so tensors on cuda:1 under a current cuda:0 would fault); nothing
    for CPU tensors (the interpreter)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def device_scalars(device, *values: torch.Tensor) -> torch.Tensor:
    """(n,) fp32 on ``device`` holding scalar tensors for a kernel to read: CPU ones (Python
    floats) are read on the host, device ones are copied on the device, so no host sync."""
    out = torch.empty(len(values), dtype=torch.float32, device=device)
    for slot, value in enumerate(values):
        value = value.detach().reshape(())
        if value.device.type == "cpu":
            out[slot].fill_(float(value))
        else:
            out[slot].copy_(value)
    return out


@triton.jit
def log1p_small(t):
    """log(1 + t) for t in [0, 1] to a few ulps without a log1p instruction: where 1 + t rounds
    to 1 it is t, else log(u) * t / (u - 1) with u = 1 + t (the rounding of u cancels)."""
    u = 1.0 + t
    ratio = tl.where(u == 1.0, 1.0, t / (u - 1.0))
    return tl.where(u == 1.0, t, tl.log(u) * ratio)


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow, tail kept: softplus(-20) = 2.06e-9 (not 0, which
    log(1 + exp(-20)) gives in fp32 past |x| > 16.6); softplus(-inf) = 0."""
    return tl.maximum(x, 0.0) + log1p_small(tl.exp(-tl.abs(x)))
