"""Registration of the SigLIP GPU backends without importing them (see ``info_nce/gpu.py``)."""
from __future__ import annotations

from ..info_nce.gpu import triton_installed


def _triton_siglip_loss(*args):
    from .triton import triton_siglip_loss

    return triton_siglip_loss(*args)


def register_gpu_backends(extra_backends: dict) -> None:
    # Only Triton: the native CUDA kernels cover InfoNCE (SigLIP's chunked path already runs
    # on any CUDA device, and its Triton kernel is a single pass).
    if triton_installed():
        extra_backends["triton"] = _triton_siglip_loss
