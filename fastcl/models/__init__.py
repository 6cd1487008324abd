"""Models built on fastcl's ops."""
from .ps3 import PS3Output, SelectivePatchEncoder

__all__ = ["SelectivePatchEncoder", "PS3Output"]
