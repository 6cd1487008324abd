"""Reference SigLIP loss: materializes the B x B logits."""
from ..info_nce.naive import siglip_loss

__all__ = ["siglip_loss"]
