"""The ``nn.Module`` losses, where earlier releases defined two of them: each module now lives
with its op (``fastcl.ops.<op>``), beside its function; this path stays importable."""
from .ops.info_nce import InfoNCELoss
from .ops.siglip import SigLipLoss

__all__ = ["InfoNCELoss", "SigLipLoss"]
