"""Embedding models built on fastcl ops (transformers is imported only by what needs it)."""
from .nv_embed import BidirectionalEmbedder, format_query, make_bidirectional, padding_mask_4d

__all__ = ["BidirectionalEmbedder", "format_query", "make_bidirectional", "padding_mask_4d"]
