"""Glue to the native CUDA InfoNCE kernels (csrc/cuda/info_nce.cu), ``backend="cuda"``.

Supported: the ``"mask"`` multi-positive mode without labels, i.e. ``positive`` indices (or
the default diagonal), ``hard_negatives``, ``symmetric`` (CLIP: both directions from one
forward pass and one backward pass), ``exclude_self``, ``normalize``, a float or tensor
``temperature`` (its gradient included) and every reduction; float32 / float16 / bfloat16
inputs (float64 goes to the chunked PyTorch path). ``labels``, ``false_negative_margin``,
``label_smoothing`` and ``multi_positive="supcon"|"pairwise"`` raise ``ValueError``: use
``backend="triton"``, which covers every option.

A documented portable fallback, never chosen by ``backend="auto"``: the kernels run
on CUDA cores in fp32, add d(key) with atomics (not bit-reproducible) and re-read / re-write
d(query) in global memory every tile: seconds per step at B = 65536, minutes at 1M, where the
Triton kernels (tensor cores, row-owned backward, no atomics) take milliseconds. Under
``torch.use_deterministic_algorithms(True)`` this backend raises; use ``backend="triton"``.

Python validates and allocates; the kernels take data pointers, sizes, strides and the
current CUDA stream, so the native module does not depend on libtorch's C++ ABI. With
``normalize`` the unit vectors are formed here in float32 and the kernels run on them.

Example::

    >>> loss = fastcl.info_nce(q.cuda(), k.cuda(), symmetric=True, backend="cuda")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..._native import native_module
from ..common.blocks import NORM_EPS
from ..common.gradients import scale_gradients
from .function import _normalize_backward, inverse_temperature, temperature_meta
from .options import MASK, InfoNCEOptions

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DIAGONAL_BLOCK_ROWS = 8192


def unsupported_options(options: InfoNCEOptions, labels) -> list:
    """The options of this call that the CUDA kernels do not implement (empty when all are)."""
    found = []
    if options.multi_positive != MASK:
        found.append(f"multi_positive={options.multi_positive!r}")
    if labels is not None:
        found.append("labels / key_labels")
    if options.margin is not None:
        found.append("false_negative_margin")
    if options.label_smoothing:
        found.append("label_smoothing")
    return found


@dataclass
class Problem:
    """One direction as the kernels see it (contiguous rows)."""

    query: torch.Tensor
    key: torch.Tensor
    hard: Optional[torch.Tensor]
    positive: torch.Tensor  # (B,) int64
    inv_temperature: float
    exclude_self: bool
    column_anchors: int  # B when the key->query direction rides along


def _kwargs(problem: Problem) -> dict:
    q, k, h = problem.query, problem.key, problem.hard
    return dict(
        query=q.data_ptr(), key=k.data_ptr(), hard=h.data_ptr() if h is not None else 0,
        ld_query=q.stride(0), ld_key=k.stride(0),
        hard_row_stride=h.stride(0) if h is not None else 0, hard_slot_stride=h.stride(1) if h is not None else 0,
        batch=q.shape[0], num_keys=k.shape[0], num_hard=h.shape[1] if h is not None else 0, dim=q.shape[1],
        positive=problem.positive.data_ptr(), inv_temperature=problem.inv_temperature,
        exclude_self=problem.exclude_self, column_anchors=problem.column_anchors,
        dtype=DTYPE_CODES[q.dtype], stream=torch.cuda.current_stream(q.device).cuda_stream,
    )


def _address(tensor: Optional[torch.Tensor]) -> int:
    return tensor.data_ptr() if tensor is not None else 0


def launch_forward(problem: Problem, row_stats, column_shift, column_sums) -> None:
    """row_stats (B, 2) <- [LSE, positive score]; column_sums (B,) += shifted column sums."""
    with torch.cuda.device(problem.query.device):
        native_module().info_nce_cuda_forward(**_kwargs(problem), row_stats=row_stats.data_ptr(),
                                              column_shift=_address(column_shift), column_sums=_address(column_sums))


def launch_backward(problem: Problem, row_stats, row_weight, column_lse, column_weight,
                    d_query, d_key, d_hard, dtemp) -> None:
    """Accumulate fp32 d_query / d_key, write d_hard and dtemp (see csrc/cuda/info_nce_cuda.h)."""
    with torch.cuda.device(problem.query.device):
        native_module().info_nce_cuda_backward(
            **_kwargs(problem), row_stats=row_stats.data_ptr(), row_weight=row_weight.data_ptr(),
            column_lse=_address(column_lse), column_weight=_address(column_weight), d_query=d_query.data_ptr(),
            d_key=d_key.data_ptr(), d_hard=_address(d_hard), dtemp=dtemp.data_ptr(),
        )


def _diagonal_scores(query: torch.Tensor, key: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """q_j . k_j / tau for j < B in fp32, in row blocks (no B x D fp32 copy). Only a shift for
    the column sums: any value near the diagonal score works."""
    batch = query.shape[0]
    out = torch.empty(batch, dtype=torch.float32, device=query.device)
    for start in range(0, batch, _DIAGONAL_BLOCK_ROWS):
        stop = min(batch, start + _DIAGONAL_BLOCK_ROWS)
        out[start:stop] = (query[start:stop].float() * key[start:stop].float()).sum(-1)
    return out * inv_temperature


def _unit(x: Optional[torch.Tensor]):
    if x is None:
        return None, None
    x32 = x.to(torch.float32)
    norm = x32.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return x32 / norm, norm


class _State:
    """Forward statistics (O(B)) and what the backward pass needs."""

    def __init__(self, query, key, hard_negatives, positive, options: InfoNCEOptions, inv_temperature: float):
        self.options = options
        self.inv_temperature = inv_temperature
        self.inputs = (query, key, hard_negatives)
        hard = hard_negatives if hard_negatives is not None and hard_negatives.shape[1] > 0 else None
        self.q_norm = self.k_norm = self.h_norm = None
        if options.normalize:
            (query, self.q_norm), (key, self.k_norm), (hard, self.h_norm) = _unit(query), _unit(key), _unit(hard)
        batch = query.shape[0]
        if positive is None:
            positive = torch.arange(batch, device=query.device)
        self.batch = batch
        self.problem = Problem(query.contiguous(), key.contiguous(), hard.contiguous() if hard is not None else None,
                               positive.contiguous(), inv_temperature, options.exclude_self,
                               batch if options.symmetric else 0)

    def forward(self) -> torch.Tensor:
        problem, batch = self.problem, self.batch
        device = problem.query.device
        self.row_stats = torch.empty(batch, 2, dtype=torch.float32, device=device)
        self.column_lse = None
        column_shift = column_sums = None
        if problem.column_anchors:
            column_shift = _diagonal_scores(problem.query, problem.key, self.inv_temperature)
            column_sums = torch.zeros(batch, dtype=torch.float32, device=device)
        launch_forward(problem, self.row_stats, column_shift, column_sums)
        lse, positive_score = self.row_stats.unbind(1)
        losses = [lse - positive_score]
        if problem.column_anchors:
            if bool(torch.isfinite(column_sums).all()):
                self.column_lse = column_shift + torch.log(column_sums)
            else:  # a column overflowed its diagonal shift: that direction alone, with an online max
                column = Problem(problem.key[:batch], problem.query, None, problem.positive, self.inv_temperature,
                                 False, 0)
                column_stats = torch.empty(batch, 2, dtype=torch.float32, device=device)
                launch_forward(column, column_stats, None, None)
                self.column_lse = column_stats[:, 0].contiguous()
            losses.append(self.column_lse - positive_score)  # column j's positive is s_jj
        self.losses = losses
        reduction = self.options.reduction
        if reduction == "none":
            return losses[0] if len(losses) == 1 else 0.5 * (losses[0] + losses[1])
        totals = [loss.sum() / batch if reduction == "mean" else loss.sum() for loss in losses]
        return totals[0] if len(totals) == 1 else 0.5 * (totals[0] + totals[1])

    def gradients(self, grad_rows: Optional[torch.Tensor], temperature_meta):
        problem, batch = self.problem, self.batch
        device = problem.query.device
        scale = 0.5 if problem.column_anchors else 1.0
        if self.options.reduction == "none":
            weight = (grad_rows.reshape(-1).to(torch.float32) * scale).contiguous()
        else:
            value = scale / batch if self.options.reduction == "mean" else scale
            weight = torch.full((batch,), value, dtype=torch.float32, device=device)
        d_query = torch.zeros(problem.query.shape, dtype=torch.float32, device=device)
        d_key = torch.zeros(problem.key.shape, dtype=torch.float32, device=device)
        d_hard = torch.empty(problem.hard.shape, dtype=torch.float32, device=device) if problem.hard is not None else None
        dtemp = torch.empty(batch, dtype=torch.float32, device=device)
        launch_backward(problem, self.row_stats, weight, self.column_lse, weight if problem.column_anchors else None,
                        d_query, d_key, d_hard, dtemp)
        query, key, hard_negatives = self.inputs
        grad_query = self._through_norm(d_query, problem.query, self.q_norm).to(query.dtype)
        grad_key = self._through_norm(d_key, problem.key, self.k_norm).to(key.dtype)
        grad_hard = None
        if hard_negatives is not None:
            if d_hard is None:
                grad_hard = torch.zeros_like(hard_negatives)
            else:
                grad_hard = self._through_norm(d_hard, problem.hard, self.h_norm).to(hard_negatives.dtype)
        grad_temperature = None
        if temperature_meta is not None:
            shape, dtype, temperature_device = temperature_meta
            grad_temperature = (-dtemp.sum() * self.inv_temperature).to(device=temperature_device, dtype=dtype).reshape(shape)
        return grad_query, grad_key, grad_hard, grad_temperature

    @staticmethod
    def _through_norm(grad, unit, norm):
        return grad if norm is None else _normalize_backward(grad, unit, norm)


def cuda_forward(query, key, hard_negatives, temperature: torch.Tensor, positive, labels, key_labels,
                 options: InfoNCEOptions, compute_grads: bool):
    """Loss and, when ``compute_grads``, the gradients of the scalar loss computed in this forward
    pass: the body of the ``fastcl::info_nce_forward`` custom op for ``backend="cuda"``.
    ``labels`` / ``key_labels`` are unsupported here (:func:`check_cuda_options` says so first)."""
    inv_temperature = inverse_temperature(temperature)
    with torch.no_grad():
        state = _State(query, key, hard_negatives, positive, options, inv_temperature)
        loss = state.forward()
        grads = state.gradients(None, temperature_meta(temperature)) if compute_grads else None
    return loss, grads


def cuda_backward(query, key, hard_negatives, temperature: torch.Tensor, positive, labels, key_labels,
                  options: InfoNCEOptions, grad_output: torch.Tensor):
    """Gradients given dL_total/dloss: the forward statistics are recomputed (one forward pass)."""
    inv_temperature = inverse_temperature(temperature)
    per_row = options.reduction == "none"
    with torch.no_grad():
        state = _State(query, key, hard_negatives, positive, options, inv_temperature)
        state.forward()
        grads = state.gradients(grad_output if per_row else None, temperature_meta(temperature))
        if not per_row:  # gradients of the unit loss, scaled
            grads = scale_gradients(grads, grad_output)
    return grads


def check_cuda_options(query, options: InfoNCEOptions, labels) -> None:
    """What ``backend="cuda"`` refuses, with the reason (float64 runs on the chunked path)."""
    if torch.are_deterministic_algorithms_enabled():
        raise ValueError("backend='cuda' adds d(key) with float atomics and is not deterministic, but "
                         "torch.use_deterministic_algorithms(True) is on: use backend='triton' (deterministic "
                         "backward) or 'torch'")
    unsupported = unsupported_options(options, labels)
    if unsupported:
        raise ValueError(
            f"backend='cuda' does not implement {', '.join(unsupported)}; use backend='triton' (every option) "
            "or 'torch'"
        )
    if query.dtype != torch.float64 and query.device.type != "cuda":
        raise ValueError(f"backend='cuda' runs on CUDA tensors, got query on {query.device}")
