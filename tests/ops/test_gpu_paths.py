"""The GPU paths' properties found by reading the kernels, each checked on CPU (Triton interpreter,
emulated launches on meta tensors, monkeypatched device queries). With a GPU the interpreter
tests run compiled on CUDA tensors.

One test (or a few) per property: device guards, softplus tails, tile budgets and the tuning
cache, host syncs, float16 gradients, deterministic mode, which backend ``auto`` picks.
"""
import contextlib

import pytest
import torch

import fastcl
from fastcl.ops.info_nce import naive
from fastcl.ops.siglip import naive as siglip_naive

from .compare import DEVICE, TRITON_MARKS, assert_close

pytestmark = TRITON_MARKS + [pytest.mark.filterwarnings("ignore:underflow encountered")]


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


def test_every_triton_launch_is_guarded_by_the_tensors_device(monkeypatch):
    from fastcl.ops.common import triton_runtime as triton_common

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


def test_device_guard_selects_the_tensors_gpu(monkeypatch):
    """For a CUDA tensor the guard is torch.cuda.device(that tensor's device), whatever the current one."""
    from fastcl.ops.common import triton_runtime as triton_common

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


def test_siglip_loss_keeps_terms_beyond_the_softplus_cutoff():
    """Every |z| = 20: each term is softplus(-20) = 2.06e-9, which log(1 + exp(-|x|)) in fp32 drops."""
    batch = 8
    image = torch.eye(batch, 16).to(DEVICE)
    text = torch.eye(batch, 16).to(DEVICE)
    loss = fastcl.siglip_loss(image, text, 40.0, -20.0, backend="triton")
    expected = siglip_naive.siglip_loss(image.double(), text.double(), 40.0, -20.0)
    assert float(expected) > 0
    assert abs(float(loss) - float(expected)) <= 1e-3 * float(expected), (float(loss), float(expected))


def test_pairwise_infonce_softplus_tail():
    """The same helper serves pairwise InfoNCE: gaps of -20 must still count."""
    from fastcl.ops.common import triton_runtime as triton_common  # noqa: F401  (the interpreter's softplus is the one under test)

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

    from fastcl.ops.common import backends as backend_resolution

    monkeypatch.setattr(backend_resolution, "_backends", fake)
    monkeypatch.setitem(info_nce_module.EXTRA_BACKENDS, "cuda", lambda *args: None)
    monkeypatch.setitem(info_nce_module.EXTRA_BACKENDS, "triton", lambda *args: None)
    monkeypatch.setattr(_native, "_WARNED", set())
    return info_nce_module


def test_auto_prefers_triton_over_the_native_cuda_kernels(monkeypatch):
    module = _pretend_backends(monkeypatch, triton_available=True)
    assert module.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_auto_never_picks_the_native_cuda_kernels_and_says_why(monkeypatch):
    module = _pretend_backends(monkeypatch, triton_available=False)
    with pytest.warns(RuntimeWarning, match="backend='cuda'"):
        chosen = module.resolve_backend("auto", torch.device("cuda"))
    assert chosen == "torch"


def test_backends_reason_says_the_cuda_kernels_are_a_fallback():
    from fastcl import _native

    assert "fallback" in _native.CUDA_INFO_NCE_NOTE and "auto" in _native.CUDA_INFO_NCE_NOTE


# --------------------------------------------------------------------------------------------
# 7. the symmetric loss's column sums are shifted by a bound that cannot overflow


def _column_case(normalize, scale, seed=3):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(20, 24, generator=generator)
    key = -query + 0.1 * torch.randn(20, 24, generator=generator)  # positives point away
    return (query * scale).to(DEVICE), (key * scale).to(DEVICE)


@pytest.mark.parametrize("normalize,scale,temperature,underflows", [
    (True, 1.0, 0.01, False),  # CLIP's largest logit scale, 100: s_jj ~ -100, the diagonal shift overflowed
    (True, 1.0, 0.004, True),  # logit scale 250: some columns' largest score is 150 below the bound
    (False, 30.0, 0.01, True),  # |q| |k| / tau ~ 2e5: the bound is far above every score
], ids=["normalized_overflow", "normalized_tiny_temperature", "unnormalized_large_bound"])
def test_column_sums_never_take_the_host_fallback(monkeypatch, normalize, scale, temperature, underflows):
    """Columns whose diagonal shift would overflow fp32 (s_ij - s_jj > 88): the loss and its
    gradients are right, the forward pass is one fused launch per call, and what is recomputed
    (columns whose bounded shift underflowed) is chosen on the device by a filtered launch that
    selects nothing when the bound is tight."""
    launches = spy_launches(monkeypatch)
    query, key = _column_case(normalize, scale)
    q1, k1 = query.clone().requires_grad_(), key.clone().requires_grad_()
    q0, k0 = query.double().requires_grad_(), key.double().requires_grad_()
    loss = fastcl.info_nce(q1, k1, temperature=temperature, normalize=normalize, symmetric=True, backend="triton")
    expected = naive.info_nce(q0, k0, temperature=temperature, normalize=normalize, symmetric=True)
    forward = [kwargs for name, _, kwargs in launches if name == "info_nce_fwd_kernel_rows"]
    assert [bool(kw.get("HAS_FILTER", False)) for kw in forward] == [False, True], \
        "one fused pass and one device-filtered recompute, never a host-decided second pass"
    filtered = [args for name, args, kwargs in launches if name == "info_nce_fwd_kernel_rows" and kwargs["HAS_FILTER"]]
    row_filter = filtered[0][13]
    assert bool(row_filter.any()) == underflows
    assert torch.isfinite(loss)
    assert_close(loss, expected, 1e-5, "loss")
    loss.backward()
    expected.backward()
    assert_close(q1.grad, q0.grad, 1e-4, "dquery")
    assert_close(k1.grad, k0.grad, 1e-4, "dkey")


# --------------------------------------------------------------------------------------------
# 8. no host synchronization in the GPU hot path


SYNC_METHODS = ("item", "__float__", "__int__", "__bool__", "__index__", "cpu", "tolist", "numpy")


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts the calls that copy a non-CPU tensor's value to the host (a sync on a GPU)."""
    counted = []
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            if self.device.type != "cpu":
                counted.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counted


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


INFO_NCE_HOST_CASES = [
    ("clip", dict(symmetric=True, normalize=True), False),
    ("plain_none", dict(reduction="none"), False),
    ("supcon_symmetric", dict(multi_positive="supcon", symmetric=True), True),
    ("pairwise_margin", dict(multi_positive="pairwise", margin=0.1), True),
    ("smoothing_hard", dict(label_smoothing=0.1, margin=0.05), False),
]


@pytest.mark.parametrize("case", INFO_NCE_HOST_CASES, ids=[c[0] for c in INFO_NCE_HOST_CASES])
def test_info_nce_host_path_never_syncs(monkeypatch, sync_counter, case):
    """The Triton host helpers on meta tensors (a stand-in for CUDA tensors whose values the host
    cannot read) with the launches stubbed: a learnable temperature on the device, every option."""
    from fastcl.ops.info_nce.options import InfoNCEOptions
    from fastcl.ops.info_nce.triton import triton_backward, triton_forward

    launches = spy_launches(monkeypatch, stub=True)
    _, options, with_labels = case
    options = InfoNCEOptions(**options)
    batch, num_keys, dim = 64, 96 if not options.symmetric else 64, 32
    query, key = _meta(batch, dim), _meta(num_keys, dim)
    hard = _meta(batch, 2, dim) if options.label_smoothing else None
    temperature = torch.empty((), device="meta")
    labels = torch.empty(batch, dtype=torch.int64, device="meta") if with_labels else None
    key_labels = torch.empty(num_keys, dtype=torch.int64, device="meta") if with_labels else None
    compute_grads = options.reduction != "none"  # as the custom op calls it
    triton_forward(query, key, hard, temperature, None, labels, key_labels, options, compute_grads)
    grad_output = torch.empty(batch if options.reduction == "none" else (), device="meta")
    triton_backward(query, key, hard, temperature, None, labels, key_labels, options, grad_output)
    assert launches, "the stubbed kernels were never launched"
    assert not sync_counter, f"host syncs in the Triton InfoNCE path: {sync_counter}"


def test_siglip_host_path_never_syncs(monkeypatch, sync_counter):
    from fastcl.ops.siglip.triton import triton_siglip

    launches = spy_launches(monkeypatch, stub=True)
    image, text = _meta(64, 32), _meta(64, 32)
    triton_siglip(image, text, torch.empty((), device="meta"), torch.empty((), device="meta"), True)
    assert launches
    assert not sync_counter, f"host syncs in the Triton SigLIP path: {sync_counter}"


def test_argument_checks_skip_data_checks_on_device_tensors(sync_counter):
    """Value checks (positive in range, exclude_self vs positive, temperature > 0) need the data on
    the host: skipped for device tensors unless validation is on; CPU tensors keep them."""
    from fastcl.ops.info_nce.options import check_info_nce_args

    query, key = _meta(8, 4), _meta(8, 4)
    positive = torch.empty(8, dtype=torch.int64, device="meta")
    temperature = torch.empty((), device="meta")
    check_info_nce_args(query, key, positive, None, temperature, False, False, True, None, None, "mask", None, 0.0,
                        "mean", "auto")
    assert not sync_counter, f"host syncs in the argument checks: {sync_counter}"


def test_validation_mode_runs_the_data_checks(monkeypatch):
    from fastcl import validation

    class OnGpu(torch.Tensor):  # a tensor that reports a GPU device, with values to read
        @property
        def device(self):
            return torch.device("cuda", 0)

    on_gpu = torch.zeros(2).as_subclass(OnGpu)
    monkeypatch.setattr(validation, "_ENABLED", False)
    assert not validation.checks_values(on_gpu)
    assert not validation.checks_values(_meta(2, 2))
    assert validation.checks_values(torch.zeros(2))  # CPU tensors: always checked
    fastcl.set_validation(True)
    try:
        assert validation.checks_values(on_gpu)
        assert not validation.checks_values(_meta(2, 2))  # meta tensors carry no values
    finally:
        fastcl.set_validation(False)
    # CPU tensors keep their checks without validation mode
    with pytest.raises(ValueError, match="positive"):
        fastcl.info_nce(torch.randn(4, 3), torch.randn(4, 3), positive=torch.tensor([0, 1, 2, 9]))


# --------------------------------------------------------------------------------------------
# 6. float16 gradient tiles keep probabilities below float16's 6e-8


def test_float16_gradients_keep_tiny_probabilities():
    """48 queries q_i = u + e_i / 2 and 16 extra keys u + f_j / 2 at a temperature where every
    off-diagonal probability is about 1.5e-8 (below float16's smallest subnormal, 6e-8): each
    extra key's gradient, sum_i p_ij q_i / tau ~ 5e-5, comes only from those probabilities."""
    batch, extra, dim = 48, 16, 72
    query = torch.zeros(batch, dim)
    query[:, 0] = 1.0
    query[torch.arange(batch), 1 + torch.arange(batch)] = 0.5
    extra_keys = torch.zeros(extra, dim)
    extra_keys[:, 0] = 1.0
    extra_keys[torch.arange(extra), 1 + batch + torch.arange(extra)] = 0.5
    key = torch.cat([query, extra_keys])
    temperature = 0.25 / 18.0  # s_ii - s_ij = 18
    q, k = query.to(DEVICE, torch.float16), key.to(DEVICE, torch.float16).requires_grad_()
    loss = fastcl.info_nce(q, k, temperature=temperature, reduction="sum", backend="triton")
    (grad_key,) = torch.autograd.grad(loss, k)
    k64 = key.double().requires_grad_()
    (expected,) = torch.autograd.grad(naive.info_nce(query.double(), k64, temperature=temperature, reduction="sum"), k64)
    tail, expected_tail = grad_key[batch:].double().cpu(), expected[batch:]
    assert float(expected_tail.abs().max()) > 1e-5
    error = float((tail - expected_tail).abs().max() / expected_tail.abs().max())
    assert error < 0.02, f"extra keys' gradients off by {error:.3g} of their size (flushed to zero: 1.0)"


# --------------------------------------------------------------------------------------------
# 10. deterministic mode: bit-reproducible backward, no float atomics


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _atomic_kernels(launches):
    import inspect

    found = set()
    for name, _, kwargs in launches:
        if name == "info_nce_fwd_kernel_rows" and kwargs.get("FUSED_COLUMNS"):
            found.add(name + "[FUSED_COLUMNS]")  # the only atomics of the InfoNCE kernels
    return found


def test_kernel_sources_atomics_are_where_documented():
    """The only float atomics of the Triton InfoNCE / SigLIP kernels are the fused column sums;
    the patch kernels' atomics are in the (non-deterministic) backward kernel only."""
    import inspect

    import fastcl.ops.patches.triton as patch_kernels

    info_nce, siglip, _ = _kernel_modules()
    for module in (info_nce, siglip):
        source = inspect.getsource(module)
        assert source.count("tl.atomic_add(") == (3 if module is info_nce else 0)
        assert "if FUSED_COLUMNS" in source.split("def info_nce_fwd_kernel_rows")[1] if module is info_nce else True
    assert "atomic" not in inspect.getsource(patch_kernels.gather_patches_fwd_kernel.fn)


def test_deterministic_clip_uses_no_atomics_and_repeats_bit_for_bit(monkeypatch, deterministic):
    launches = spy_launches(monkeypatch)
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(37, 40, generator=generator).to(DEVICE)
    key = torch.randn(37, 40, generator=generator).to(DEVICE)
    runs = []
    for _ in range(2):
        q, k = query.clone().requires_grad_(), key.clone().requires_grad_()
        temperature = torch.tensor(0.1, device=DEVICE, requires_grad=True)
        loss = fastcl.info_nce(q, k, temperature=temperature, symmetric=True, normalize=True, backend="triton")
        runs.append([loss.detach(), *torch.autograd.grad(loss, [q, k, temperature])])
    assert not _atomic_kernels(launches), "deterministic mode launched the fused (atomic) column pass"
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    q0, k0 = query.double().requires_grad_(), key.double().requires_grad_()
    expected = naive.info_nce(q0, k0, temperature=0.1, symmetric=True, normalize=True)
    assert_close(runs[0][0], expected, 1e-5, "loss")
    expected_grads = torch.autograd.grad(expected, [q0, k0])
    assert_close(runs[0][1], expected_grads[0], 1e-4, "dquery")
    assert_close(runs[0][2], expected_grads[1], 1e-4, "dkey")


def _patch_case(dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 45, 38, generator=generator).to(DEVICE, dtype)
    index = torch.tensor([[0, 1, 5, 6, 7], [3, 2, 4, 8, 0]]).to(DEVICE)  # neighbours share source pixels
    return images, index


@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=["triton_backend", "native_backend"])
def test_deterministic_patch_gather_backward(monkeypatch, deterministic, backend):
    """The patch gradient under deterministic mode: no atomic scatter kernel (Triton's
    gather_patches_bwd_kernel, the native CUDA one), the same bits twice, and the naive gradient."""
    import fastcl.ops.patches.op as patch_op
    from fastcl.ops.patches import naive as patches_naive

    images, index = _patch_case()
    used = []
    monkeypatch.setattr(patch_op, "_kernels", lambda name, _real=patch_op._kernels: used.append(name) or _real(name))
    if backend == "cuda" and not fastcl.backends()["cuda"].available:
        from fastcl.ops.patches import triton as patch_triton
        # no CUDA build here: the forward of the 'cuda' backend is the Triton one, so the
        # backward's dispatch is what is tested
        monkeypatch.setattr(patch_op, "_kernels", lambda name: used.append(name) or (patch_triton.triton_forward, None))
    atomic = []
    import fastcl.ops.patches.triton as patch_triton_module

    real_bwd = patch_triton_module.gather_patches_bwd_kernel
    monkeypatch.setattr(patch_triton_module, "gather_patches_bwd_kernel",
                        _LaunchSpy("gather_patches_bwd_kernel", real_bwd, atomic))
    grads = []
    for _ in range(2):
        leaf = images.clone().requires_grad_()
        from fastcl.ops.patches.sampling import axis_taps

        size = (56, 42)
        row_taps = axis_taps(45, size[0], torch.float32, images.device)
        col_taps = axis_taps(38, size[1], torch.float32, images.device)
        patches = patch_op.gather_patches_forward(leaf, index, *row_taps, *col_taps, 14, 3, backend)
        weight = torch.linspace(-1, 1, patches.numel(), device=DEVICE).view_as(patches)
        (grad,) = torch.autograd.grad((patches * weight).sum(), leaf)
        grads.append(grad)
    assert not atomic, "the atomic scatter kernel ran in deterministic mode"
    assert torch.equal(grads[0], grads[1])
    leaf = images.double().requires_grad_()
    expected = patches_naive.gather_patches(leaf, index, 14, (56, 42))[0]
    (expected_grad,) = torch.autograd.grad((expected * weight.double()).sum(), leaf)
    assert_close(grads[0], expected_grad, 1e-5, "d(images)")


def test_cuda_infonce_backend_refuses_deterministic_mode(deterministic):
    from fastcl.ops.info_nce.native_cuda import check_cuda_options
    from fastcl.ops.info_nce.options import InfoNCEOptions

    with pytest.raises(ValueError, match="deterministic"):
        check_cuda_options(torch.empty(2, 2, device="meta"), InfoNCEOptions(), None)


# --------------------------------------------------------------------------------------------
# 3. a pinned tile configuration is validated per kernel against the on-chip budget


@pytest.fixture
def compiled_mode(monkeypatch):
    """Tile selection as on a GPU (not the interpreter's fixed tile)."""
    from fastcl.ops.common import triton_runtime as triton_common

    monkeypatch.setattr(triton_common, "interpreting", lambda: False)
    return triton_common


def test_one_pinned_configuration_fits_every_kernel(monkeypatch, compiled_mode):
    """FASTCL_TRITON_CONFIG=128,128,64,8,3 at D = 512: the forward keeps it, each backward kernel
    gets the widest ACC_D within the register and shared-memory budget (never 128 x 512 fp32)."""
    common = compiled_mode
    monkeypatch.setenv(common.CONFIG_ENV, "128,128,64,8,3")
    (forward,) = common.tile_candidates("forward", 512, torch.bfloat16, 90)
    assert forward.kwargs == {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64}
    for kind in ("rows", "columns"):
        (config,) = common.tile_candidates(kind, 512, torch.bfloat16, 90)
        values, shared = common.tile_budget(kind, config.kwargs, config.num_warps, config.num_stages, 2)
        assert values <= common.REGISTER_VALUES_LIMIT and shared <= common.SHARED_MEMORY_LIMIT[90]
        assert config.kwargs["ACC_D"] < 512 and config.kwargs["BLOCK_M"] == 128


def test_per_kernel_pins_are_checked_with_a_clear_error(monkeypatch, compiled_mode):
    common = compiled_mode
    monkeypatch.setenv(common.CONFIG_ENV, "forward=64,64,32,4,2;rows=128,64,64,512,8,2")
    assert common.tile_candidates("forward", 512, torch.bfloat16, 90)[0].num_warps == 4
    with pytest.raises(ValueError, match=r"FASTCL_TRITON_CONFIG.*rows kernel.*per thread"):
        common.tile_candidates("rows", 512, torch.bfloat16, 90)
    assert len(common.tile_candidates("columns", 512, torch.bfloat16, 90)) > 1  # not pinned: autotuned
    monkeypatch.setenv(common.CONFIG_ENV, "rows=64,64,64,128,8,2")
    common.tile_candidates("rows", 512, torch.float32, 90)  # fits sm_90's 227 KB
    with pytest.raises(ValueError, match=r"shared memory.*sm_86"):
        common.tile_candidates("rows", 512, torch.float32, 86)
    for bad in ("64,32", "rows=64,64,64,8,2", "middle=64,64,64,8,2", "64,48,16,4,2"):
        monkeypatch.setenv(common.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=common.CONFIG_ENV):
            common.tile_candidates("rows", 64, torch.float32, 90)


def test_shipped_lists_fit_their_budget(compiled_mode):
    common = compiled_mode
    for kind, listing in (("forward", common.FORWARD_CONFIGS), ("rows", common.BACKWARD_ROWS_CONFIGS),
                          ("columns", common.BACKWARD_COLUMNS_CONFIGS)):
        assert len(common.tile_candidates(kind, 512, torch.bfloat16, 90)) == len(listing)


# --------------------------------------------------------------------------------------------
# 4. tuning: keyed on every constexpr, on a capped size, cached across processes, rank 0 decides


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """The GPU's tuning path on CPU: timings replaced by a stand-in that prefers the smallest
    ACC_D (then the smallest BLOCK_M), every timed launch recorded with its size arguments."""
    from fastcl.ops.common import triton_runtime as common

    monkeypatch.setattr(common, "_tuning_enabled", lambda device: True)
    monkeypatch.setattr(common, "interpreting", lambda: False)
    monkeypatch.delenv(common.CONFIG_ENV, raising=False)
    monkeypatch.setenv(common.TUNE_CACHE_ENV, str(tmp_path / "tiles.json"))
    monkeypatch.setenv(common.TUNE_ROWS_ENV, "16")
    timed = []

    def fake_benchmark(launch):
        config = launch.__defaults__[0]
        timed.append(config)
        launch()  # recorded (with its capped sizes), not executed
        return float(config.kwargs.get("ACC_D", 0) * 1000 + config.kwargs["BLOCK_M"])

    monkeypatch.setattr(common, "_benchmark", fake_benchmark)
    # the interpreter runs the chosen tile; the candidates carry GPU tiles, so launches are
    # made with the interpreter's tile instead while the choice itself is recorded
    real_run = common.TileKernel._run
    launched = []

    def small_run(self, grid, args, constexprs, config, resolved_grid=None):
        launched.append((self.fn.__name__, config, dict(zip(self.fn.arg_names, args))))
        if resolved_grid is not None:  # a timed launch: not executed on CPU
            return None
        small = common.triton.Config({k: min(v, 32) for k, v in config.kwargs.items()}, num_warps=4, num_stages=1)
        return real_run(self, grid, args, constexprs, small)

    monkeypatch.setattr(common.TileKernel, "_run", small_run)
    for kernel in _tile_kernels():
        monkeypatch.setattr(kernel, "chosen", {})
    return common, timed, launched


def _tile_kernels():
    from fastcl.ops.common import triton_runtime as common

    return [value for module in _kernel_modules()[:2] for value in vars(module).values()
            if isinstance(value, common.TileKernel)]


def test_key_holds_every_constexpr(tuning):
    """Two calls differing only in NORMALIZE (not in the old key) are tuned separately."""
    common, timed, _ = tuning
    query, key = torch.randn(20, 40).to(DEVICE), torch.randn(20, 40).to(DEVICE)
    with torch.no_grad():
        fastcl.info_nce(query, key, backend="triton")
        first = len(timed)
        fastcl.info_nce(query, key, backend="triton")
        assert len(timed) == first, "the same call tuned twice"
        fastcl.info_nce(query, key, normalize=True, backend="triton")
    assert len(timed) > first, "a configuration tuned without NORMALIZE served NORMALIZE=True"
    import inspect

    kernel = _kernel_modules()[0].info_nce_fwd_kernel_rows
    constexprs = [name for name, parameter in inspect.signature(kernel.fn.fn).parameters.items()
                  if "constexpr" in str(parameter.annotation) and not name.startswith(("BLOCK", "ACC_D"))]
    flags = {name: index for index, name in enumerate(constexprs)}
    text = kernel.key({"dim": 40}, flags, torch.device("cpu"), torch.float32)
    assert all(f"{name}={index}" in text for name, index in flags.items())


def test_tuning_runs_on_a_capped_size(tuning):
    common, timed, launched = tuning
    query, key = torch.randn(40, 24).to(DEVICE), torch.randn(50, 24).to(DEVICE)
    with torch.no_grad():
        fastcl.info_nce(query, key, backend="triton")
    timed_launches = [named for name, config, named in launched if name == "info_nce_fwd_kernel_rows"][:-1]
    assert timed_launches and all(n["num_rows"] <= 16 and n["num_candidates"] <= 16 for n in timed_launches)
    real = [named for name, config, named in launched if name == "info_nce_fwd_kernel_rows"][-1]
    assert (real["num_rows"], real["num_candidates"]) == (40, 50)


def test_choice_is_cached_across_processes(tuning, monkeypatch):
    common, timed, _ = tuning
    query, key = torch.randn(20, 40).to(DEVICE), torch.randn(20, 40).to(DEVICE)
    with torch.no_grad():
        fastcl.info_nce(query, key, symmetric=True, backend="triton")
    assert timed
    entries = common._read_cache(common.tune_cache_path())
    name = common._device_name(torch.device(DEVICE))
    assert entries and all("triton " + common.triton.__version__ in k and k.startswith(name + "|") for k in entries)
    # a new process: empty memory, the file holds the choice, nothing is timed
    for kernel in _tile_kernels():
        monkeypatch.setattr(kernel, "chosen", {})
    timed.clear()
    with torch.no_grad():
        fastcl.info_nce(query, key, symmetric=True, backend="triton")
    assert not timed


def test_rank_zero_decides_for_every_rank(tuning, monkeypatch):
    common, timed, launched = tuning
    rank_zero_choice = [{"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}, 8, 3]  # not the stand-in's favourite
    monkeypatch.setattr(common, "_distributed_world", lambda: (1, 2))
    broadcasts = []

    def broadcast_object_list(box, src):
        assert src == 0 and box == [None]  # rank 1 neither reads the file nor tunes
        broadcasts.append(1)
        box[0] = rank_zero_choice if not broadcasts[1:] else box[0]

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list, raising=False)
    # rank 0 would have filled every key: every kernel asks once
    original = common.tile_candidates
    monkeypatch.setattr(common, "tile_candidates", lambda kind, *a: original("forward", *a) if kind == "forward"
                        else original(kind, *a))
    query, key = torch.randn(20, 40).to(DEVICE), torch.randn(20, 40).to(DEVICE)
    with torch.no_grad():
        fastcl.info_nce(query, key, backend="triton")
    assert broadcasts and not timed
    forward = [config for name, config, _ in launched if name == "info_nce_fwd_kernel_rows"]
    assert forward[-1].kwargs == rank_zero_choice[0] and forward[-1].num_stages == 3


# --------------------------------------------------------------------------------------------
# 5. latent attention: scores and their gradients in fp32 out of bf16 products


def test_latent_attention_keeps_scores_and_their_gradients_in_fp32(monkeypatch):
    """The CUDA bf16 path emulated on CPU (bf16 operands for the products): what the softmax
    kernels read and write (S, P, dP, dS) is fp32, and the result still matches the reference."""
    from fastcl.ops.latent_attention import LatentAttentionFunction, chunked
    from fastcl.ops.latent_attention import naive as latent_naive

    monkeypatch.setattr(chunked, "compute_dtype", lambda h: h.dtype if h.dtype == torch.bfloat16 else torch.float32)
    seen = []

    class Recording(chunked.ElementwiseKernels):
        def softmax_forward(self, scores):
            seen.append(("S", scores.dtype))
            return super().softmax_forward(scores)

        def softmax_recompute(self, scores, lse):
            seen.append(("P", scores.dtype))
            return super().softmax_recompute(scores, lse)

        def softmax_backward(self, probs, grad):
            seen.append(("dP", grad.dtype))
            return super().softmax_backward(probs, grad)

    pool = fastcl.LatentAttentionPooling(32, num_latents=16, num_heads=2, head_dim=8).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 32, generator=generator).to(torch.bfloat16).requires_grad_()
    mask = torch.ones(2, 7)
    params = pool.flat_parameters()
    out = LatentAttentionFunction.apply(hidden, mask, 2, 1e-5, Recording(), *params)
    (grad,) = torch.autograd.grad(out.float().sum(), hidden)
    assert seen and all(dtype == torch.float32 for _, dtype in seen), seen
    hidden64 = hidden.detach().double().requires_grad_()
    expected = latent_naive.latent_attention_pool(hidden64, mask.double(), *[p.double() for p in params], num_heads=2,
                                                  normalize=False)
    (expected_grad,) = torch.autograd.grad(expected.sum(), hidden64)
    assert_close(out, expected, 3e-2, "pooled")
    assert_close(grad, expected_grad, 5e-2, "d(hidden)")


def test_siglip_float16_gradients_keep_tiny_pair_gradients():
    """x_i = y_i = u + e_i / 2 with t = 144, b = -162: every pair's gradient is +-sigmoid(-18) =
    1.5e-8 (below float16's 6e-8); the shared direction u of d(text) sums them to ~2e-6."""
    batch, dim = 64, 72
    features = torch.zeros(batch, dim)
    features[:, 0] = 1.0
    features[torch.arange(batch), 1 + torch.arange(batch)] = 0.5
    image = features.to(DEVICE, torch.float16)
    text = features.to(DEVICE, torch.float16).requires_grad_()
    loss = fastcl.siglip_loss(image, text, 144.0, -162.0, backend="triton")
    (grad_text,) = torch.autograd.grad(loss, text)
    text64 = features.double().requires_grad_()
    (expected,) = torch.autograd.grad(siglip_naive.siglip_loss(features.double(), text64, 144.0, -162.0), text64)
    shared, expected_shared = grad_text[:, 0].double().cpu(), expected[:, 0]
    assert float(expected_shared.abs().min()) > 1e-6
    error = float((shared - expected_shared).abs().max() / expected_shared.abs().max())
    assert error < 0.1, f"d(text) along u off by {error:.3g} of its size (flushed to zero: 1.0)"
