"""Loading of the native module ``fastcl._C`` and the list of available backends.

Importing fastcl never fails because of the native module: if ``_C`` is missing or does not
load, the reason is recorded, :func:`fastcl.backends` reports it, and ops fall back to the
PyTorch path with a single warning.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Dict, NamedTuple, Optional

import torch

_C = None
_C_ERROR: Optional[str] = None
try:
    _C = importlib.import_module("fastcl._C")
except Exception as error:  # ImportError, OSError (missing shared library), anything else
    _C_ERROR = f"{type(error).__name__}: {error}"

_WARNED: set = set()


class Backend(NamedTuple):
    """Whether a backend can run here, and why not when it cannot."""

    name: str
    available: bool
    reason: str

    def __repr__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"Backend({self.name!r}, {state}: {self.reason})"


def native_module():
    """The loaded ``fastcl._C`` module, or None."""
    return _C


def typed_kernel(name: str, dtype: torch.dtype):
    """The native CPU kernel ``<name>_f32`` or ``<name>_f64`` for float32 / float64 data."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"native CPU kernel {name} takes float32/float64 data, got {dtype}")
    return getattr(_C, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _cpu_backend() -> Backend:
    if _C is None:
        return Backend("cpu", False, f"native module fastcl._C did not load ({_C_ERROR})")
    detail = "OpenMP" if getattr(_C, "with_openmp", False) else "single-threaded (built without OpenMP)"
    return Backend("cpu", True, f"native C++ kernels, {detail}")


# The native CUDA InfoNCE kernels (csrc/cuda/info_nce.cu) run on CUDA cores in fp32 and add
# d(key) with atomics: a portable fallback, seconds per step at B = 65536, not deterministic.
CUDA_INFO_NCE_NOTE = ("InfoNCE's native CUDA kernels are a portable fallback (CUDA cores, fp32, atomics): "
                      "auto never picks them (triton, else the chunked torch path); name backend='cuda' to use them")


def _cuda_backend() -> Backend:
    if _C is None:
        return Backend("cuda", False, f"native module fastcl._C did not load ({_C_ERROR})")
    if not getattr(_C, "with_cuda", False):
        return Backend("cuda", False, "fastcl._C was built without CUDA kernels (no nvcc or no GPU driver at build time, or FASTCL_CUDA=OFF)")
    if not torch.cuda.is_available():
        return Backend("cuda", False, "CUDA kernels are built but torch sees no CUDA device")
    return Backend("cuda", True, f"native CUDA kernels; {CUDA_INFO_NCE_NOTE}")


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_status() -> Backend:
    interpret = triton_interpreting()
    if not (torch.cuda.is_available() or interpret):
        return Backend("triton", False, "needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)")
    try:
        import triton  # noqa: F401
    except Exception as error:
        return Backend("triton", False, f"triton does not import ({type(error).__name__}: {error})")
    mode = "interpreter (TRITON_INTERPRET=1)" if interpret else "GPU"
    return Backend("triton", True, f"Triton {triton.__version__} kernels, {mode}")


def backends() -> Dict[str, Backend]:
    """Every backend fastcl knows, whether it is available here, and why (not).

    >>> import fastcl
    >>> fastcl.backends()["cpu"].available  # doctest: +SKIP
    True
    """
    return {
        "naive": Backend("naive", True, "reference: materializes the full logits (tests and baselines)"),
        "torch": Backend("torch", True, "chunked pure-PyTorch path, any device, never materializes B x N"),
        "cpu": _cpu_backend(),
        "triton": triton_status(),
        "cuda": _cuda_backend(),
    }


def requested_backend(backend: str, device: torch.device, what: str = "tensors") -> str:
    """A backend named explicitly (not ``auto``), checked: available here, and ``cpu`` only for
    CPU tensors (``what`` names the tensors in the error). Each op adds its own checks."""
    if backend in ("naive", "torch"):
        return backend
    available = backends()[backend]
    if not available.available:
        raise RuntimeError(f"backend={backend!r} is not available here: {available.reason}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors, got {what} on {device}")
    return backend


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a RuntimeWarning the first time ``key`` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
