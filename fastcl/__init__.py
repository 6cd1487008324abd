"""fastcl: fused, memory-efficient kernels for contrastive learning.

Functional ops (``info_nce``, ``clip_loss``, ``nt_xent``, ``siglip_loss``, latent-attention
pooling, patch selection and gathering) and ``nn.Module`` wrappers; ``backends()`` tells which
implementations can run here.
"""
from ._native import Backend, backends
from .ops.info_nce import clip_loss, info_nce, nt_xent
from .ops.siglip import siglip_loss
from .ops.cml import CMLLoss, cml_loss
from .ops.collaborative import CollaborativeContrastiveLoss, collaborative_contrastive_loss
from .ops.triplet import TripletMarginLoss, triplet_margin_loss
from .modules import InfoNCELoss, SigLipLoss
from .ops.patches import budget_split, gather_patches, patch_saliency, select_patches
from .ops.latent_attention import LatentAttentionPooling, latent_attention_pool
from . import models
from .models.ps3 import SelectivePatchEncoder
from . import distributed
from .grad_cache import GradCache
from .validation import set_validation, validation_enabled
from .memory_bank import MemoryBank

try:  # one source of the version: pyproject.toml, through the installed package's metadata
    from importlib.metadata import PackageNotFoundError, version as _package_version

    __version__ = _package_version("fastcl")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = ["Backend", "backends", "info_nce", "clip_loss", "nt_xent", "siglip_loss", "InfoNCELoss", "SigLipLoss",
           "__version__"]
__all__ += ["select_patches", "budget_split", "patch_saliency", "gather_patches", "SelectivePatchEncoder"]
__all__ += ["latent_attention_pool", "LatentAttentionPooling", "models"]
__all__ += ["GradCache", "distributed"]
__all__ += ["set_validation", "validation_enabled"]
__all__ += ["cml_loss", "CMLLoss", "collaborative_contrastive_loss", "CollaborativeContrastiveLoss"]
__all__ += ["MemoryBank"]
__all__ += ["triplet_margin_loss", "TripletMarginLoss"]
