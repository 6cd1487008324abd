"""Backend resolution for every op: each op passes its own table of GPU backends (name -> the
check of what that backend refuses); ``auto`` picks the fastest exact path for the device and,
for the ops that can materialize their logits, the size."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..._native import CUDA_INFO_NCE_NOTE, backends as _backends, native_module, requested_backend, warn_once
from ..._tracing import functorch_active, is_compiling

_log = logging.getLogger("fastcl")

# ``auto`` on the CPU materializes the logits (the naive path) when a call has at most this many
# (B x (N + H)): below it the fused path's fixed costs (custom op, block driver, native calls)
# lose to PyTorch's own ops. Measured crossover (benchmarks/bench_auto_crossover.py, interleaved
# in one process, the same within noise for the default, avx2 and avx512 kernels): the native
# kernels win from B = 512 (2^18 logits) with normalize=True, where the plain loss also pays the
# normalization, and from B = 1024 (2^20) on raw dot products. Keyed by ``normalize``: a finer
# sweep (B = 362 ... 2048, D = 128 ... 768, tau = 0.01 ... 1; results/cpu_auto_crossover/fine)
# puts the crossover at the same sizes for every width and temperature, within +-5 %.
MATERIALIZE_LOGITS = {True: 2**17, False: 2**19}


# ``FASTCL_MATERIALIZE_LOGITS=N`` (read at import) replaces the table: benchmarks use 0 to time
# the fused path at every size.
MATERIALIZE_OVERRIDE = int(os.environ["FASTCL_MATERIALIZE_LOGITS"]) if os.environ.get("FASTCL_MATERIALIZE_LOGITS") else None


def materialize_logits(normalized: bool = True) -> int:
    """The threshold above for these inputs, or the override."""
    if MATERIALIZE_OVERRIDE is not None:
        return MATERIALIZE_OVERRIDE
    return MATERIALIZE_LOGITS[bool(normalized)]


def resolve_backend(backend: str, device: torch.device, extra_backends: dict, logits: Optional[int] = None,
                    normalized: bool = True, cpu_kernels: bool = True) -> str:
    """The backend that will run: ``auto`` picks the fastest exact path for ``device`` and size.

    ``extra_backends``: the op's own GPU implementations (name -> check); ``cpu_kernels``: whether
    the op has native CPU kernels (the ``cpu`` backend; without them ``auto`` takes ``torch``). ``logits``: how
    many logits the call has (B x (N + H)); on the CPU, ``auto`` takes the materializing
    ``naive`` path when they are at most :func:`materialize_logits`. Without it, the size is
    not considered. The ``fastcl`` logger names the choice at DEBUG level.
    """
    chosen = _resolve(backend, device, extra_backends, logits, normalized, cpu_kernels)
    if not is_compiling():  # dynamo cannot trace a logging call
        _log.debug("fastcl: backend=%r -> %r (%s logits)", backend, chosen, logits)
    return chosen


def _resolve(backend, device, extra_backends, logits, normalized, cpu_kernels) -> str:
    extra = extra_backends
    if backend != "naive" and functorch_active():
        # torch.func (grad, vmap, jacrev): the fused kernels' autograd does not compose with the
        # transforms, so every backend computes with plain differentiable PyTorch here (the
        # same values; the logits are materialized)
        _log.debug("fastcl: inside a torch.func transform: backend=%r runs the reference", backend)
        return "naive"
    if backend == "auto":
        if device.type == "cpu":  # the hot path of small calls: no backends() table
            if not cpu_kernels:
                return "torch"
            native = native_module() is not None
            if not native:
                warn_once("cpu-fallback", f"fastcl: native CPU kernels unavailable ({_backends()['cpu'].reason}); "
                                          "using the chunked PyTorch path")
            if logits is not None and logits <= materialize_logits(normalized):
                return "naive"
            return "cpu" if native else "torch"
        available = _backends()
        if device.type == "cuda":
            if "triton" in extra and available["triton"].available:
                return "triton"
            if "cuda" in extra and available["cuda"].available:
                # the native CUDA kernels are slower than the chunked path on tensor cores
                warn_once("cuda-not-auto", f"fastcl: Triton unavailable ({available['triton'].reason}); "
                          f"using the chunked torch path. {CUDA_INFO_NCE_NOTE}")
            return "torch"
        return "torch"
    requested_backend(backend, device)
    if backend in ("triton", "cuda") and backend not in extra:
        raise RuntimeError(f"backend={backend!r} has no kernels for this op in this build")
    return backend
