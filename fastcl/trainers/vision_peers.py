"""The peer losses the vision trainers are benchmarked against (``--peer``), loaded offline.

* pytorch-metric-learning ``NTXentLoss`` (SimCLR): the embeddings ``cat([z1, z2])`` with labels
  ``cat([arange(B), arange(B)])``: the same NT-Xent as :func:`fastcl.nt_xent`.
* lightly ``NTXentLoss`` (SimCLR, lightly 1.6): ``loss(z1, z2)``. Its package imports torchvision
  (whose wheels pin a CUDA torch), so where it cannot be imported the loss module is loaded from
  the installed files (:func:`fastcl.integrations.lightly.peer_loss_class`). Install it beside
  fastcl with ``pip install --no-deps lightly``.
* open_clip ``ClipLoss`` (CLIP): open_clip's ``loss.py``, loaded by file when the package itself
  cannot be imported (:func:`fastcl.integrations.open_clip.peer_loss_module`).
"""
from __future__ import annotations

import torch


def pml_nt_xent(temperature: float):
    """pytorch-metric-learning's NTXentLoss as ``loss(z1, z2)``."""
    from pytorch_metric_learning.losses import NTXentLoss

    peer = NTXentLoss(temperature=temperature)

    def loss(z1, z2):
        labels = torch.arange(z1.shape[0], device=z1.device).repeat(2)
        return peer(torch.cat([z1, z2]), labels)

    return loss


def lightly_nt_xent(temperature: float):
    """lightly's NTXentLoss as ``loss(z1, z2)`` (see the module docstring for how it is loaded)."""
    from ..integrations.lightly import peer_loss_class

    return peer_loss_class()(temperature=temperature)


def open_clip_loss():
    """open_clip's ``ClipLoss()`` as ``loss(image_features, text_features, logit_scale)``."""
    from ..integrations.open_clip import peer_loss_module

    return peer_loss_module().ClipLoss()
