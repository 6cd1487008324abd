"""sentence-transformers losses on fastcl's kernels: same class names, constructors and
``forward(sentence_features, labels)``; they plug into ``SentenceTransformerTrainer`` unchanged.

Fused: ``similarity_fct`` ``cos_sim`` or ``dot_score``; MNRL with ``directions=("query_to_doc",)``
or the symmetric pair ``("query_to_doc", "doc_to_query")`` with ``partition_mode="per_direction"``
(= ``MultipleNegativesSymmetricRankingLoss``), no hardness weighting, no
``gather_across_devices``; GIST with one process. Everything else runs the peer's own code.
"""
from __future__ import annotations

from typing import Iterable

import torch
from sentence_transformers import losses as _st_losses
from sentence_transformers import util as _st_util
from sentence_transformers.base.losses.merged_forward import embed_columns
from torch import Tensor, nn

from ..grad_cache import GradCache
from ..ops.info_nce import info_nce
from ..ops.info_nce import SHARED, Segment, SegmentOptions, segmented_loss
from . import log

__all__ = ["MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss",
           "CachedMultipleNegativesRankingLoss", "GISTEmbedLoss"]


def _normalizes(similarity_fct):
    """True for cosine, False for dot product, None for anything fastcl does not fuse."""
    if similarity_fct is _st_util.cos_sim:
        return True
    if similarity_fct is getattr(_st_util, "dot_score", None):
        return False
    return None


def _fused_mode(loss) -> str | None:
    """'forward' (query -> doc), 'symmetric' (+ doc -> query, per direction) or None (peer path)."""
    if _normalizes(loss.similarity_fct) is None or loss.gather_across_devices:
        return None
    if getattr(loss, "hardness_mode", None) is not None and getattr(loss, "hardness_strength", 0.0) > 0.0:
        return None
    directions = tuple(loss.directions)
    if directions == ("query_to_doc",):
        return "forward"
    if set(directions) == {"query_to_doc", "doc_to_query"} and len(directions) == 2 and loss.partition_mode == "per_direction":
        return "symmetric"
    return None


def _ranking_loss(mode: str, normalize: bool, scale: float, queries: Tensor, *docs: Tensor) -> Tensor:
    dtype = queries.dtype
    for doc in docs:  # columns in different precisions (ST #2973): promote them (the peer's matmul raises)
        dtype = torch.promote_types(dtype, doc.dtype)
    queries = queries.to(dtype)
    docs = [doc.to(dtype) for doc in docs]
    keys = torch.cat(docs, dim=0) if len(docs) > 1 else docs[0]
    return info_nce(queries, keys, temperature=1.0 / scale, normalize=normalize, symmetric=(mode == "symmetric"))


class MultipleNegativesRankingLoss(_st_losses.MultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (same constructor) on fastcl's
    fused InfoNCE: no B x (B * columns) score matrix."""

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        mode = _fused_mode(self)
        if mode is None or len(embeddings) < 2:
            log.debug("%s: peer path", type(self).__name__)
            return super().compute_loss_from_embeddings(embeddings, labels)
        log.debug("%s: fused path (%s)", type(self).__name__, mode)
        return _ranking_loss(mode, _normalizes(self.similarity_fct), self.scale, *embeddings)


class MultipleNegativesSymmetricRankingLoss(_st_losses.MultipleNegativesSymmetricRankingLoss):
    """sentence-transformers' ``MultipleNegativesSymmetricRankingLoss`` on fastcl's fused
    symmetric InfoNCE."""

    compute_loss_from_embeddings = MultipleNegativesRankingLoss.compute_loss_from_embeddings


class _SentenceEncoder(nn.Module):
    """A SentenceTransformer called with a chunk of its feature dict, returning the embeddings."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **features):
        return self.model(features)["sentence_embedding"]

    @property
    def wraps_ddp(self) -> bool:  # GradCache then synchronizes once per step, through no_sync
        return isinstance(self.model, nn.parallel.DistributedDataParallel)

    def no_sync(self):
        return self.model.no_sync()


class CachedMultipleNegativesRankingLoss(_st_losses.CachedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (same constructor) on
    :class:`fastcl.GradCache` in deferred mode (the returned loss replays the mini-batches on
    ``loss.backward()``) with the fused InfoNCE as its loss."""

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        sentence_features = list(sentence_features)
        mode = _fused_mode(self)
        if mode is None or len(sentence_features) < 2 or self.mini_batch_num_tokens is not None \
                or any("cu_seq_lens_q" in f for f in sentence_features):
            log.debug("%s: peer path", type(self).__name__)
            return super().forward(sentence_features, labels)
        log.debug("%s: fused path (%s, fastcl.GradCache deferred)", type(self).__name__, mode)
        normalize = _normalizes(self.similarity_fct)
        scale = self.scale
        cache = GradCache(_SentenceEncoder(self.model), chunk_size=self.mini_batch_size, trim_padding=True,
                          loss_fn=lambda queries, *docs: _ranking_loss(mode, normalize, scale, queries, *docs))
        return cache.loss(*sentence_features)


class GISTEmbedLoss(_st_losses.GISTEmbedLoss):
    """sentence-transformers' ``GISTEmbedLoss`` (same constructor) with the guide's
    false-negative mask fused into the InfoNCE blocks (fastcl's segment driver): the
    anchor-positive, anchor-anchor, positive-positive and anchor-negative similarities are
    never materialized, neither are the guide's."""

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        sentence_features = list(sentence_features)
        if self.gather_across_devices or len(sentence_features) not in (2, 3):
            log.debug("GISTEmbedLoss: peer path")
            return super().forward(sentence_features, labels)
        log.debug("GISTEmbedLoss: fused path")
        guide_features = [dict(f) for f in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        with torch.no_grad():
            if self.must_retokenize:
                guide_features = []
                for feature in sentence_features:
                    decoded = self.tokenizer.batch_decode(feature["input_ids"], skip_special_tokens=True)
                    guide_features.append(_st_util.batch_to_device(self.guide.preprocess(decoded), self.guide.device))
            guide_embeddings = embed_columns(self.guide, guide_features)
        return gist_loss(embeddings, guide_embeddings, self.temperature, self.margin_strategy, self.margin,
                         self.contrast_anchors, self.contrast_positives)


def gist_loss(embeddings, guide_embeddings, temperature, margin_strategy="absolute", margin=0.0,
              contrast_anchors=True, contrast_positives=True) -> Tensor:
    """GISTEmbed's loss from the model's and the guide's (anchor, positive[, negative]) embeddings."""
    dtype = torch.float64 if embeddings[0].dtype == torch.float64 else torch.float32
    unit = [torch.nn.functional.normalize(e.to(dtype), dim=-1) for e in embeddings]
    guide = [torch.nn.functional.normalize(g.detach().to(dtype), dim=-1) for g in guide_embeddings]
    anchor, positive = unit[0], unit[1]
    anchor_guide, positive_guide = guide[0], guide[1]
    segments = [Segment(anchor, positive, SHARED, guide_anchors=anchor_guide, guide_candidates=positive_guide)]
    if contrast_anchors:
        segments.append(Segment(anchor, anchor, SHARED, guide_anchors=anchor_guide, guide_candidates=anchor_guide))
    if contrast_positives:
        segments.append(Segment(positive, positive, SHARED, guide_anchors=positive_guide, guide_candidates=positive_guide))
    if len(unit) == 3:
        segments.append(Segment(anchor, unit[2], SHARED, guide_anchors=anchor_guide, guide_candidates=guide[2]))
    options = SegmentOptions(torch.arange(anchor.shape[0], device=anchor.device), None, float(margin),
                             margin_strategy == "relative")
    return segmented_loss(segments, options, torch.tensor(float(temperature), dtype=torch.float64))
