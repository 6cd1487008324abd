"""open_clip's ``ClipLoss`` and ``SigLipLoss`` on fastcl's kernels (no B x B logits), with the
peer's constructors and calls, and :func:`patch_open_clip` to swap them into ``open_clip``.

``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
use_horovod=False)``, ``forward(image_features, text_features, logit_scale, logit_bias=None,
output_dict=False)``: every mode open_clip has with ``torch.distributed`` (``world_size > 1``
gathers through ``fastcl.distributed``); ``use_horovod=True`` raises ``NotImplementedError``.
``SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None)``,
``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``: every
``dist_impl`` gives open_clip's values and gradients through ``fastcl.distributed.siglip_loss``.

fastcl extension, after the peer's arguments: ``distributed_mode="auto"`` (keyword only; one of
``fastcl.distributed.MODES``), passed as ``mode=`` to ``fastcl.distributed`` for
``world_size > 1``: ``"ring"`` passes blocks around the ranks (memory per rank flat in the world
size). It covers SigLipLoss and ClipLoss with ``local_loss=True, gather_with_grad=True``; the other
ClipLoss combinations gather the features themselves, so ``"ring"`` raises a ValueError for them.

This module does not import open_clip.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import distributed as _fastcl_distributed
from ..ops.common.checks import check_choice
from ..ops.info_nce import clip_loss, info_nce
from ..ops.siglip import siglip_loss
from . import log

__all__ = ["ClipLoss", "SigLipLoss", "patch_open_clip"]

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _gather_without_grad(tensor: torch.Tensor, rank: int, world_size: int, keep_local: bool) -> torch.Tensor:
    """All ranks' rows in rank order without gradient, except this rank's slice when
    ``keep_local`` (open_clip's ``gather_with_grad=False``: global loss keeps it, local loss not)."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    if keep_local:
        parts[rank] = tensor
    return torch.cat(parts, dim=0)


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` on fastcl's fused symmetric InfoNCE.

    open_clip's arguments, then fastcl's ``distributed_mode`` ("auto", "gather" or "ring"; the
    ``mode`` of ``fastcl.distributed.clip_loss`` when ``world_size > 1``). "ring" needs
    ``local_loss=True, gather_with_grad=True``: the global loss (``local_loss=False``) and a
    gather without gradient work on the gathered features, which the ring never forms.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, distributed_mode: str = "auto"):
        super().__init__()
        check_choice("distributed_mode", distributed_mode, _fastcl_distributed.MODES)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: fastcl builds no label tensor
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.distributed_mode = distributed_mode
        self.prev_num_logits = 0
        self.labels = {}
        if use_horovod:
            raise NotImplementedError("fastcl's ClipLoss does not support use_horovod=True (horovod); use torch.distributed")
        if world_size > 1:
            self._check_ring_covers()

    def _check_ring_covers(self) -> None:
        """distributed_mode="ring" runs only fastcl.distributed.clip_loss (the local loss with gradient
        through the gather); the other combinations gather the features themselves."""
        if self.distributed_mode == "ring" and not (self.local_loss and self.gather_with_grad):
            raise ValueError(
                "ClipLoss(distributed_mode='ring') needs local_loss=True and gather_with_grad=True (got "
                f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}): the global loss and a "
                "gather without gradient work on every rank's gathered features; use distributed_mode='gather' "
                "or 'auto' for them")

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """open_clip's targets: 0..num_logits-1, offset by this rank's rows under local_loss."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
        else:
            labels = self.labels[device]
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """(logits_per_image, logits_per_text) as open_clip forms them (materialized: for logging
        or subclasses; the loss itself never builds them unless a subclass overrides this)."""
        if self.world_size > 1:
            images, texts = self._gather(image_features, text_features)
            if self.local_loss:
                per_image = logit_scale * image_features @ texts.T
                per_text = logit_scale * text_features @ images.T
            else:
                per_image = logit_scale * images @ texts.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

    def _gather(self, image_features, text_features):
        """Every rank's features, as open_clip's gather_features gives them (with or without grad;
        without, this rank's own rows keep theirs unless local_loss)."""
        if self.gather_with_grad:
            return (_fastcl_distributed.all_gather_rows(image_features),
                    _fastcl_distributed.all_gather_rows(text_features))
        keep_local = not self.local_loss
        return (_gather_without_grad(image_features, self.rank, self.world_size, keep_local),
                _gather_without_grad(text_features, self.rank, self.world_size, keep_local))

    def _overridden(self) -> bool:
        return type(self).get_logits is not ClipLoss.get_logits or \
            type(self).get_ground_truth is not ClipLoss.get_ground_truth

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.use_horovod:
            raise NotImplementedError("fastcl's ClipLoss does not support use_horovod=True (horovod); use torch.distributed")
        if self._overridden():  # a subclass's own logits or targets: open_clip's materialized loss over them
            if self.world_size > 1 and self.distributed_mode == "ring":
                raise ValueError("ClipLoss(distributed_mode='ring'): a subclass overriding get_logits / "
                                 "get_ground_truth gets open_clip's loss over the gathered logits, which the ring "
                                 "never forms; use distributed_mode='gather' or 'auto'")
            log.debug("ClipLoss: materialized path (get_logits / get_ground_truth overridden)")
            per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
            labels = self.get_ground_truth(image_features.device, per_image.shape[0])
            loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
            return {"contrastive_loss": loss} if output_dict else loss
        if self.world_size > 1:
            loss = self._distributed(image_features, text_features, logit_scale)
        else:
            log.debug("ClipLoss: fused path (one process)")
            loss = clip_loss(image_features, text_features, logit_scale)
        if isinstance(logit_bias, torch.Tensor):  # a constant shift of every logit: no effect, zero gradient
            loss = loss + 0.0 * logit_bias.sum()
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, image_features, text_features, logit_scale):
        if self.gather_with_grad and self.local_loss:
            log.debug("ClipLoss: fused path (fastcl.distributed.clip_loss, local loss, mode=%s)", self.distributed_mode)
            return _fastcl_distributed.clip_loss(image_features, text_features, logit_scale,
                                                 mode=self.distributed_mode)
        self._check_ring_covers()  # the options may have been changed since construction
        log.debug("ClipLoss: fused path (gathered %s grad)", "with" if self.gather_with_grad else "without")
        images, texts = self._gather(image_features, text_features)
        if not self.local_loss:
            return clip_loss(images, texts, logit_scale)
        batch = image_features.shape[0]
        positive = torch.arange(batch, device=image_features.device) + batch * self.rank
        temperature = 1.0 / logit_scale
        return 0.5 * (info_nce(image_features, texts, positive=positive, temperature=temperature)
                      + info_nce(text_features, images, positive=positive, temperature=temperature))


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` on fastcl's fused sigmoid loss.

    open_clip's arguments, then fastcl's ``distributed_mode`` ("auto", "gather" or "ring"; the
    ``mode`` of ``fastcl.distributed.siglip_loss`` for every ``dist_impl`` when ``world_size > 1``).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: Optional[str] = None,
                 *, distributed_mode: str = "auto"):
        super().__init__()
        check_choice("distributed_mode", distributed_mode, _fastcl_distributed.MODES)
        self.distributed_mode = distributed_mode
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} or None, got {dist_impl!r}")
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """open_clip's targets: +1 on the diagonal, -1 elsewhere (-1 everywhere with negative_only)."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """logit_scale * image_features @ text_features.T + logit_bias (materialized, as open_clip's)."""
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        return logits

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        if type(self).get_logits is not SigLipLoss.get_logits or \
                type(self).get_ground_truth is not SigLipLoss.get_ground_truth:
            if self.world_size > 1:
                raise NotImplementedError("SigLipLoss with get_logits / get_ground_truth overridden runs in one "
                                          "process only; use open_clip's own SigLipLoss for world_size > 1")
            log.debug("SigLipLoss: materialized path (get_logits / get_ground_truth overridden)")
            logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
            labels = self.get_ground_truth(image_features.device, image_features.dtype, image_features.shape[0])
            loss = -F.logsigmoid(labels * logits).sum() / image_features.shape[0]
            return {"contrastive_loss": loss} if output_dict else loss
        if self.world_size > 1:
            log.debug("SigLipLoss: fused path (fastcl.distributed.siglip_loss, dist_impl=%s, mode=%s)", self.dist_impl,
                      self.distributed_mode)
            loss = _fastcl_distributed.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                                   mode=self.distributed_mode)
        else:
            log.debug("SigLipLoss: fused path (one process)")
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


_REPLACED = {"ClipLoss": ClipLoss, "SigLipLoss": SigLipLoss}


# (module, name) -> [open_clip's own class, number of live patch handles]: handles may be undone
# in any order, and the originals come back only when the last one is.
_ORIGINALS: dict = {}


class _Patch:
    """What :func:`patch_open_clip` replaced; ``undo()`` (or leaving a ``with`` block) restores it
    once every handle has been undone, in whatever order."""

    def __init__(self, saved):
        self.saved = saved

    def undo(self) -> None:
        for module, name in reversed(self.saved):
            entry = _ORIGINALS.get((module, name))
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                setattr(module, name, entry[0])
                del _ORIGINALS[(module, name)]
        self.saved = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


def peer_loss_module(from_file: bool = False):
    """open_clip's own loss module, to compare with: ``open_clip.loss`` when the package imports
    (unless ``from_file``), else its ``loss.py`` loaded from the installed files (the package
    needs torchvision, whose wheels pin a CUDA torch; the loss module needs only torch). Raises
    ImportError when open_clip is not installed."""
    if not from_file:
        try:
            import open_clip.loss

            return open_clip.loss
        except ImportError:
            pass
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed (pip install --no-deps open_clip_torch)")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    loss_spec = importlib.util.spec_from_file_location("_fastcl_peer_open_clip_loss", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


def patch_open_clip(module=None) -> _Patch:
    """Swap ``ClipLoss`` and ``SigLipLoss`` in ``open_clip.loss`` (and where open_clip imported
    them: ``open_clip``, ``open_clip.factory``) for fastcl's, so ``open_clip.create_loss`` and
    open_clip's training script build fastcl's losses. Returns a handle whose ``undo()``
    restores the originals; also a context manager.

    ``module``: the loss module to patch (default: ``open_clip.loss``, imported).
    """
    targets = []
    if module is None:
        module = importlib.import_module("open_clip.loss")
        for name in ("open_clip", "open_clip.factory"):
            if name in sys.modules:
                targets.append(sys.modules[name])
    targets.insert(0, module)
    saved = []
    for target in targets:
        for name, replacement in _REPLACED.items():
            if hasattr(target, name):
                entry = _ORIGINALS.setdefault((target, name), [getattr(target, name), 0])
                entry[1] += 1
                saved.append((target, name))
                setattr(target, name, replacement)
    return _Patch(saved)
