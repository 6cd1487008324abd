"""Reference InfoNCE: materializes every logit. Obviously correct, O(B x N) memory.

This is the ground truth the tests compare every backend with, and the "naive PyTorch"
baseline of the benchmarks. It is written independently of the fused paths: masks are built
as full boolean matrices and the losses come from ``torch.logsumexp``.
Computation is in float32 (float64 when the inputs are float64, for gradcheck).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..common.gradients import compute_dtype

NEG_INF = float("-inf")


def _direction(
    raw: torch.Tensor,
    inv_temperature,
    positive: Optional[torch.Tensor],
    anchor_labels: Optional[torch.Tensor],
    candidate_labels: Optional[torch.Tensor],
    num_labelled: int,
    self_offset: Optional[int],
    multi_positive: str,
    margin: Optional[float],
    label_smoothing: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss of each anchor row of ``raw`` (R x M similarities) and the reduction's divisor.

    The first ``num_labelled`` columns are keys with labels; the rest are hard negatives
    (never positives, never masked by labels). ``self_offset`` is not None when
    ``exclude_self``: column ``r`` is anchor ``r``'s self pair.
    """
    rows, cols = raw.shape
    device = raw.device
    row_index = torch.arange(rows, device=device)[:, None]
    col_index = torch.arange(cols, device=device)[None, :]
    is_key = col_index < num_labelled
    candidate = torch.ones(rows, cols, dtype=torch.bool, device=device)
    if self_offset is not None:
        candidate &= ~((col_index == row_index) & is_key)
    same_label = None
    if anchor_labels is not None:
        same_label = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        same_label[:, :num_labelled] = anchor_labels[:, None] == candidate_labels[None, :]
    scores = raw * inv_temperature

    if multi_positive == "mask":
        is_positive = col_index == positive[:, None]
        if same_label is not None:
            candidate &= ~(same_label & ~is_positive)
        if margin is not None:
            positive_raw = raw.detach().gather(1, positive[:, None])
            candidate &= ~((raw.detach() > positive_raw - margin) & ~is_positive)
        masked = torch.where(candidate, scores, torch.full_like(scores, NEG_INF))
        lse = torch.logsumexp(masked, dim=1)
        positive_score = scores.gather(1, positive[:, None])[:, 0]
        loss = lse - (1.0 - label_smoothing) * positive_score
        if label_smoothing > 0:
            count = candidate.sum(1).to(scores.dtype)
            mean_candidate = torch.where(candidate, scores, torch.zeros_like(scores)).sum(1) / count
            loss = loss - label_smoothing * mean_candidate
        return loss, torch.tensor(float(rows), dtype=scores.dtype, device=device)

    is_positive = same_label & candidate
    has_candidate = candidate.any(1, keepdim=True)
    if multi_positive == "supcon":
        masked = torch.where(candidate, scores, torch.full_like(scores, NEG_INF))
        masked = torch.where(has_candidate, masked, torch.zeros_like(masked))
        lse = torch.logsumexp(masked, dim=1, keepdim=True)
        num_positive = is_positive.sum(1)
        log_prob = torch.where(is_positive, scores - lse, torch.zeros_like(scores))
        loss = -log_prob.sum(1) / num_positive.clamp(min=1).to(scores.dtype)
        return loss, (num_positive > 0).sum().to(scores.dtype)

    # pairwise: one term per positive pair, denominator = that positive + the anchor's negatives
    negative = candidate & ~is_positive
    has_negative = negative.any(1, keepdim=True)
    masked = torch.where(negative, scores, torch.full_like(scores, NEG_INF))
    masked = torch.where(has_negative, masked, torch.zeros_like(masked))
    negative_lse = torch.logsumexp(masked, dim=1, keepdim=True)
    negative_lse = torch.where(has_negative, negative_lse, torch.full_like(negative_lse, NEG_INF))
    # -log(e^s / (e^s + sum_neg e^n)) = softplus(lse_neg - s)
    terms = F.softplus(negative_lse - scores)
    loss = torch.where(is_positive, terms, torch.zeros_like(terms)).sum(1)
    return loss, is_positive.sum().to(scores.dtype)


def _reduce(loss: torch.Tensor, divisor: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / divisor.clamp(min=1)


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    positive: Optional[torch.Tensor] = None,
    hard_negatives: Optional[torch.Tensor] = None,
    temperature=0.07,
    normalize: bool = False,
    symmetric: bool = False,
    exclude_self: bool = False,
    labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    multi_positive: str = "mask",
    false_negative_margin: Optional[float] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE over materialized logits. Same arguments and meaning as :func:`fastcl.info_nce`."""
    dtype = compute_dtype(query)
    q = query.to(dtype)
    k = key.to(dtype)
    h = hard_negatives.to(dtype) if hard_negatives is not None else None
    if normalize:
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        h = F.normalize(h, dim=-1) if h is not None else None
    batch, num_keys = q.shape[0], k.shape[0]
    if isinstance(temperature, torch.Tensor):
        inv_temperature = 1.0 / temperature.to(dtype)
    else:
        inv_temperature = 1.0 / float(temperature)
    if positive is None and multi_positive == "mask":
        positive = torch.arange(batch, device=q.device)

    raw = q @ k.T
    if h is not None:
        raw = torch.cat([raw, torch.einsum("bd,bhd->bh", q, h)], dim=1)
    loss, divisor = _direction(
        raw, inv_temperature, positive, labels, key_labels, num_keys,
        0 if exclude_self else None, multi_positive, false_negative_margin, label_smoothing,
    )
    if not symmetric:
        return _reduce(loss, divisor, reduction)

    # key -> query direction over the B x B in-batch block: key j's positive is query j
    column_raw = raw[:, :batch].T
    column_positive = torch.arange(batch, device=q.device) if multi_positive == "mask" else None
    column_loss, column_divisor = _direction(
        column_raw, inv_temperature, column_positive,
        key_labels[:batch] if key_labels is not None else None, labels, batch,
        0 if exclude_self else None, multi_positive, false_negative_margin, label_smoothing,
    )
    if reduction == "none":
        return 0.5 * (loss + column_loss)
    return 0.5 * (_reduce(loss, divisor, reduction) + _reduce(column_loss, column_divisor, reduction))


def info_nce_extras(query, key, *, positive=None, hard_negatives=None, temperature=0.07, normalize=False,
                    exclude_self=False, labels=None, key_labels=None, false_negative_margin=None,
                    memory_bank=None, bank_labels=None, bank_indices=None, sample_index=None, guide=None,
                    guide_margin=0.0, guide_margin_strategy="absolute", reduction="mean", symmetric=False):
    """Reference for ``info_nce``'s memory_bank / guide / return_stats: every logit materialized
    (keys, hard negatives and bank concatenated). Returns (loss, stats)."""
    dtype = compute_dtype(query)

    def prep(x):
        x = x.to(dtype)
        return F.normalize(x, dim=-1) if normalize else x

    q, k = prep(query), prep(key)
    batch, num_keys = q.shape[0], k.shape[0]
    inv_t = 1.0 / (temperature.to(dtype) if isinstance(temperature, torch.Tensor) else float(temperature))
    if positive is None:
        positive = torch.arange(batch, device=q.device)

    def one_direction(anchors, keys, positive, anchor_labels, candidate_labels, private, guide_pair):
        parts = [anchors @ keys.T]
        n = keys.shape[0]
        if private is not None:
            parts.append(torch.einsum("bd,bhd->bh", anchors, prep(private)))
        if memory_bank is not None:
            parts.append(anchors @ prep(memory_bank.detach()).T)
        raw = torch.cat(parts, 1)
        cols = raw.shape[1]
        col = torch.arange(cols, device=q.device)[None, :]
        row = torch.arange(anchors.shape[0], device=q.device)[:, None]
        is_pos = col == positive[:, None]
        drop = torch.zeros_like(is_pos)
        if exclude_self:
            drop |= (col == row) & (col < n)
        if anchor_labels is not None:
            same = torch.zeros_like(is_pos)
            same[:, :n] = anchor_labels[:, None] == candidate_labels[None, :]
            drop |= same
        if memory_bank is not None:
            start = cols - memory_bank.shape[0]
            if bank_labels is not None and anchor_labels is not None:
                drop[:, start:] |= anchor_labels[:, None] == bank_labels[None, :]
            if bank_indices is not None and sample_index is not None:
                drop[:, start:] |= sample_index[:, None] == bank_indices[None, :]
        if false_negative_margin is not None:
            drop |= raw > raw.gather(1, positive[:, None]) - false_negative_margin
        if guide_pair is not None:
            g = F.normalize(guide_pair[0].to(dtype), dim=-1) @ F.normalize(guide_pair[1].to(dtype), dim=-1).T
            g_pos = g.gather(1, positive[:, None])
            slack = g_pos.abs() * guide_margin if guide_margin_strategy == "relative" else guide_margin
            drop[:, :n] |= g > g_pos - slack
        keep = ~(drop & ~is_pos)
        logits = (raw * inv_t).masked_fill(~keep, NEG_INF)
        lse = torch.logsumexp(logits, 1)
        pos_logit = logits.gather(1, positive[:, None])[:, 0]
        rank = (logits > pos_logit[:, None]).sum(1)
        return lse - pos_logit, {"lse": lse, "positive_logit": pos_logit, "rank": rank}

    loss, stats = one_direction(q, k, positive, labels, key_labels, hard_negatives, guide)
    if symmetric:
        column_loss, column_stats = one_direction(
            k[:batch], q, torch.arange(batch, device=q.device),
            key_labels[:batch] if key_labels is not None else None, labels, None, None)
        stats.update({f"column_{name}": value for name, value in column_stats.items()})
        loss = 0.5 * (loss + column_loss)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss, stats


def info_nce_with_options(query, key, positive, hard_negatives, temperature, labels, key_labels, options):
    """:func:`info_nce` with the flags of an ``InfoNCEOptions`` (the checked arguments the fused
    paths carry), for the paths that fall back to this reference."""
    return info_nce(
        query, key, positive=positive, hard_negatives=hard_negatives, temperature=temperature,
        normalize=options.normalize, symmetric=options.symmetric, exclude_self=options.exclude_self,
        labels=labels, key_labels=key_labels, multi_positive=options.multi_positive,
        false_negative_margin=options.margin, label_smoothing=options.label_smoothing,
        reduction=options.reduction,
    )
