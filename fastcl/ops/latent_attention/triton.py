"""Triton kernels of the fused latent-attention pooling (CUDA; CPU under TRITON_INTERPRET=1).

The same :class:`~fastcl.ops.latent_attention.chunked.ElementwiseKernels` contract as the C++
kernels: cuBLAS does the chunk's matrix products (scores = LN(h) M with the re-associated
M = scale * Wq^T K^T, output = P N); these kernels do the row softmax (one program per
(token, head) row of r latents, the row held in registers), its recomputation from the saved
log-sum-exp, its backward, and GEGLU forward / backward, reading bf16 / fp16 / fp32 and
computing in float32. No ``tl.dot`` is involved, so the interpreter computes them exactly.
"""
from __future__ import annotations

import math
import torch
import triton
import triton.language as tl

from ..common import triton_runtime as triton_common
from .chunked import ElementwiseKernels

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GEGLU_BLOCK = 1024


@triton.jit
def latent_attention_fwd_kernel_softmax(scores_ptr, lse_ptr, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < cols
    pointers = scores_ptr + row * cols + offsets
    scores = tl.load(pointers, mask=inside, other=float("-inf")).to(tl.float32)
    row_max = tl.max(scores, axis=0)
    exps = tl.where(inside, tl.exp(scores - row_max), 0.0)
    total = tl.sum(exps, axis=0)
    tl.store(pointers, (exps / total).to(scores_ptr.dtype.element_ty), mask=inside)
    tl.store(lse_ptr + row, row_max + tl.log(total))


@triton.jit
def latent_attention_bwd_kernel_recompute(scores_ptr, lse_ptr, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < cols
    pointers = scores_ptr + row * cols + offsets
    scores = tl.load(pointers, mask=inside, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    tl.store(pointers, tl.exp(tl.minimum(scores - lse, 0.0)).to(scores_ptr.dtype.element_ty), mask=inside)


@triton.jit
def latent_attention_bwd_kernel_softmax(probs_ptr, grad_ptr, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < cols
    probs = tl.load(probs_ptr + row * cols + offsets, mask=inside, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + row * cols + offsets, mask=inside, other=0.0).to(tl.float32)
    dot = tl.sum(probs * grad, axis=0)
    tl.store(grad_ptr + row * cols + offsets, (probs * (grad - dot)).to(grad_ptr.dtype.element_ty), mask=inside)


@triton.jit
def latent_attention_fwd_kernel_geglu(u_ptr, gated_ptr, width, SQRT_HALF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < width
    value = tl.load(u_ptr + row * 2 * width + columns, mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(u_ptr + row * 2 * width + width + columns, mask=inside, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(gate * SQRT_HALF))
    tl.store(gated_ptr + row * width + columns, (value * gate * cdf).to(gated_ptr.dtype.element_ty), mask=inside)


@triton.jit
def latent_attention_bwd_kernel_geglu(u_ptr, grad_gated_ptr, grad_u_ptr, width,
                                      SQRT_HALF: tl.constexpr, INV_SQRT_2PI: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < width
    value = tl.load(u_ptr + row * 2 * width + columns, mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(u_ptr + row * 2 * width + width + columns, mask=inside, other=0.0).to(tl.float32)
    grad = tl.load(grad_gated_ptr + row * width + columns, mask=inside, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(gate * SQRT_HALF))
    gelu = gate * cdf
    slope = cdf + gate * tl.exp(-0.5 * gate * gate) * INV_SQRT_2PI  # gelu'(x) = Phi(x) + x phi(x)
    out_type = grad_u_ptr.dtype.element_ty
    tl.store(grad_u_ptr + row * 2 * width + columns, (grad * gelu).to(out_type), mask=inside)
    tl.store(grad_u_ptr + row * 2 * width + width + columns, (grad * value * slope).to(out_type), mask=inside)


def _check(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"Triton latent-attention kernels need contiguous tensors; {name} is not")
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"Triton latent-attention kernels take float16/bfloat16/float32; {name} is {tensor.dtype}")


class TritonKernels(ElementwiseKernels):
    """:class:`ElementwiseKernels` as Triton kernels (float32 arithmetic whatever the storage dtype)."""

    name = "triton"

    def softmax_forward(self, scores: torch.Tensor) -> torch.Tensor:
        _check("scores", scores)
        rows, cols = scores.shape
        lse = torch.empty(rows, dtype=torch.float32, device=scores.device)
        with triton_common.device_guard(scores.device):
            latent_attention_fwd_kernel_softmax[(rows,)](scores, lse, cols, BLOCK=triton.next_power_of_2(cols))
        return lse

    def softmax_recompute(self, scores: torch.Tensor, lse: torch.Tensor) -> None:
        _check("scores", scores)
        rows, cols = scores.shape
        lse = lse.contiguous()
        with triton_common.device_guard(scores.device):
            latent_attention_bwd_kernel_recompute[(rows,)](scores, lse, cols, BLOCK=triton.next_power_of_2(cols))

    def softmax_backward(self, probs: torch.Tensor, grad: torch.Tensor) -> None:
        _check("probs", probs)
        _check("grad", grad)
        rows, cols = probs.shape
        with triton_common.device_guard(probs.device):
            latent_attention_bwd_kernel_softmax[(rows,)](probs, grad, cols, BLOCK=triton.next_power_of_2(cols))

    def geglu_forward(self, u: torch.Tensor) -> torch.Tensor:
        _check("u", u)
        rows, width = u.shape[0], u.shape[1] // 2
        gated = torch.empty(rows, width, dtype=u.dtype, device=u.device)
        block = min(_GEGLU_BLOCK, triton.next_power_of_2(width))
        with triton_common.device_guard(u.device):
            latent_attention_fwd_kernel_geglu[(rows, triton.cdiv(width, block))](u, gated, width, SQRT_HALF=_SQRT_HALF,
                                                                                 BLOCK=block)
        return gated

    def geglu_backward(self, u: torch.Tensor, grad_gated: torch.Tensor) -> torch.Tensor:
        _check("u", u)
        grad_gated = grad_gated.contiguous()
        _check("grad_gated", grad_gated)
        rows, width = u.shape[0], u.shape[1] // 2
        grad_u = torch.empty_like(u)
        block = min(_GEGLU_BLOCK, triton.next_power_of_2(width))
        with triton_common.device_guard(u.device):
            latent_attention_bwd_kernel_geglu[(rows, triton.cdiv(width, block))](
                u, grad_gated, grad_u, width, SQRT_HALF=_SQRT_HALF, INV_SQRT_2PI=_INV_SQRT_2PI, BLOCK=block)
        return grad_u
