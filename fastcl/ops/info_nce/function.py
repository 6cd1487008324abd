"""Autograd function around the chunked driver, shared by the "torch" and "cpu" backends.

Saved state: the inputs (O(B·D)) and, when the gradients were computed during the forward
pass, those gradients. Never anything of size B x N.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..common.gradients import compute_dtype
from .options import MASK, SUPCON, InfoNCEOptions
from ..common.blocks import NORM_EPS
from .chunked import Direction, RowKernel, count_positives, run_direction
from .native import native_row_kernel
from .symmetric import two_pass_applies, two_pass_symmetric


def inverse_temperature(temperature: torch.Tensor) -> float:
    return 1.0 / float(temperature.detach().reshape(()))


def temperature_meta(temperature: torch.Tensor):
    """(shape, dtype, device): what the temperature's gradient must look like."""
    return temperature.shape, temperature.dtype, temperature.device


def _normalized(x: torch.Tensor, dtype: torch.dtype, normalize: bool):
    """(x in the compute dtype, normalized if asked; its norms or None)."""
    x = x.to(dtype)
    if not normalize:
        return x, None
    norm = x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return x / norm, norm


def _normalize_backward(grad: torch.Tensor, unit: torch.Tensor, norm: Optional[torch.Tensor]) -> torch.Tensor:
    """Gradient through y = x / max(|x|, eps) given dL/dy."""
    if norm is None:
        return grad
    radial = (grad * unit).sum(-1, keepdim=True)
    clamped = norm <= NORM_EPS  # below eps the op is a plain scaling by 1/eps
    return torch.where(clamped, grad, grad - unit * radial) / norm


class _Prepared:
    """Inputs in the compute dtype, normalized, plus the per-direction descriptions."""

    def __init__(self, query, key, hard_negatives, positive, labels, key_labels, options: InfoNCEOptions):
        dtype = compute_dtype(query)
        self.two_pass = two_pass_applies(options, positive, labels, key_labels, hard_negatives)
        self.q, self.q_norm = _normalized(query, dtype, options.normalize)
        self.k, self.k_norm = _normalized(key, dtype, options.normalize)
        self.h, self.h_norm = (None, None)
        if hard_negatives is not None and hard_negatives.shape[1] > 0:
            self.h, self.h_norm = _normalized(hard_negatives, dtype, options.normalize)
        batch = self.q.shape[0]
        self.directions: List[Direction] = []
        mode = options.multi_positive
        if mode == MASK and positive is None:
            positive = torch.arange(batch, device=self.q.device)
        self.directions.append(self._direction(self.q, self.k, self.h, positive, labels, key_labels, options))
        if options.symmetric:
            column_positive = torch.arange(batch, device=self.q.device) if mode == MASK else None
            column_labels = key_labels[:batch] if key_labels is not None else None
            self.directions.append(
                self._direction(self.k[:batch], self.q, None, column_positive, column_labels, labels, options)
            )

    @staticmethod
    def _direction(anchors, candidates, private, positive, anchor_labels, candidate_labels, options) -> Direction:
        rows = anchors.shape[0]
        num_positive = None
        divisor = float(rows)
        if options.multi_positive != MASK:
            num_positive = count_positives(anchor_labels, candidate_labels, options.exclude_self)
            if options.multi_positive == SUPCON:
                divisor = float((num_positive > 0).sum())
            else:
                divisor = float(num_positive.sum())
        return Direction(anchors, candidates, private, positive, anchor_labels,
                         candidate_labels, num_positive, divisor, options.exclude_self)


def _weights(direction: Direction, options: InfoNCEOptions, grad_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """Loss weight of each anchor row: dL_total/dL_row."""
    rows = direction.anchors.shape[0]
    scale = 0.5 if options.symmetric else 1.0
    if options.reduction == "none":
        return grad_rows[:rows].to(direction.anchors.dtype) * scale
    if options.reduction == "mean":
        scale = scale / direction.divisor if direction.divisor > 0 else 0.0
    return torch.full((rows,), scale, dtype=direction.anchors.dtype, device=direction.anchors.device)


def _reduce(losses: List[torch.Tensor], directions: List[Direction], reduction: str) -> torch.Tensor:
    if reduction == "none":
        if len(losses) == 1:
            return losses[0]
        return 0.5 * (losses[0] + losses[1])
    totals = []
    for loss, direction in zip(losses, directions):
        total = loss.sum()
        if reduction == "mean":
            total = total / direction.divisor if direction.divisor > 0 else total * 0.0
        totals.append(total)
    return totals[0] if len(totals) == 1 else 0.5 * (totals[0] + totals[1])


def _two_pass(prepared: _Prepared, row_kernel: RowKernel) -> bool:
    """The plain symmetric loss on the native CPU kernels: both directions from one set of
    blocks (fastcl/ops/info_nce/symmetric.py)."""
    return prepared.two_pass and row_kernel is native_row_kernel


def _gradients(prepared: _Prepared, options: InfoNCEOptions, row_kernel: RowKernel, inv_temperature: float,
               grad_rows: Optional[torch.Tensor]):
    """(losses per direction, dq, dk, dh, dtemp_sum) with gradients wrt the *normalized* inputs."""
    q, k, h = prepared.q, prepared.k, prepared.h
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dh = torch.zeros_like(h) if h is not None else None
    if _two_pass(prepared, row_kernel):
        weights = tuple(_weights(direction, options, grad_rows) for direction in prepared.directions)
        row_loss, column_loss, dtemp = two_pass_symmetric(q, k, inv_temperature, weights, (dq, dk))
        return [row_loss, column_loss], dq, dk, dh, dtemp
    dtemp = torch.zeros((), dtype=q.dtype, device=q.device)
    losses = []
    batch = q.shape[0]
    for index, direction in enumerate(prepared.directions):
        weights = _weights(direction, options, grad_rows)
        # column direction: anchors are key[:B], candidates are the queries
        grads_out = (dq, dk, dh) if index == 0 else (dk[:batch], dq, None)
        loss, _, d_temp = run_direction(direction, options, inv_temperature, row_kernel, weights, grads_out)
        losses.append(loss)
        dtemp += d_temp
    return losses, dq, dk, dh, dtemp


def chunked_forward(query, key, hard_negatives, temperature: torch.Tensor, positive, labels, key_labels,
                    options: InfoNCEOptions, row_kernel: RowKernel, compute_grads: bool):
    """Loss and, when ``compute_grads``, the gradients of the (scalar) loss wrt
    (query, key, hard_negatives, temperature), computed during this forward pass."""
    inv_temperature = inverse_temperature(temperature)
    with torch.no_grad():
        prepared = _Prepared(query, key, hard_negatives, positive, labels, key_labels, options)
        if compute_grads:
            losses, dq, dk, dh, dtemp = _gradients(prepared, options, row_kernel, inv_temperature, None)
            grads = _input_gradients(prepared, dq, dk, dh, dtemp, inv_temperature, query, key, hard_negatives, temperature)
        elif _two_pass(prepared, row_kernel):
            losses = list(two_pass_symmetric(prepared.q, prepared.k, inv_temperature)[:2])
            grads = None
        else:
            losses = [run_direction(d, options, inv_temperature, row_kernel, None)[0] for d in prepared.directions]
            grads = None
        return _reduce(losses, prepared.directions, options.reduction), grads


def chunked_backward(query, key, hard_negatives, temperature: torch.Tensor, positive, labels, key_labels,
                     options: InfoNCEOptions, row_kernel: RowKernel, grad_output: torch.Tensor):
    """Gradients wrt (query, key, hard_negatives, temperature) given dL_total/dloss: recomputes
    the similarity blocks (used when the loss is per row, ``reduction="none"``)."""
    inv_temperature = inverse_temperature(temperature)
    with torch.no_grad():
        prepared = _Prepared(query, key, hard_negatives, positive, labels, key_labels, options)
        grad_rows = grad_output.to(prepared.q.dtype).expand(query.shape[0]) if options.reduction == "none" else None
        if grad_rows is None:  # scalar loss: gradients of the unit loss, scaled
            _, dq, dk, dh, dtemp = _gradients(prepared, options, row_kernel, inv_temperature, None)
            scale = grad_output.to(prepared.q.dtype).reshape(())
            dq, dk, dtemp = dq * scale, dk * scale, dtemp * scale
            dh = dh * scale if dh is not None else None
        else:
            _, dq, dk, dh, dtemp = _gradients(prepared, options, row_kernel, inv_temperature, grad_rows)
        return _input_gradients(prepared, dq, dk, dh, dtemp, inv_temperature, query, key, hard_negatives, temperature)


def _input_gradients(prepared: _Prepared, dq, dk, dh, dtemp, inv_temperature, query, key, hard_negatives,
                     temperature) -> Tuple:
    """Gradients wrt the user's tensors: through the normalization, back to their dtypes."""
    grad_q = _normalize_backward(dq, prepared.q, prepared.q_norm).to(query.dtype)
    grad_k = _normalize_backward(dk, prepared.k, prepared.k_norm).to(key.dtype)
    grad_h = None
    if dh is not None:
        grad_h = _normalize_backward(dh, prepared.h, prepared.h_norm).to(hard_negatives.dtype)
    elif hard_negatives is not None:  # H = 0
        grad_h = torch.zeros_like(hard_negatives)
    # dL/dtau = sum_ij dL/ds_ij * (-raw_ij / tau^2); dtemp holds sum dL/draw_ij * raw_ij
    grad_temperature = (-dtemp * inv_temperature).to(device=temperature.device, dtype=temperature.dtype)
    return grad_q, grad_k, grad_h, grad_temperature.reshape(temperature.shape)
