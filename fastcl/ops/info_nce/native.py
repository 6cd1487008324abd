"""Glue to the native CPU row kernel (csrc/cpu/info_nce.cpp).

The kernel takes data pointers; this module checks the layout it needs (contiguous rows of
float32 or float64) and passes ``torch.get_num_threads()`` so native threads never
oversubscribe the cores torch uses for the similarity products.

A row holding a non-finite score (NaN or +-inf in the inputs, or an overflowing product) is
flagged by the kernel and recomputed here with the PyTorch row kernel, whose formulas are the
naive reference's: NaN and Inf then reach the loss and the gradients exactly where the
reference's do (docs/robustness.md, "Numerics contract"). Such rows are rare; the finite ones
stay on the fast path.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._native import typed_kernel
from .options import MASK, PAIRWISE, SUPCON, InfoNCEOptions
from .chunked import Direction, torch_row_kernel

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
    nonfinite = torch.zeros(rows, dtype=torch.uint8)
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
        nonfinite_out=nonfinite.data_ptr(), num_threads=torch.get_num_threads(),
    )
    if bool(nonfinite.any()):
        for r in nonfinite.nonzero()[:, 0].tolist():
            _reference_row(similarity, private_similarity, row0, r, direction, options, inv_temperature, weights,
                           (loss, lse, dtemp))
    return loss, lse, dtemp


def _reference_row(similarity, private_similarity, row0: int, r: int, direction: Direction, options: InfoNCEOptions,
                   inv_temperature: float, weights, outputs) -> None:
    """Row ``r`` of the block, which the kernel left (a non-finite score), by the PyTorch row
    kernel: its raw similarities are recomputed (the kernel overwrote them) and its loss, lse,
    dtemp and, with ``weights``, gradient row written where the kernel would have."""
    g = row0 + r
    anchor = direction.anchors[g:g + 1]
    raw = anchor @ direction.candidates.T
    private_raw = None
    if private_similarity is not None:
        private_raw = torch.bmm(direction.private[g:g + 1], anchor[:, :, None]).view(1, -1)
    row_loss, row_lse, row_dtemp = torch_row_kernel(raw, private_raw, g, direction, options, inv_temperature,
                                                    weights)
    for out, value in zip(outputs, (row_loss, row_lse, row_dtemp)):
        out[r] = value[0]
    if weights is not None:  # raw now holds the row's dL/draw
        similarity[r] = raw[0]
        if private_similarity is not None:
            private_similarity[r] = private_raw[0]
