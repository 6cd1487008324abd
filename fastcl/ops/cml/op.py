"""The CML scan registered as a ``torch.library`` custom op (every backend), and the loss built
around it.

The scan (:mod:`.chunked`) is the only O(B * W * D) work; its outputs are piecewise-constant
selections (which negative is closest, how many are impostors), so they need no gradient. The
loss is then rebuilt from O(B * D) tensors: the closest negative of each row is gathered
(``negatives[i, k_i]`` or ``item_table[indices[i, k_i]]``), the two distances recomputed, and
autograd does the rest: the user, positive and closest-negative gradients, scatter-added into
the item table when negatives come by index. Second-order gradients are exact as well (the
selections are locally constant).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._tracing import lazy_dynamo_disable
from ..common.gradients import compute_dtype
from . import chunked


@torch.library.custom_op("fastcl::cml_scan", mutates_args=())
def cml_scan(users: Tensor, positives: Tensor, negatives: Optional[Tensor], negative_indices: Optional[Tensor],
             item_table: Optional[Tensor], margin: float, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton" and users.dtype != torch.float64:
        from .triton import triton_scan as scan
    elif backend == "cpu":
        from .native import native_scan as scan
    else:  # "torch", and float64 on the GPU backend
        scan = chunked.torch_scan
    statistics = scan(users, positives, negatives, negative_indices, item_table, margin)
    dtype = compute_dtype(users)
    # outputs must not alias inputs or each other; convert the float statistics to the compute dtype
    return (statistics.positive_distance.to(dtype), statistics.closest_distance.to(dtype),
            statistics.closest, statistics.impostors.to(dtype))


@cml_scan.register_fake
def _(users, positives, negatives, negative_indices, item_table, margin, backend):
    batch = users.shape[0]
    dtype = compute_dtype(users)
    stat = lambda: users.new_empty((batch,), dtype=dtype)  # noqa: E731
    return stat(), stat(), users.new_empty((batch,), dtype=torch.int64), stat()


def closest_negatives(negatives: Optional[Tensor], negative_indices: Optional[Tensor], item_table: Optional[Tensor],
                      closest: Tensor) -> Tensor:
    """(B, D) the selected negative of each row, differentiable (its gradient lands in
    ``negatives[i, closest_i]`` or is scatter-added into ``item_table``)."""
    rows = torch.arange(closest.shape[0], device=closest.device)
    if negatives is not None:
        return negatives[rows, closest]
    return item_table[negative_indices[rows, closest]]


def cml_row_losses(users: Tensor, positives: Tensor, negatives: Optional[Tensor], negative_indices: Optional[Tensor],
                   item_table: Optional[Tensor], margin: float, num_items: int, rank_weight: bool, backend: str,
                   check_finite: bool) -> Tensor:
    """(B,) per-row CML losses in the compute dtype, differentiable wrt every embedding."""
    detached = [None if t is None else t.detach() for t in (users, positives, negatives, item_table)]
    positive_distance, closest_distance, closest, impostors = torch.ops.fastcl.cml_scan(
        detached[0], detached[1], detached[2], negative_indices, detached[3], float(margin), backend)
    if check_finite and not bool(torch.isfinite(closest_distance).all() & torch.isfinite(positive_distance).all()):
        bad = (~(torch.isfinite(closest_distance) & torch.isfinite(positive_distance))).nonzero().flatten()[:5].tolist()
        raise ValueError(f"cml_loss: users, positives or negatives hold NaN or Inf (non-finite distances in rows {bad})")
    dtype = compute_dtype(users)
    window = negative_indices.shape[1] if negatives is None else negatives.shape[1]
    u, p = users.to(dtype), positives.to(dtype)
    n = closest_negatives(negatives, negative_indices, item_table, closest).to(dtype)
    hinge = torch.relu(margin + ((u - p) ** 2).sum(-1) - ((u - n) ** 2).sum(-1))
    if not rank_weight:
        return hinge
    return hinge * torch.log1p(impostors * (num_items / window))


lazy_dynamo_disable(cml_scan)  # an eager call must not import torch._dynamo
