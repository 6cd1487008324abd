"""Registration of the GPU backends of InfoNCE without importing them.

``triton`` is registered whenever the package is installed; its kernels module (and triton
itself, a slow import) loads on the first call. ``cuda`` is registered when ``fastcl._C`` was
built with the CUDA kernels. Whether either can run on this machine is
:func:`fastcl.backends`'s business (``resolve_backend`` asks it).
"""
from __future__ import annotations

import importlib.util

from ..._native import native_module


def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _triton_info_nce(*args):
    from .triton import triton_info_nce

    return triton_info_nce(*args)


def register_gpu_backends(extra_backends: dict) -> None:
    if triton_installed():
        extra_backends["triton"] = _triton_info_nce
    module = native_module()
    if module is not None and getattr(module, "with_cuda", False):
        from .native_cuda import cuda_info_nce

        extra_backends["cuda"] = cuda_info_nce


def chunked_info_nce(query, key, hard_negatives, temperature, positive, labels, key_labels, options):
    """The same call on the chunked PyTorch path (float64 inputs of the GPU backends), through
    the public function so it follows whatever that path is."""
    from . import info_nce

    return info_nce(query, key, positive=positive, hard_negatives=hard_negatives, temperature=temperature,
                    normalize=options.normalize, symmetric=options.symmetric, exclude_self=options.exclude_self,
                    labels=labels, key_labels=key_labels, multi_positive=options.multi_positive,
                    false_negative_margin=options.margin, label_smoothing=options.label_smoothing,
                    reduction=options.reduction, backend="torch")
