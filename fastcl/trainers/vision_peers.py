"""The peer losses the vision trainers are benchmarked against (``--peer``), loaded offline.

* pytorch-metric-learning ``NTXentLoss`` (SimCLR): the embeddings ``cat([z1, z2])`` with labels
  ``cat([arange(B), arange(B)])``: the same NT-Xent as :func:`fastcl.nt_xent`.
* lightly ``NTXentLoss`` (SimCLR, lightly 1.6): ``loss(z1, z2)``. Its package imports torchvision
  (whose wheels pin a CUDA torch), so the loss module is loaded from the installed files with
  the two lightly modules it needs and a stand-in for ``lightly.models.utils`` (used only by
  memory banks, which SimCLR does not have). Install it beside fastcl with
  ``pip install --no-deps lightly``.
* open_clip ``ClipLoss`` (CLIP): open_clip's ``loss.py``, loaded by file when the package itself
  cannot be imported (it needs torchvision), as tests/ops/test_peers.py does.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch


def _installed_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed (pip install --no-deps {package})")
    return next(iter(spec.submodule_search_locations))


def _load_file(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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
    try:
        from lightly.loss import NTXentLoss

        return NTXentLoss(temperature=temperature)
    except ImportError:
        pass
    root = _installed_dir("lightly")
    # empty parent packages, so importing a submodule runs none of lightly's __init__ files
    for name, sub in (("lightly", ""), ("lightly.utils", "utils"), ("lightly.models", "models"),
                      ("lightly.models.modules", "models/modules"), ("lightly.loss", "loss")):
        if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = package
    sys.modules.setdefault("lightly.models.utils", types.ModuleType("lightly.models.utils"))
    _load_file("lightly.utils.dist", os.path.join(root, "utils", "dist.py"))
    _load_file("lightly.models.modules.memory_bank", os.path.join(root, "models", "modules", "memory_bank.py"))
    module = _load_file("lightly.loss.ntx_ent_loss", os.path.join(root, "loss", "ntx_ent_loss.py"))
    return module.NTXentLoss(temperature=temperature)


def open_clip_loss():
    """open_clip's ``ClipLoss()`` as ``loss(image_features, text_features, logit_scale)``."""
    try:
        import open_clip.loss as module
    except ImportError:
        module = _load_file("_open_clip_loss", os.path.join(_installed_dir("open_clip"), "loss.py"))
    return module.ClipLoss()
