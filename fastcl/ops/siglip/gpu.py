"""Registration of the SigLIP GPU backends (see ``info_nce/gpu.py``): Triton only.

The native CUDA kernels cover InfoNCE; SigLIP's chunked path already runs on any CUDA device,
and its Triton kernel is a single pass.
"""
from __future__ import annotations

from ..info_nce.gpu import check_triton_device, triton_installed


def register_gpu_backends(extra_backends: dict) -> None:
    if triton_installed():
        extra_backends["triton"] = check_triton_device
