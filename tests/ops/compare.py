"""Shared helpers of the op tests: the comparison of the GPU-backend tests (Triton, CUDA)
against the naive reference, a spy on the path an op takes, and the backend list of the ops
that run on torch / cpu / triton."""
import importlib.util
import inspect

import pytest
import torch

import fastcl

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# pytestmark of the Triton test modules: marked, skipped without triton, and the interpreter's
# (numpy) warnings for values the kernels want (log(0) = -inf, exp overflow to inf) silenced
TRITON_MARKS = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp"),
    pytest.mark.usefixtures("triton_mode"),  # tests/conftest.py
]



def assert_close(actual, expected, tolerance, what):
    """Max absolute error within ``tolerance`` times the largest reference magnitude."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-6)
    error = float((actual - expected).abs().max() / scale)
    assert error <= tolerance, f"{what}: max error {error:.3g} x max|ref| {float(scale):.3g} > {tolerance:g}"


def record_calls(monkeypatch, module, name, argument):
    """Replaces ``module.name`` by a wrapper that records the value of its parameter
    ``argument`` at each call, then calls the original; returns the list of recorded values."""
    calls = []
    original = getattr(module, name)
    signature = inspect.signature(original)

    def recording(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(bound.arguments[argument])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


def fused_backends():
    """The fused backends to compare with ``naive``: torch, cpu where its kernels are built, and
    triton where it is installed (marked ``triton``; on a GPU machine also ``cuda``, the cases then
    run on CUDA tensors: benchmarks/gpu_check.sh runs pytest -m cuda)."""
    backends = ["torch"] + (["cpu"] if fastcl.backends()["cpu"].available else [])
    if fastcl.backends()["triton"].available:
        backends.append(pytest.param("triton", marks=[pytest.mark.triton] + ([pytest.mark.cuda] if torch.cuda.is_available() else [])))
    return backends


def backend_device(backend):
    """Where ``backend``'s cases run: CUDA for triton on a GPU machine, else the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def no_subnormal(tensor: torch.Tensor) -> bool:
    tiny = torch.finfo(tensor.dtype).tiny
    return bool(((tensor == 0) | (tensor.abs() >= tiny) | ~torch.isfinite(tensor)).all())


def assert_like_naive(actual, expected, what, rtol=1e-4, floor=0.0):
    """Non-finite in exactly the same places (and the same inf where naive is inf); finite
    entries within ``rtol`` times the largest finite reference magnitude (at least ``floor``:
    a gradient that is 0 but for rounding has no scale of its own)."""
    assert actual.shape == expected.shape, what
    actual, expected = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(expected)
    mismatch = (torch.isfinite(actual) != finite).nonzero()
    assert mismatch.numel() == 0, f"{what}: finite/non-finite differ at {mismatch[:5].tolist()}"
    infinite = torch.isinf(expected)
    assert torch.equal(actual[infinite], expected[infinite]), f"{what}: infinities differ"
    if finite.any():
        scale = expected[finite].abs().max().clamp_min(max(floor, 1e-30))
        error = float((actual[finite] - expected[finite]).abs().max() / scale)
        assert error <= rtol, f"{what}: error {error:.3g} x {float(scale):.3g}"
