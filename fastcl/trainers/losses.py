"""The contrastive losses a method calls: fastcl's fused kernels or the naive reference (one flag),
on one process or with every rank's negatives (``fastcl.distributed``) under torchrun.

``loss="naive"`` runs the same maths through ``backend="naive"`` (materialized logits), so fused
and naive runs differ only by rounding and draw the same random numbers. ``loss="fused"`` is
``backend="auto"``: on the CPU a call with few logits (at most 2^17 normalized, 2^19 raw dot
products: the trainers' usual batches) takes the materializing path, which is faster there;
``loss="kernels"`` runs the fused kernels at every size (the benchmark's row that measures them).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import fastcl

__all__ = ["distributed_active", "backend_for", "info_nce", "clip_loss", "cml_loss", "collaborative_contrastive_loss"]


def distributed_active() -> bool:
    """True under torchrun / accelerate launch with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def backend_for(loss: str, device=None) -> str:
    """``naive``, ``auto`` (fused), or for ``kernels`` the fused backend ``auto`` takes on ``device``
    when the size is not considered (``cpu``, ``triton`` or ``torch``)."""
    if loss not in ("fused", "naive", "kernels"):
        raise ValueError(f"loss must be 'fused', 'naive' or 'kernels', got {loss!r}")
    if loss == "kernels":
        from fastcl.ops.info_nce import resolve_backend

        return resolve_backend("auto", torch.device(device) if device is not None else torch.device("cpu"))
    return "naive" if loss == "naive" else "auto"


def info_nce(query: torch.Tensor, key: torch.Tensor, *, loss: str = "fused", **kwargs) -> torch.Tensor:
    """:func:`fastcl.info_nce` (or :func:`fastcl.distributed.info_nce` with several processes:
    the keys of every rank are candidates); ``loss`` picks the fused or the naive backend."""
    function = fastcl.distributed.info_nce if distributed_active() else fastcl.info_nce
    return function(query, key, backend=backend_for(loss, query.device), **kwargs)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *, loss: str = "fused") -> torch.Tensor:
    """:func:`fastcl.clip_loss` (every rank's pairs as negatives under torchrun)."""
    function = fastcl.distributed.clip_loss if distributed_active() else fastcl.clip_loss
    return function(image_features, text_features, logit_scale, backend=backend_for(loss, image_features.device))


def cml_loss(users: torch.Tensor, positives: torch.Tensor, *, loss: str = "fused", **kwargs) -> torch.Tensor:
    """:func:`fastcl.cml_loss` (per-pair: under torchrun each rank's pairs and its own sampled
    negatives; DDP averages the gradients)."""
    return fastcl.cml_loss(users, positives, backend=backend_for(loss, users.device), **kwargs)


def collaborative_contrastive_loss(items: torch.Tensor, clicks: torch.Tensor, mask: torch.Tensor, *,
                                   loss: str = "fused", **kwargs) -> torch.Tensor:
    """:func:`fastcl.collaborative_contrastive_loss` (within each page: no cross-rank terms)."""
    return fastcl.collaborative_contrastive_loss(items, clicks, mask, backend=backend_for(loss, items.device), **kwargs)
