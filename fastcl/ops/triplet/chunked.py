"""Batch-hard triplet loss in row blocks: O(B * D) memory, never the B x B distances.

Each block of anchors gets its squared distances to every positive from one matrix product
(``|p_j|^2 - 2 a_i . p_j``: ``|a_i|^2`` does not change a row's argmin) into a reused buffer
(:func:`~fastcl.ops.common.blocks.similarity_blocks`); the row's own pair is excluded and the
closest other positive kept, an index per row. The loss is then an O(B * D) function of gathered
rows (:func:`.naive.triplet_losses`, shared with the reference), differentiated by autograd (to
every order): the distances are the exact differences.
"""
from __future__ import annotations

import torch

from ..common.blocks import similarity_blocks


def hardest_negatives(anchor: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """(B,) index j != i of the positive closest to anchor i; ``anchor`` and ``positive`` are
    already in the compute dtype (and normalized when asked). NaN rows give a NaN's index."""
    batch = anchor.shape[0]
    out = torch.empty(batch, dtype=torch.int64, device=anchor.device)
    squared = (positive * positive).sum(-1)
    for row0, row1, block in similarity_blocks(anchor, positive):
        block.mul_(-2.0).add_(squared)
        rows = torch.arange(row1 - row0, device=anchor.device)
        block[rows, rows + row0] = float("inf")
        out[row0:row1] = block.argmin(dim=1)
    return out
