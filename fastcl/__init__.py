"""fastcl: fused, memory-efficient kernels for contrastive learning.

Functional ops (``info_nce``, ``clip_loss``, ``nt_xent``, ``siglip_loss``) and ``nn.Module``
wrappers; ``backends()`` tells which implementations can run here.
"""
from ._native import Backend, backends
from .ops.info_nce import clip_loss, info_nce, nt_xent
from .ops.siglip import siglip_loss
from . import distributed
from .grad_cache import GradCache

__version__ = "0.1.0"

__all__ = ["Backend", "backends", "info_nce", "clip_loss", "nt_xent", "siglip_loss", "__version__"]
__all__ += ["GradCache", "distributed"]
