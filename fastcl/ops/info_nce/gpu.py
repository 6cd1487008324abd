"""The GPU backends of InfoNCE, registered without importing them.

``triton`` is registered whenever triton is installed; its kernels module (and triton itself, a
slow import) loads on the first call. ``cuda`` is registered when fastcl was built with
the CUDA kernels. Whether either can run on this machine is :func:`fastcl.backends`'s business
(``resolve_backend`` asks it).

Both run inside the ``fastcl::info_nce_forward`` / ``fastcl::info_nce_backward`` custom ops
(:mod:`.op`), like the CPU backends, so ``torch.compile`` sees one opaque op whatever the backend.
Each backend here has a *check* (what it refuses, called before the op) and the op's two bodies.
"""
from __future__ import annotations

import importlib.util

import torch

from ..._native import native_module, triton_interpreting


def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def check_triton_device(query: torch.Tensor, *_ignored) -> None:
    """Triton runs CUDA tensors, and CPU tensors only in its interpreter (float64 takes the chunked path)."""
    if query.dtype == torch.float64 or query.device.type == "cuda":
        return
    if not triton_interpreting():
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got query on {query.device}"
        )


def _check_cuda(query, options, labels) -> None:
    from .native_cuda import check_cuda_options

    check_cuda_options(query, options, labels)


def register_gpu_backends(extra_backends: dict) -> None:
    if triton_installed():
        extra_backends["triton"] = check_triton_device
    module = native_module()
    if module is not None and getattr(module, "with_cuda", False):
        extra_backends["cuda"] = _check_cuda


def gpu_implementation(backend: str):
    """(forward, backward) bodies of the custom ops for a GPU backend."""
    if backend == "triton":
        from .triton import triton_backward, triton_forward

        return triton_forward, triton_backward
    from .native_cuda import cuda_backward, cuda_forward

    return cuda_forward, cuda_backward
