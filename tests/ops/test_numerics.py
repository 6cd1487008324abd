"""The numerics contract of the CPU paths, against the naive references.

* exp of any argument <= 0 is accurate or exactly 0: no subnormal reaches a gradient product;
* huge gaps (temperature 1e-9, logits 1e30, gates 3e4) are exact;
* NaN and +-Inf reach the loss and every gradient exactly where the naive reference's are.
"""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl._native import backends, typed_kernel
from fastcl.ops.info_nce import naive
from fastcl.ops.siglip import naive as siglip_naive
from fastcl.ops.info_nce.chunked import Direction, torch_row_kernel
from fastcl.ops.info_nce.options import InfoNCEOptions

CPU_BACKENDS = ["torch", "cpu", "auto"]
native = pytest.mark.skipif(not backends()["cpu"].available, reason="native CPU kernels not built")


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


def run_info_nce(backend, query, key, hard_negatives=None, temperature=0.07, **options):
    """(loss, dq, dk[, dh][, dtemperature]) with a grad_output that is not 1."""
    leaves = [query.clone().requires_grad_(), key.clone().requires_grad_()]
    if hard_negatives is not None:
        leaves.append(hard_negatives.clone().requires_grad_())
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.clone().requires_grad_()
        leaves.append(temperature)
    fn = naive.info_nce if backend == "naive" else fastcl.info_nce
    extra = {} if backend == "naive" else {"backend": backend}
    loss = fn(leaves[0], leaves[1], hard_negatives=leaves[2] if hard_negatives is not None else None,
              temperature=temperature, **options, **extra)
    grad_output = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype)
    grads = torch.autograd.grad(loss, leaves, grad_output)
    return (loss, *grads)


def compare_info_nce(backend, *args, rtol=1e-4, **kwargs):
    expected = run_info_nce("naive", *args, **kwargs)
    actual = run_info_nce(backend, *args, **kwargs)
    for name, a, e in zip(("loss", "dq", "dk", "d3", "d4"), actual, expected):
        assert_like_naive(a, e, f"{backend} {name}", rtol)


# ---------------------------------------------------------------- 1. no subnormal, ever

def _direction(q, k):
    batch = q.shape[0]
    return Direction(q, k, None, torch.arange(batch), None, None, None, float(batch), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", ["torch", pytest.param("cpu", marks=native)])
def test_gradient_block_has_no_subnormal(kernel, dtype):
    # unnormalized randn at tau = 0.05: most probabilities underflow
    q, k = torch.randn(64, 256, dtype=dtype), torch.randn(96, 256, dtype=dtype)
    block = q @ k.T
    weights = torch.full((64,), 1 / 64, dtype=dtype)
    if kernel == "cpu":
        from fastcl.ops.info_nce.native import native_row_kernel as row_kernel
    else:
        row_kernel = torch_row_kernel
    row_kernel(block, None, 0, _direction(q, k), InfoNCEOptions(), 1 / 0.05, weights)
    assert no_subnormal(block)
    assert (block == 0).float().mean() > 0.5  # the underflowed ones are exactly 0


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_and_siglip_gradient_blocks_have_no_subnormal(dtype):
    from fastcl.ops.siglip.native import native_siglip_rows

    q, k = torch.randn(48, 128, dtype=dtype), torch.randn(48, 128, dtype=dtype)
    block = q @ k.T
    native_siglip_rows(block, 0, 10.0, -10.0, 1 / 48, True)
    assert no_subnormal(block)
    # two-pass symmetric: pass 2 of one block
    statistics = typed_kernel("info_nce_symmetric_statistics", dtype)
    gradient = typed_kernel("info_nce_symmetric_gradient", dtype)
    block = q @ k.T
    row_max, row_sum, diagonal = (torch.empty(48, dtype=dtype) for _ in range(3))
    column_max, column_sum = torch.full((48,), float("-inf"), dtype=dtype), torch.zeros(48, dtype=dtype)
    statistics(similarity=block.data_ptr(), ld=48, rows=48, cols=48, row0=0, tracked=48, inv_temperature=20.0,
               row_max_out=row_max.data_ptr(), row_sum_out=row_sum.data_ptr(), diagonal_out=diagonal.data_ptr(),
               column_max=column_max.data_ptr(), column_sum=column_sum.data_ptr(), num_threads=1)
    factor = torch.full((48,), 20.0 / 96, dtype=dtype)
    row_factor, column_factor, positive = factor / row_sum, factor / column_sum, 2 * factor  # kept alive
    dtemp = torch.zeros(48, dtype=dtype)
    gradient(similarity=block.data_ptr(), ld=48, rows=48, cols=48, row0=0, tracked=48, inv_temperature=20.0,
             row_max=row_max.data_ptr(), row_factor=row_factor.data_ptr(), column_max=column_max.data_ptr(),
             column_factor=column_factor.data_ptr(), positive=positive.data_ptr(),
             dtemp_out=dtemp.data_ptr(), num_threads=1)
    assert no_subnormal(block)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_unnormalized_small_temperature_matches_naive(backend, symmetric, small_blocks):
    # DPR-style raw dot products at tau = 0.05 and 0.07 (the subnormal-slowdown inputs)
    q, k = torch.randn(40, 256), torch.randn(40, 256)
    for tau in (0.05, 0.07, 1.0):
        compare_info_nce(backend, q, k, temperature=tau, symmetric=symmetric, rtol=2e-4)


# ---------------------------------------------------------------- 2. huge gaps are exact

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_temperature_1e_9(backend):
    q, k = torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [-1.0]])
    loss = fastcl.info_nce(q, k, temperature=1e-9, reduction="none", backend=backend)
    assert torch.equal(loss, naive.info_nce(q, k, temperature=1e-9, reduction="none"))
    assert loss.tolist() == [0.0, 2e9]
    compare_info_nce(backend, q, k, temperature=1e-9, reduction="none")
    # ties at 1e9 (column 1): log 2 is below float32's resolution there, where naive's
    # exp(s - lse) rounds; the fused paths are exact, so compare with naive in float64
    compare_info_nce(backend, q.double(), k.double(), temperature=torch.tensor(1e-9, dtype=torch.float64),
                     symmetric=True, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_large_logit_gaps(backend, symmetric):
    # randn * 300 at tau = 0.01: gaps of ~1e8 (the gradients were 70-100 % off)
    q, k = torch.randn(96, 64) * 300, torch.randn(96, 64) * 300
    compare_info_nce(backend, q, k, temperature=0.01, symmetric=symmetric)
    compare_info_nce(backend, q, k, temperature=torch.tensor(0.01), symmetric=symmetric,
                     hard_negatives=None if symmetric else torch.randn(96, 3, 64) * 300)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", [
    dict(labels=True, multi_positive="mask", false_negative_margin=0.1, label_smoothing=0.1),
    dict(labels=True, multi_positive="supcon"),
    dict(labels=True, multi_positive="pairwise"),
    dict(exclude_self=True, positive="shift"),
])
def test_large_logit_gaps_every_mode(backend, options):
    q, k = torch.randn(24, 16) * 300, torch.randn(24, 16) * 300
    options = dict(options)
    if options.pop("labels", False):
        options["labels"] = torch.arange(24) % 5
        options["key_labels"] = torch.arange(24) % 5
    if options.get("positive") == "shift":
        options["positive"] = (torch.arange(24) + 1) % 24
    compare_info_nce(backend, q, k, temperature=0.01, **options)


def run_siglip(backend, x, y, scale, bias):
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(scale, dtype=torch.float64,
              requires_grad=True), torch.tensor(bias, dtype=torch.float64, requires_grad=True)]
    if backend == "naive":
        loss = siglip_naive.siglip_loss(*leaves)
    else:
        loss = fastcl.siglip_loss(*leaves, backend=backend)
    return (loss, *torch.autograd.grad(loss * 0.7, leaves))


def compare_siglip(backend, x, y, scale, bias, rtol=1e-4):
    expected = run_siglip("naive", x, y, scale, bias)
    actual = run_siglip(backend, x, y, scale, bias)
    for name, a, e in zip(("loss", "dimage", "dtext", "dscale", "dbias"), actual, expected):
        assert_like_naive(a, e.to(a.dtype), f"siglip {backend} {name}", rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_siglip_huge_scale(backend):
    x, y = F.normalize(torch.randn(32, 16), dim=-1), F.normalize(torch.randn(32, 16), dim=-1)
    for scale, bias in ((1e30, 0.0), (1e4, -10.0), (10.0, -1e6)):
        compare_siglip(backend, x.double(), y.double(), scale, bias, rtol=1e-9)
        compare_siglip(backend, x, y, scale, bias)


@native
def test_latent_attention_gelu_at_huge_gates():
    from fastcl.ops.latent_attention.native import NativeKernels

    kernels = NativeKernels()
    gate = torch.tensor([-3e4, -1e3, -40.0, -9.0, -5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 9.0, 40.0, 1e3, 3e4])
    value = torch.linspace(-2, 2, gate.numel())
    u = torch.cat([value, gate])[None].contiguous()
    expected_gated = value * F.gelu(gate)
    # the erf approximation is accurate to 1.5e-7 absolute (latent_attention.cpp), not relative
    torch.testing.assert_close(kernels.geglu_forward(u)[0], expected_gated, rtol=2e-6, atol=5e-7)
    leaf_value, leaf_gate = value.clone().requires_grad_(), gate.clone().requires_grad_()
    grad_gated = torch.linspace(0.5, 1.5, gate.numel())
    (leaf_value * F.gelu(leaf_gate)).backward(grad_gated)
    grad_u = kernels.geglu_backward(u, grad_gated[None].contiguous())[0]
    torch.testing.assert_close(grad_u[: gate.numel()], leaf_value.grad, rtol=2e-6, atol=5e-7)
    torch.testing.assert_close(grad_u[gate.numel():], leaf_gate.grad, rtol=2e-6, atol=1e-6)
    # softmax rows with gaps of 1e30: the others are exactly 0
    scores = torch.tensor([[0.0, -1e30, -1e10, -50.0, -1.0]])
    lse = kernels.softmax_forward(scores)
    # exp(-50) = 2e-22 is under the flush threshold (2^-64 of the row's largest): exactly 0
    torch.testing.assert_close(scores, torch.softmax(torch.tensor([[0.0, -1e30, -1e10, -50.0, -1.0]]), 1),
                               rtol=1e-6, atol=1e-19)
    assert scores[0, 3] == 0
    assert torch.isfinite(lse).all() and no_subnormal(scores)


# ---------------------------------------------------------------- 3. NaN and Inf where naive has them

def _poison(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


POISONS = [("nan_query", 0, (2, 1), float("nan")), ("neg_inf_key", 1, (3, 0), float("-inf")),
           ("pos_inf_query", 0, (5, 2), float("inf")), ("overflow", 0, (1,), 1e20)]
INFO_NCE_OPTIONS = [
    dict(), dict(symmetric=True), dict(normalize=True), dict(hard_negatives=True),
    dict(labels=True), dict(labels=True, multi_positive="supcon"), dict(labels=True, multi_positive="pairwise"),
    dict(false_negative_margin=0.2, label_smoothing=0.1), dict(reduction="none"),
    dict(temperature=torch.tensor(0.1)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("poison", POISONS, ids=[p[0] for p in POISONS])
@pytest.mark.parametrize("options", INFO_NCE_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_nonfinite_inputs_propagate_like_naive(backend, poison, options, small_blocks):
    _, which, index, value = poison
    inputs = [torch.randn(12, 8), torch.randn(12, 8)]
    if which == 0 and value == 1e20:
        inputs[0][1] = 1e20
        inputs[1][1] = 1e20  # q.k overflows to inf in float32
    else:
        inputs[which] = _poison(inputs[which], index, value)
    options = dict(options)
    options.setdefault("temperature", 0.1)
    if options.pop("hard_negatives", False):
        options["hard_negatives"] = _poison(torch.randn(12, 2, 8), (4, 1, 3), value)
    if options.pop("labels", False):
        options["labels"] = torch.arange(12) % 4
        options["key_labels"] = torch.arange(12) % 4
    compare_info_nce(backend, *inputs, **options)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_gradients_trip_gradient_checks(backend):
    # the user-visible symptom: clip_grad_norm_(error_if_nonfinite=True) must raise
    q = torch.randn(8, 4)
    q[2, 1] = float("nan")
    q.requires_grad_()
    fastcl.info_nce(q, torch.randn(8, 4), temperature=0.1, backend=backend).backward()
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_([q], 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["nan", "inf", "neg_inf", "overflow"])
def test_siglip_nonfinite_like_naive(backend, case):
    x, y = torch.randn(10, 6), torch.randn(10, 6)
    if case == "overflow":  # 1e20 inputs: logits overflow to +-inf, naive gives inf, not NaN
        x, y = x * 1e20, y * 1e20
    else:
        x[3, 2] = {"nan": float("nan"), "inf": float("inf"), "neg_inf": float("-inf")}[case]
    compare_siglip(backend, x, y, 10.0, -10.0)


# ---------------------------------------------------------------- auto: per call, by size

def test_auto_materializes_small_calls_on_the_cpu(monkeypatch):
    from fastcl.ops.common.backends import MATERIALIZE_LOGITS
    from fastcl.ops.info_nce import resolve_backend

    fused = "cpu" if backends()["cpu"].available else "torch"
    cpu = torch.device("cpu")
    for normalized, threshold in MATERIALIZE_LOGITS.items():
        assert resolve_backend("auto", cpu, logits=threshold, normalized=normalized) == "naive"
        assert resolve_backend("auto", cpu, logits=threshold + 1, normalized=normalized) == fused
    assert MATERIALIZE_LOGITS[True] < MATERIALIZE_LOGITS[False]  # the plain loss's normalization costs it more
    assert resolve_backend("auto", cpu) == fused  # no size given: the fused path
    assert resolve_backend("torch", cpu, logits=1) == "torch"  # an explicit backend is kept
    monkeypatch.setenv("FASTCL_MATERIALIZE_LOGITS", "0")
    assert resolve_backend("auto", cpu, logits=1) == fused


def test_auto_takes_the_path_its_rule_names(monkeypatch):
    from fastcl.ops import info_nce as info_nce_module

    calls = []
    original = info_nce_module.info_nce_op
    monkeypatch.setattr(info_nce_module, "info_nce_op", lambda *a: calls.append(a[-1]) or original(*a))
    q, k = torch.randn(64, 8), torch.randn(64, 8)
    expected = naive.info_nce(q, k, hard_negatives=torch.randn(64, 2, 8).mul(0), temperature=0.1)
    loss = fastcl.info_nce(q, k, hard_negatives=torch.randn(64, 2, 8).mul(0), temperature=0.1)
    assert calls == [] and torch.equal(loss, expected)  # 64 x 66 logits: materialized
    monkeypatch.setenv("FASTCL_MATERIALIZE_LOGITS", str(64 * 66 - 1))
    fastcl.info_nce(q, k, hard_negatives=torch.zeros(64, 2, 8), temperature=0.1)
    assert calls == ["cpu" if backends()["cpu"].available else "torch"]
