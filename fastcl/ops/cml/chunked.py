"""The one pass over the sampled negatives that every CML backend makes, here in PyTorch (row
blocks; the native CPU kernel is :mod:`.native`, csrc/cpu/cml.cpp).

A *scan* returns, per row i, four O(B) statistics and nothing of size B x W:

    positive_distance  d(u_i, p_i)
    closest_distance   min_k d(u_i, n_ik)   (NaN when any of the row's distances is NaN)
    closest            the first k reaching that minimum
    impostors          M_i = #{k : (m + d(u_i, p_i)) - d(u_i, n_ik) > 0}

The loss, its weight and the gradients are O(B * D) functions of these (see :mod:`.op`).
Negatives are either a dense (B, W, D) tensor or rows ``item_table[negative_indices]`` read
in place (never gathered into a (B, W, D) tensor).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..common.blocks import block_rows_for
from ..common.gradients import compute_dtype

# elements of one block of gathered negatives in the PyTorch path (rows x W x D)
BLOCK_ELEMENTS = 1 << 22


class ScanStatistics(NamedTuple):
    positive_distance: torch.Tensor  # (B,) compute dtype
    closest_distance: torch.Tensor  # (B,) compute dtype
    closest: torch.Tensor  # (B,) int64, index into the row's W negatives
    impostors: torch.Tensor  # (B,) compute dtype (a count)


def _block_negatives(negatives, negative_indices, item_table, row0, row1, dtype):
    if negatives is not None:
        return negatives[row0:row1].to(dtype)
    return item_table[negative_indices[row0:row1]].to(dtype)


def torch_scan(users, positives, negatives: Optional[torch.Tensor], negative_indices: Optional[torch.Tensor],
               item_table: Optional[torch.Tensor], margin: float) -> ScanStatistics:
    """The scan in PyTorch ops over row blocks of at most ``BLOCK_ELEMENTS`` gathered negatives."""
    dtype = compute_dtype(users)
    batch, dim = users.shape
    window = negatives.shape[1] if negatives is not None else negative_indices.shape[1]
    with torch.no_grad():
        u, p = users.to(dtype), positives.to(dtype)
        positive_distance = ((u - p) ** 2).sum(-1)
        closest_distance = torch.empty(batch, dtype=dtype, device=users.device)
        closest = torch.empty(batch, dtype=torch.int64, device=users.device)
        impostors = torch.empty(batch, dtype=dtype, device=users.device)
        step = min(batch, block_rows_for(window * dim, 1, BLOCK_ELEMENTS))
        for row0 in range(0, batch, step):
            row1 = min(batch, row0 + step)
            # a fresh (rows, W, D) block: the dense negatives are never written
            block = _block_negatives(negatives, negative_indices, item_table, row0, row1, dtype) - u[row0:row1, None, :]
            distance = block.square_().sum(-1)  # (rows, W)
            values, index = distance.min(dim=1)  # NaN propagates, first minimum wins
            closest_distance[row0:row1] = values
            closest[row0:row1] = index
            threshold = margin + positive_distance[row0:row1, None]
            impostors[row0:row1] = ((threshold - distance) > 0).sum(1).to(dtype)
    return ScanStatistics(positive_distance, closest_distance, closest, impostors)
