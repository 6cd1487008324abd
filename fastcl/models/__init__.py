"""Models built on fastcl's ops (transformers is imported only by what needs it)."""
from .nv_embed import BidirectionalEmbedder, format_query, make_bidirectional, padding_mask_4d
from .ps3 import PS3Output, SelectivePatchEncoder

__all__ = ["SelectivePatchEncoder", "PS3Output", "BidirectionalEmbedder", "format_query", "make_bidirectional",
           "padding_mask_4d"]
