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

from ..._native import native_module
from ..common.gpu import check_triton_device, triton_installed


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
