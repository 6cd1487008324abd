"""Glue to the native CPU row kernel (csrc/cpu/info_nce.cpp).

The kernel takes data pointers; this module checks the layout it needs (contiguous rows of
float32 or float64) and passes ``torch.get_num_threads()`` so native threads never
oversubscribe the cores torch uses for the similarity products.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._native import typed_kernel
from .options import MASK, PAIRWISE, SUPCON, InfoNCEOptions
from .chunked import Direction

_MODES = {MASK: 0, SUPCON: 1, PAIRWISE: 2}


def _address(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()


def native_row_kernel(similarity, private_similarity, row0: int, direction: Direction,
                      options: InfoNCEOptions, inv_temperature: float, weights: Optional[torch.Tensor]):
    """Same contract as :func:`fastcl.ops.info_nce.chunked.torch_row_kernel`, in C++."""
    rows, cols = similarity.shape
    dtype = similarity.dtype
    if dtype not in (torch.float32, torch.float64) or similarity.device.type != "cpu":
        raise TypeError(f"native CPU kernel takes float32/float64 CPU blocks, got {dtype} on {similarity.device}")
    if similarity.stride(1) != 1:
        raise ValueError("native CPU kernel needs row-major similarity blocks")
    private_cols = 0
    ld_private = 0
    if private_similarity is not None:
        if not private_similarity.is_contiguous():
            raise ValueError("native CPU kernel needs a contiguous private similarity block")
        private_cols = private_similarity.shape[1]
        ld_private = private_similarity.stride(0)
    loss = torch.empty(rows, dtype=dtype)
    lse = torch.empty(rows, dtype=dtype)
    dtemp = torch.zeros(rows, dtype=dtype)
    # Per-row vectors are indexed by global row inside the kernel; keep references alive.
    positive = _contiguous(direction.positive)
    anchor_labels = _contiguous(direction.anchor_labels)
    candidate_labels = _contiguous(direction.candidate_labels)
    num_positive = _contiguous(direction.num_positive)
    weights = _contiguous(weights)
    typed_kernel("info_nce_rows", dtype)(
        similarity=similarity.data_ptr(), ld_similarity=similarity.stride(0), rows=rows, cols=cols,
        private_similarity=_address(private_similarity), ld_private=ld_private, private_cols=private_cols,
        row0=row0, inv_temperature=inv_temperature, mode=_MODES[options.multi_positive],
        positive=_address(positive),
        has_margin=options.margin is not None, margin=options.margin if options.margin is not None else 0.0,
        anchor_labels=_address(anchor_labels), candidate_labels=_address(candidate_labels),
        num_positive=_address(num_positive), label_smoothing=options.label_smoothing,
        self_excluded=direction.self_excluded, weights=_address(weights),
        loss_out=loss.data_ptr(), lse_out=lse.data_ptr(), dtemp_out=dtemp.data_ptr(),
        num_threads=torch.get_num_threads(),
    )
    return loss, lse, dtemp
