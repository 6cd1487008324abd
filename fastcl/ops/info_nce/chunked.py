"""Chunked InfoNCE: any device, O(B·D) memory, never materializes the B x N logits.

The driver walks over blocks of anchor rows. For each block it computes the raw similarities
against every candidate with one matrix product into a reused buffer, hands the block to a
*row kernel* that does everything elementwise (masks, online max, log-sum-exp, loss and, when
asked, the gradient with respect to the raw similarities, written in place), then turns that
gradient into dq, dk and d(hard negatives) with two more matrix products.

Two row kernels share this driver: :func:`torch_row_kernel` (PyTorch ops, any device) and the
native C++ kernel in ``native.py``. A symmetric loss runs the driver once per direction: the
column direction is the row direction of the transposed in-batch block (keys as anchors). The
plain CLIP loss on the native kernels takes both directions from one set of blocks instead
(``symmetric.py``).

When the loss is reduced to a scalar and the inputs need gradients, the gradients are computed
during the forward pass (one product for the logits, two for the gradients: the same three
products as the naive path, with no B x N tensor) and ``backward`` only scales them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ..common.blocks import exp_flushed_, similarity_blocks
from .options import MASK, PAIRWISE, SUPCON, InfoNCEOptions

@dataclass
class Direction:
    """One direction of the loss: every anchor row against its candidates.

    anchors (R, D), candidates (M, D) and private (R, H, D) are in the compute dtype and
    already normalized when asked. ``self_excluded``: column r is anchor r's own pair.
    """

    anchors: torch.Tensor
    candidates: torch.Tensor
    private: Optional[torch.Tensor]
    positive: Optional[torch.Tensor]  # (R,) int64, "mask" mode
    anchor_labels: Optional[torch.Tensor]
    candidate_labels: Optional[torch.Tensor]
    num_positive: Optional[torch.Tensor]  # (R,) int64, "supcon" / "pairwise"
    divisor: float  # what "mean" divides the total by
    self_excluded: bool


RowKernel = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def count_positives(anchor_labels: torch.Tensor, candidate_labels: torch.Tensor, self_excluded: bool) -> torch.Tensor:
    """How many candidates share each anchor's label, in O((R + M) log M), minus the self pair."""
    ordered = torch.sort(candidate_labels).values
    count = torch.searchsorted(ordered, anchor_labels, right=True) - torch.searchsorted(ordered, anchor_labels)
    if self_excluded:
        rows = min(anchor_labels.shape[0], candidate_labels.shape[0])
        same = torch.zeros_like(count)
        same[:rows] = (anchor_labels[:rows] == candidate_labels[:rows]).long()
        count = count - same
    return count


def torch_row_kernel(
    similarity: torch.Tensor,
    private_similarity: Optional[torch.Tensor],
    row0: int,
    direction: Direction,
    options: InfoNCEOptions,
    inv_temperature: float,
    weights: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row kernel in PyTorch ops. Returns (loss, lse, dtemp_rows) for the block's rows.

    With ``weights`` (the loss weight of each row) it overwrites ``similarity`` and
    ``private_similarity`` with dL/d(raw similarity) and returns sum_j dL/draw_ij * raw_ij in
    ``dtemp_rows``; without, ``dtemp_rows`` is zeros and the inputs are left unchanged.
    """
    rows, cols = similarity.shape
    device, dtype = similarity.device, similarity.dtype
    row_ids = torch.arange(row0, row0 + rows, device=device)
    col_ids = torch.arange(cols, device=device)
    raw_all = similarity if private_similarity is None else torch.cat([similarity, private_similarity], 1)
    total_cols = raw_all.shape[1]
    is_key = torch.arange(total_cols, device=device) < cols
    scores = raw_all * inv_temperature
    candidate = torch.ones(rows, total_cols, dtype=torch.bool, device=device)
    if direction.self_excluded:
        candidate[:, :cols] &= col_ids[None, :] != row_ids[:, None]
    same_label = None
    if direction.anchor_labels is not None:
        same_label = torch.zeros(rows, total_cols, dtype=torch.bool, device=device)
        same_label[:, :cols] = direction.anchor_labels[row0:row0 + rows, None] == direction.candidate_labels[None, :]

    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    dtemp = torch.zeros(rows, dtype=dtype, device=device)

    if options.multi_positive == MASK:
        positive = direction.positive[row0:row0 + rows]
        is_positive = (torch.arange(total_cols, device=device)[None, :] == positive[:, None]) & is_key
        if same_label is not None:
            candidate &= ~(same_label & ~is_positive)
        if options.margin is not None:
            # the positive's similarity from this same block, so the strict ">" compares
            # numbers computed the same way
            threshold = raw_all.gather(1, positive[:, None]) - options.margin
            candidate &= ~((raw_all > threshold) & ~is_positive)
        masked = torch.where(candidate, scores, neg_inf)
        lse = torch.logsumexp(masked, dim=1)
        positive_score = scores.gather(1, positive[:, None])[:, 0]
        eps = options.label_smoothing
        loss = lse - (1.0 - eps) * positive_score
        count = candidate.sum(1).to(dtype)
        if eps > 0:
            loss = loss - eps * torch.where(candidate, scores, zero).sum(1) / count
        if weights is not None:
            grad = torch.where(candidate, exp_flushed_(masked - lse[:, None]), zero)
            grad = grad - (1.0 - eps) * is_positive.to(dtype)
            if eps > 0:
                grad = grad - eps * candidate.to(dtype) / count[:, None]
    else:
        is_positive = same_label & candidate
        valid = direction.num_positive[row0:row0 + rows] > 0
        if options.multi_positive == SUPCON:
            masked = torch.where(candidate, scores, neg_inf)
            lse = torch.logsumexp(masked, dim=1)
            safe_lse = torch.where(valid, lse, zero)
            num_positive = direction.num_positive[row0:row0 + rows].clamp(min=1).to(dtype)
            positive_sum = torch.where(is_positive, scores, zero).sum(1)
            loss = torch.where(valid, safe_lse - positive_sum / num_positive, zero)
            if weights is not None:
                grad = torch.where(candidate & valid[:, None], exp_flushed_(masked - safe_lse[:, None]), zero)
                grad = grad - is_positive.to(dtype) / num_positive[:, None]
        else:  # PAIRWISE
            negative = candidate & ~is_positive
            masked = torch.where(negative, scores, neg_inf)
            lse = torch.logsumexp(masked, dim=1)  # -inf when there is no negative
            terms = torch.nn.functional.softplus(lse[:, None] - scores)
            loss = torch.where(is_positive, terms, zero).sum(1)
            if weights is not None:
                # the reference differentiates softplus at every entry and masks afterwards, so
                # a NaN argument off the positives still reaches the row (0 * sigmoid(NaN))
                sigmoid = torch.sigmoid(lse[:, None] - scores)
                sigma = torch.where(is_positive, sigmoid, sigmoid * 0.0)
                has_negative = negative.any(1)
                safe_lse = torch.where(has_negative, lse, zero)
                negative_share = torch.where(negative, exp_flushed_(masked - safe_lse[:, None]), zero)
                grad = torch.where(negative, sigma.sum(1, keepdim=True) * negative_share, zero) - sigma

    if weights is not None:
        grad = grad * (weights[row0:row0 + rows, None] * inv_temperature)
        dtemp = (grad * raw_all).sum(1)
        similarity.copy_(grad[:, :cols])
        if private_similarity is not None:
            private_similarity.copy_(grad[:, cols:])
    return loss, lse, dtemp


def run_direction(
    direction: Direction,
    options: InfoNCEOptions,
    inv_temperature: float,
    row_kernel: RowKernel,
    weights: Optional[torch.Tensor],
    grads_out: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
):
    """Loss and LSE of one direction, block by block; with ``weights``, gradients too.

    ``grads_out`` = (d_anchors, d_candidates, d_private) buffers in the compute dtype that the
    gradients wrt the anchors, candidates and private negatives are *added* to (so both
    directions of a symmetric loss accumulate into the same tensors, with no extra copies).
    Returns (loss_rows, lse_rows, dtemp_sum) where dtemp_sum = sum_ij dL/draw_ij * raw_ij
    (zero without weights).
    """
    anchors, candidates, private = direction.anchors, direction.candidates, direction.private
    rows = anchors.shape[0]
    dtype, device = anchors.dtype, anchors.device
    loss = torch.empty(rows, dtype=dtype, device=device)
    lse = torch.empty(rows, dtype=dtype, device=device)
    dtemp = torch.zeros(rows, dtype=dtype, device=device)
    if weights is not None:
        d_anchors, d_candidates, d_private = grads_out
    for row0, row1, block in similarity_blocks(anchors, candidates):
        anchor_block = anchors[row0:row1]
        private_block = None
        if private is not None:
            private_block = torch.bmm(private[row0:row1], anchor_block[:, :, None]).view(row1 - row0, -1)
        block_loss, block_lse, block_dtemp = row_kernel(
            block, private_block, row0, direction, options, inv_temperature, weights
        )
        loss[row0:row1] = block_loss
        lse[row0:row1] = block_lse
        if weights is None:
            continue
        dtemp[row0:row1] = block_dtemp
        # block now holds dL/draw for these rows: dq = G k, dk += G^T q, dh = G_h q
        d_anchors[row0:row1].addmm_(block, candidates)
        d_candidates.addmm_(block.T, anchor_block)
        if private is not None:
            d_anchors[row0:row1] += torch.bmm(private_block[:, None, :], private[row0:row1])[:, 0]
            d_private[row0:row1].addcmul_(private_block[:, :, None], anchor_block[:, None, :])
    return loss, lse, dtemp.sum()
