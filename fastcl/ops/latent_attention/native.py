"""Glue to the native CPU kernels (csrc/cpu/latent_attention.cpp).

The kernels take data pointers of contiguous float32 buffers; this module checks that layout
and passes ``torch.get_num_threads()`` so the native threads never oversubscribe the cores
torch uses for the matrix products around them.
"""
from __future__ import annotations

import torch

from ..._native import native_module
from .chunked import ElementwiseKernels


def _check(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise TypeError(f"native latent-attention kernels take contiguous float32 CPU tensors; {name} is "
                        f"{tensor.dtype} on {tensor.device}, contiguous={tensor.is_contiguous()}")


class NativeKernels(ElementwiseKernels):
    """:class:`ElementwiseKernels` in C++ (OpenMP over rows, vectorized exp / erf)."""

    name = "cpu"

    def __init__(self):
        self.module = native_module()
        if self.module is None or not hasattr(self.module, "latent_softmax_forward_f32"):
            raise RuntimeError("the native kernels have no latent-attention functions (rebuild fastcl)")

    def softmax_forward(self, scores: torch.Tensor) -> torch.Tensor:
        _check("scores", scores)
        rows, cols = scores.shape
        lse = torch.empty(rows, dtype=torch.float32)
        self.module.latent_softmax_forward_f32(scores.data_ptr(), lse.data_ptr(), rows, cols, torch.get_num_threads())
        return lse

    def softmax_recompute(self, scores: torch.Tensor, lse: torch.Tensor) -> None:
        _check("scores", scores)
        lse = lse.contiguous()
        _check("lse", lse)
        rows, cols = scores.shape
        self.module.latent_softmax_recompute_f32(scores.data_ptr(), lse.data_ptr(), rows, cols, torch.get_num_threads())

    def softmax_backward(self, probs: torch.Tensor, grad: torch.Tensor) -> None:
        _check("probs", probs)
        _check("grad", grad)
        rows, cols = probs.shape
        self.module.latent_softmax_backward_f32(probs.data_ptr(), grad.data_ptr(), rows, cols, torch.get_num_threads())

    def geglu_forward(self, u: torch.Tensor) -> torch.Tensor:
        _check("u", u)
        rows, width = u.shape[0], u.shape[1] // 2
        gated = torch.empty(rows, width, dtype=torch.float32)
        self.module.latent_geglu_forward_f32(u.data_ptr(), gated.data_ptr(), rows, width, torch.get_num_threads())
        return gated

    def geglu_backward(self, u: torch.Tensor, grad_gated: torch.Tensor) -> torch.Tensor:
        _check("u", u)
        grad_gated = grad_gated.contiguous()
        _check("grad_gated", grad_gated)
        rows, width = u.shape[0], u.shape[1] // 2
        grad_u = torch.empty_like(u)
        self.module.latent_geglu_backward_f32(u.data_ptr(), grad_gated.data_ptr(), grad_u.data_ptr(), rows, width,
                                              torch.get_num_threads())
        return grad_u
