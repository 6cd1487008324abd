"""pytorch-metric-learning's ``NTXentLoss`` and ``SupConLoss`` on fastcl's kernels: same class
names, constructors and ``forward(embeddings, labels=None, indices_tuple=None, ref_emb=None,
ref_labels=None)``.

Fused: the default ``distance`` (``CosineSimilarity()``), the default reducer (``MeanReducer``
for NT-Xent, ``AvgNonZeroReducer`` for SupCon) and no ``embedding_regularizer``.
- Without ``indices_tuple``: every pair the labels define (the peer's ``get_all_pairs_indices``)
  on the fused InfoNCE (``multi_positive="pairwise"`` / ``"supcon"``), never B x B.
- With a miner's ``indices_tuple`` (pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``, read as
  the peer reads them: a triplet gives the pairs (a, p) and (a, n); a repeated pair counts
  repeatedly for NT-Xent and once for SupCon): one similarity per listed pair and a per-anchor
  log-sum-exp by scatter, O(pairs) memory.
Anything else runs the peer's own code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as _distances
from pytorch_metric_learning import losses as _losses
from pytorch_metric_learning import reducers as _reducers
from pytorch_metric_learning.utils import common_functions as _c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as _lmu

from ..ops.info_nce import info_nce
from . import log

__all__ = ["NTXentLoss", "SupConLoss"]


def _default_cosine(distance) -> bool:
    return (type(distance) is _distances.CosineSimilarity and distance.normalize_embeddings and distance.p == 2
            and distance.power == 1 and distance.is_inverted)


def _fusable(loss, reducer_type) -> bool:
    return (_default_cosine(loss.distance) and type(loss.reducer) is reducer_type
            and getattr(loss, "embedding_regularizer", None) is None)


def _pair_scores(embeddings, ref_emb, first, second, temperature):
    """Cosine similarity / temperature of the listed pairs (rows of embeddings, rows of ref_emb)."""
    e = F.normalize(embeddings[first], dim=-1)
    r = F.normalize(ref_emb[second], dim=-1)
    return (e * r).sum(-1) / temperature


def _anchor_logsumexp(scores, anchors, num_anchors):
    """Per-anchor logsumexp of ``scores`` grouped by ``anchors`` (-inf for an anchor without any)."""
    dtype = scores.dtype
    maximum = torch.full((num_anchors,), float("-inf"), dtype=dtype, device=scores.device)
    maximum = maximum.scatter_reduce(0, anchors, scores.detach(), reduce="amax", include_self=True)
    safe = torch.where(torch.isfinite(maximum), maximum, torch.zeros_like(maximum))
    total = torch.zeros(num_anchors, dtype=dtype, device=scores.device).index_add(0, anchors, torch.exp(scores - safe[anchors]))
    return torch.log(total) + safe


class NTXentLoss(_losses.NTXentLoss):
    """pytorch-metric-learning's ``NTXentLoss(temperature=0.07, **kwargs)`` on fastcl."""

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if not _fusable(self, _reducers.MeanReducer):
            log.debug("NTXentLoss: peer path")
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return _fused_forward(self, "NTXentLoss", embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _all_pairs_loss(self, embeddings, labels, ref_emb, ref_labels, same_set):
        if not _cap_cannot_bind(self.temperature, ref_emb.shape[0], embeddings.dtype):
            # a pair term could pass -log(small_val): list the pairs, as the peer does, to cap them
            log.debug("NTXentLoss: listed pairs (temperature %g: the peer's small_val cap can bind)", self.temperature)
            # same_set: the peer drops the (i, i) pairs, as get_all_pairs_indices(labels) does
            pairs = _lmu.get_all_pairs_indices(labels) if same_set else _lmu.get_all_pairs_indices(labels, ref_labels)
            return self._listed_pairs_loss(embeddings, ref_emb, *pairs)
        return info_nce(embeddings, ref_emb, temperature=self.temperature, normalize=True, exclude_self=same_set,
                        labels=labels, key_labels=ref_labels, multi_positive="pairwise")

    def _listed_pairs_loss(self, embeddings, ref_emb, a1, p, a2, n):
        positive = _pair_scores(embeddings, ref_emb, a1, p, self.temperature)
        negative = _pair_scores(embeddings, ref_emb, a2, n, self.temperature)
        negative_lse = _anchor_logsumexp(negative, a2, embeddings.shape[0])
        # -log(e^s / (e^s + sum_neg e^n)) = softplus(lse_neg - s); the peer adds small_val to the
        # probability, which caps a term at -log(small_val) (87.3 in float32)
        terms = F.softplus(negative_lse[a1] - positive)
        return _capped(terms).mean()


def _capped(terms: torch.Tensor) -> torch.Tensor:
    """-log(exp(-x) + small_val) for pair terms x = -log p: the peer's log(p + small_val)."""
    tiny = _c_f.small_val(terms.dtype)
    return -torch.log(torch.exp(-terms) + tiny)


def _cap_cannot_bind(temperature: float, candidates: int, dtype: torch.dtype) -> bool:
    """Whether every pair term -log p stays where adding small_val to p changes nothing at this
    precision: cosine logits lie in [-1/T, 1/T], so -log p <= 2/T + log(candidates)."""
    bound = 2.0 / temperature + math.log(max(candidates, 1))
    tiny = _c_f.small_val(dtype)
    return bound < -math.log(tiny) - 20.0  # tiny * e^bound below 2e-9 of p: under float32 rounding


def _fused_forward(loss, name, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """The fused forward both losses share: the peer's input handling, zero where the peer
    returns zero, then ``loss._all_pairs_loss`` (no indices_tuple) or ``loss._listed_pairs_loss``."""
    if indices_tuple is None and labels is None:
        _c_f.labels_or_indices_tuple_required(labels, indices_tuple)
    loss.reset_stats()
    _c_f.check_shapes(embeddings, labels)
    if labels is not None:
        labels = _c_f.to_device(labels, embeddings)
    same_set = ref_emb is None
    ref_emb, ref_labels = _c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
    # The peer drops the (i, i) pairs whenever ref_labels *is* labels (get_matches_and_diffs), also
    # with a ref_emb of other rows, e.g. loss(v1, y, ref_emb=v2, ref_labels=y): do the same.
    same_set = same_set or (ref_labels is not None and ref_labels is labels)
    if indices_tuple is None:
        log.debug("%s: fused path (all label pairs)", name)
        if ref_labels is None:  # ref_emb without ref_labels: the peer compares with the labels themselves
            ref_labels = labels
            same_set = True
        if _peer_returns_zero(*_pair_counts(labels, ref_labels, same_set)):
            return _zero(embeddings)
        return loss._all_pairs_loss(embeddings, labels, ref_emb, ref_labels, same_set)
    log.debug("%s: fused path (indices_tuple pairs)", name)
    a1, p, a2, n = _lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
    if _peer_returns_zero(len(a1), len(a2)):
        return _zero(embeddings)
    return loss._listed_pairs_loss(embeddings, ref_emb, a1, p, a2, n)


def _pair_counts(labels, ref_labels, same_set):
    """(positive pairs, negative pairs) the peer's get_all_pairs_indices would list."""
    values, counts = torch.unique(labels, return_counts=True)
    if same_set:
        positive = int((counts * (counts - 1)).sum())
        return positive, labels.shape[0] ** 2 - int((counts * counts).sum())
    ref_counts = (ref_labels[None, :] == values[:, None]).sum(1)
    positive = int((counts * ref_counts).sum())
    return positive, labels.shape[0] * ref_labels.shape[0] - positive


def _peer_returns_zero(positive_pairs, negative_pairs) -> bool:
    """GenericPairLoss returns zero when no index list is longer than 1, and both losses
    when there is no positive or no negative pair."""
    return (positive_pairs <= 1 and negative_pairs <= 1) or positive_pairs == 0 or negative_pairs == 0


def _zero(embeddings):
    return torch.sum(embeddings * 0)


class SupConLoss(_losses.SupConLoss):
    """pytorch-metric-learning's ``SupConLoss(temperature=0.1, **kwargs)`` on fastcl."""

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if not _fusable(self, _reducers.AvgNonZeroReducer):
            log.debug("SupConLoss: peer path")
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return _fused_forward(self, "SupConLoss", embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _all_pairs_loss(self, embeddings, labels, ref_emb, ref_labels, same_set):
        losses = info_nce(embeddings, ref_emb, temperature=self.temperature, normalize=True,
                          exclude_self=same_set, labels=labels, key_labels=ref_labels,
                          multi_positive="supcon", reduction="none")
        return _average_non_zero(losses, embeddings)

    def _listed_pairs_loss(self, embeddings, ref_emb, a1, p, a2, n):
        # the peer writes the pairs into 0/1 masks: a repeated pair counts once
        rows, cols = embeddings.shape[0], ref_emb.shape[0]
        a1, p = _unique_pairs(a1, p, cols)
        a2, n = _unique_pairs(a2, n, cols)
        positive = _pair_scores(embeddings, ref_emb, a1, p, self.temperature)
        negative = _pair_scores(embeddings, ref_emb, a2, n, self.temperature)
        # denominator over each anchor's listed positives and negatives
        lse = _anchor_logsumexp(torch.cat([positive, negative]), torch.cat([a1, a2]), rows)
        count = torch.zeros(rows, dtype=positive.dtype, device=positive.device).index_add(
            0, a1, torch.ones_like(positive))
        log_prob_sum = torch.zeros(rows, dtype=positive.dtype, device=positive.device).index_add(
            0, a1, positive - lse[a1])
        losses = -log_prob_sum / (count + _c_f.small_val(positive.dtype))
        return _average_non_zero(losses, embeddings)


def _unique_pairs(first, second, cols):
    code = torch.unique(first.long() * cols + second.long())
    return code // cols, code % cols


def _average_non_zero(losses, embeddings):
    """PML's AvgNonZeroReducer: the mean over the strictly positive element losses."""
    positive = losses > 0
    count = int(positive.sum())
    if count == 0:
        return _zero(embeddings)
    return torch.where(positive, losses, torch.zeros_like(losses)).sum() / count
