"""Issue 15: the GPU-path defects found by reading, each checked on CPU (Triton interpreter,
emulated launches on meta tensors, monkeypatched device queries). With a GPU the interpreter
tests run compiled on CUDA tensors.

One test (or a few) per defect, named ``test_d<N>_...`` after the issue's numbering.
"""
import contextlib
import importlib.util
import os

import pytest
import torch

import fastcl
from fastcl.ops.info_nce import naive

from .compare import assert_close

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp"),
    pytest.mark.filterwarnings("ignore:underflow encountered"),
]

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="module", autouse=True)
def triton_mode():
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it before triton is imported)")
    yield


def _kernel_modules():
    import fastcl.ops.info_nce.triton as info_nce_kernels
    import fastcl.ops.latent_attention.triton as latent_kernels
    import fastcl.ops.siglip.triton as siglip_kernels

    return [info_nce_kernels, siglip_kernels, latent_kernels]


def _kernel_names(module):
    """Names of the module's kernels (jitted, autotuned or interpreted), not its helpers."""
    import inspect

    names = []
    for name, value in vars(module).items():
        fn = value
        while not inspect.isfunction(fn) and hasattr(fn, "fn"):
            fn = fn.fn
        if fn is not value and inspect.isfunction(fn) and fn.__module__ == module.__name__ and "kernel" in name:
            names.append(name)
    return names


class _LaunchSpy:
    """Stands in for a kernel object: records each launch (grid, keyword arguments), then
    launches the real kernel unless ``stub``."""

    def __init__(self, name, real, log, stub=False):
        self.name, self.real, self.log, self.stub = name, real, log, stub

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, args, kwargs))
            if not self.stub:
                return self.real[grid](*args, **kwargs)

        return launch

    def __getattr__(self, attribute):
        return getattr(self.real, attribute)


def _spies(monkeypatch, stub=False, log=None):
    log = [] if log is None else log
    spies = []
    for module in _kernel_modules():
        for name in _kernel_names(module):
            spy = _LaunchSpy(name, getattr(module, name), log, stub)
            monkeypatch.setattr(module, name, spy)
            spies.append(spy)
    return spies


def spy_launches(monkeypatch, stub=False):
    """Every kernel launch of the Triton modules, in order: [(kernel name, args, kwargs)]."""
    log = []
    _spies(monkeypatch, stub, log)
    return log


# --------------------------------------------------------------------------------------------
# 1. every Triton launch runs under a guard for the tensors' device


def test_d1_every_triton_launch_is_guarded_by_the_tensors_device(monkeypatch):
    from fastcl.ops import triton_common

    state = {"depth": 0, "devices": []}

    @contextlib.contextmanager
    def recording_guard(device):
        state["depth"] += 1
        state["devices"].append(torch.device(device))
        try:
            yield
        finally:
            state["depth"] -= 1

    monkeypatch.setattr(triton_common, "device_guard", recording_guard, raising=False)
    unguarded = []

    class GuardCheckingLog(list):
        def append(self, item):
            if state["depth"] == 0:
                unguarded.append(item[0])
            super().append(item)

    checking = GuardCheckingLog()
    for spy in _spies(monkeypatch):
        spy.log = checking

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(9, 16, generator=generator).to(DEVICE).requires_grad_()
    k = torch.randn(9, 16, generator=generator).to(DEVICE).requires_grad_()
    fastcl.info_nce(q, k, symmetric=True, normalize=True, backend="triton").backward()
    fastcl.siglip_loss(q, k, 5.0, -2.0, backend="triton").backward()
    from fastcl.ops.latent_attention.triton import TritonKernels

    kernels = TritonKernels()
    scores = torch.randn(6, 8).to(DEVICE)
    lse = kernels.softmax_forward(scores)
    kernels.softmax_recompute(scores, lse)
    kernels.softmax_backward(scores, torch.randn(6, 8).to(DEVICE))
    u = torch.randn(4, 10).to(DEVICE)
    kernels.geglu_backward(u, kernels.geglu_forward(u))
    assert len(checking) >= 10
    assert not unguarded, f"launched outside a device guard: {sorted(set(unguarded))}"
    assert set(state["devices"]) == {torch.device(DEVICE) if DEVICE == "cpu" else q.device}


def test_d1_device_guard_selects_the_tensors_gpu(monkeypatch):
    """For a CUDA tensor the guard is torch.cuda.device(that tensor's device), whatever the current one."""
    from fastcl.ops import triton_common

    entered = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with triton_common.device_guard(torch.device("cuda", 1)):
        pass
    with triton_common.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


# --------------------------------------------------------------------------------------------
# 2. SigLIP's loss keeps the softplus tail


def test_d2_siglip_loss_keeps_terms_beyond_the_softplus_cutoff():
    """Every |z| = 20: each term is softplus(-20) = 2.06e-9, which log(1 + exp(-|x|)) in fp32 drops."""
    batch = 8
    image = torch.eye(batch, 16).to(DEVICE)
    text = torch.eye(batch, 16).to(DEVICE)
    loss = fastcl.siglip_loss(image, text, 40.0, -20.0, backend="triton")
    expected = naive.siglip_loss(image.double(), text.double(), 40.0, -20.0)
    assert float(expected) > 0
    assert abs(float(loss) - float(expected)) <= 1e-3 * float(expected), (float(loss), float(expected))


def test_d2_pairwise_infonce_softplus_tail():
    """The same helper serves pairwise InfoNCE: gaps of -20 must still count."""
    from fastcl.ops import triton_common  # noqa: F401  (the interpreter's softplus is the one under test)

    batch = 6
    query = torch.eye(batch, 8).to(DEVICE)
    key = torch.eye(batch, 8).to(DEVICE)
    labels = torch.arange(batch).to(DEVICE)
    options = dict(labels=labels, key_labels=labels, multi_positive="pairwise", temperature=0.05)
    loss = fastcl.info_nce(query, key, backend="triton", **options)
    expected = naive.info_nce(query.double(), key.double(), **options)
    assert float(expected) > 0
    assert abs(float(loss) - float(expected)) <= 1e-3 * float(expected), (float(loss), float(expected))


# --------------------------------------------------------------------------------------------
# 9. auto never picks the native CUDA InfoNCE kernels, and says so when they are all there is


def _pretend_backends(monkeypatch, triton_available):
    from fastcl import _native
    import fastcl.ops.info_nce as info_nce_module

    real = _native.backends()

    def fake():
        found = dict(real)
        found["triton"] = _native.Backend("triton", triton_available, "pretend")
        found["cuda"] = _native.Backend("cuda", True, "pretend")
        return found

    monkeypatch.setattr(info_nce_module, "_backends", fake)
    monkeypatch.setitem(info_nce_module.EXTRA_BACKENDS, "cuda", lambda *args: None)
    monkeypatch.setitem(info_nce_module.EXTRA_BACKENDS, "triton", lambda *args: None)
    monkeypatch.setattr(_native, "_WARNED", set())
    return info_nce_module


def test_d9_auto_prefers_triton_over_the_native_cuda_kernels(monkeypatch):
    module = _pretend_backends(monkeypatch, triton_available=True)
    assert module.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_d9_auto_never_picks_the_native_cuda_kernels_and_says_why(monkeypatch):
    module = _pretend_backends(monkeypatch, triton_available=False)
    with pytest.warns(RuntimeWarning, match="backend='cuda'"):
        chosen = module.resolve_backend("auto", torch.device("cuda"))
    assert chosen == "torch"


def test_d9_backends_reason_says_the_cuda_kernels_are_a_fallback():
    from fastcl import _native

    assert "fallback" in _native.CUDA_INFO_NCE_NOTE and "auto" in _native.CUDA_INFO_NCE_NOTE
