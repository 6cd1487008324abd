"""Autograd function around the chunked driver, shared by the "torch" and "cpu" backends.

Saved state: the inputs (O(B·D)) and, when the gradients were computed during the forward
pass, those gradients. Never anything of size B x N.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .options import MASK, PAIRWISE, SUPCON, InfoNCEOptions
from .chunked import NORM_EPS, Direction, RowKernel, count_positives, run_direction


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


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
        self.q, self.q_norm = _normalized(query, dtype, options.normalize)
        self.k, self.k_norm = _normalized(key, dtype, options.normalize)
        self.h, self.h_norm = (None, None)
        if hard_negatives is not None and hard_negatives.shape[1] > 0:
            self.h, self.h_norm = _normalized(hard_negatives, dtype, options.normalize)
        batch, num_keys = self.q.shape[0], self.k.shape[0]
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
        del num_keys

    @staticmethod
    def _direction(anchors, candidates, private, positive, anchor_labels, candidate_labels, options) -> Direction:
        rows = anchors.shape[0]
        positive_raw = None
        num_positive = None
        divisor = float(rows)
        if options.multi_positive == MASK:
            if options.margin is not None:
                positive_raw = (anchors * candidates[positive]).sum(-1)
        else:
            num_positive = count_positives(anchor_labels, candidate_labels, options.exclude_self)
            if options.multi_positive == SUPCON:
                divisor = float((num_positive > 0).sum())
            else:
                divisor = float(num_positive.sum())
        return Direction(anchors, candidates, private, positive, positive_raw, anchor_labels,
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


def _gradients(prepared: _Prepared, options: InfoNCEOptions, row_kernel: RowKernel, inv_temperature: float,
               grad_rows: Optional[torch.Tensor]):
    """(losses per direction, dq, dk, dh, dtemp_sum) with gradients wrt the *normalized* inputs."""
    q, k, h = prepared.q, prepared.k, prepared.h
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dh = torch.zeros_like(h) if h is not None else None
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


class InfoNCEFunction(torch.autograd.Function):
    """Chunked InfoNCE with a pluggable row kernel (PyTorch ops or native C++)."""

    @staticmethod
    def forward(ctx, query, key, hard_negatives, temperature, positive, labels, key_labels,
                options: InfoNCEOptions, row_kernel: RowKernel):
        if isinstance(temperature, torch.Tensor):
            inv_temperature = 1.0 / float(temperature.detach().reshape(()))
        else:
            inv_temperature = 1.0 / float(temperature)
        needs = ctx.needs_input_grad
        wants_grad = any(needs[:4])  # False under no_grad: apply() sets it from the grad mode
        ctx.options = options
        ctx.row_kernel = row_kernel
        ctx.inv_temperature = inv_temperature
        ctx.temperature_meta = (temperature.shape, temperature.dtype, temperature.device) if isinstance(temperature, torch.Tensor) else None
        ctx.input_dtypes = (query.dtype, key.dtype, hard_negatives.dtype if hard_negatives is not None else None)
        with torch.no_grad():
            prepared = _Prepared(query, key, hard_negatives, positive, labels, key_labels, options)
            if wants_grad and options.reduction != "none":
                # Gradients during the forward pass: backward() only scales them.
                losses, dq, dk, dh, dtemp = _gradients(prepared, options, row_kernel, inv_temperature, None)
                ctx.fused = True
                ctx.saved_grads = _input_gradients(prepared, dq, dk, dh, dtemp, inv_temperature, ctx)
            else:
                losses = [run_direction(d, options, inv_temperature, row_kernel, None)[0] for d in prepared.directions]
                ctx.fused = False
                if wants_grad:
                    ctx.save_for_backward(query, key, hard_negatives, positive, labels, key_labels)
            result = _reduce(losses, prepared.directions, options.reduction)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.fused:
            scale = grad_output.reshape(())
            grads = [None if g is None else (g * scale.to(g.dtype)) for g in ctx.saved_grads]
        else:
            query, key, hard_negatives, positive, labels, key_labels = ctx.saved_tensors
            options = ctx.options
            with torch.no_grad():
                prepared = _Prepared(query, key, hard_negatives, positive, labels, key_labels, options)
                _, dq, dk, dh, dtemp = _gradients(prepared, options, ctx.row_kernel, ctx.inv_temperature,
                                                  grad_output.to(prepared.q.dtype))
                grads = list(_input_gradients(prepared, dq, dk, dh, dtemp, ctx.inv_temperature, ctx))
        needs = ctx.needs_input_grad
        grads = [g if needs[i] else None for i, g in enumerate(grads)]
        return (*grads, None, None, None, None, None)


def _input_gradients(prepared: _Prepared, dq, dk, dh, dtemp, inv_temperature, ctx) -> Tuple:
    """Gradients wrt the user's tensors: through the normalization, back to their dtypes."""
    q_dtype, k_dtype, h_dtype = ctx.input_dtypes
    grad_q = _normalize_backward(dq, prepared.q, prepared.q_norm).to(q_dtype)
    grad_k = _normalize_backward(dk, prepared.k, prepared.k_norm).to(k_dtype)
    grad_h = None
    if dh is not None:
        grad_h = _normalize_backward(dh, prepared.h, prepared.h_norm).to(h_dtype)
    grad_temperature = None
    if ctx.temperature_meta is not None:
        # dL/dtau = sum_ij dL/ds_ij * (-raw_ij / tau^2); dtemp already holds sum dL/draw_ij * raw_ij
        shape, dtype, device = ctx.temperature_meta
        grad_temperature = (-dtemp * inv_temperature).to(device=device, dtype=dtype).reshape(shape)
    return grad_q, grad_k, grad_h, grad_temperature
