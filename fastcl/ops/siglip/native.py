"""SigLIP's row kernel in C++ (csrc/cpu/siglip.cpp), with the contract of
:func:`.chunked.torch_siglip_rows`: the chunked driver hands it each block of similarities."""
from __future__ import annotations

import torch

from ..._native import typed_kernel


def native_siglip_rows(raw: torch.Tensor, row0: int, scale: float, bias: float, factor: float, with_grad: bool):
    """Same contract as :func:`torch_siglip_rows`, in C++ (csrc/cpu/siglip.cpp)."""
    rows, cols = raw.shape
    if raw.stride(1) != 1:
        raise ValueError("native SigLIP kernel needs row-major similarity blocks")
    kernel = typed_kernel("siglip_rows", raw.dtype)
    loss, d_scale, d_bias = (torch.empty(rows, dtype=raw.dtype) for _ in range(3))
    kernel(similarity=raw.data_ptr(), ld=raw.stride(0), rows=rows, cols=cols, row0=row0, scale=scale, bias=bias,
           factor=factor, with_grad=with_grad, loss_out=loss.data_ptr(), dscale_out=d_scale.data_ptr(),
           dbias_out=d_bias.data_ptr(), num_threads=torch.get_num_threads())
    return loss.sum(), d_scale.sum(), d_bias.sum()
