"""The numerics contract of InfoNCE's CPU paths, against the naive reference (SigLIP's and latent
attention's are in their own test_*_numerics.py).

* exp of any argument <= 0 is accurate or exactly 0: no subnormal reaches a gradient product;
* huge gaps (temperature 1e-9, logits 1e30, gates 3e4) are exact;
* NaN and +-Inf reach the loss and every gradient exactly where the naive reference's are.
"""
import re

import pytest
import torch

import fastcl
from fastcl._native import backends
from fastcl.ops.info_nce import naive
from fastcl.ops.info_nce.chunked import Direction, torch_row_kernel
from fastcl.ops.info_nce.options import InfoNCEOptions

from .compare import assert_like_naive, no_subnormal

CPU_BACKENDS = ["torch", "cpu", "auto"]
native = pytest.mark.skipif(not backends()["cpu"].available, reason="native CPU kernels not built")


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


# ---------------------------------------------------------------- no subnormal, ever

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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_unnormalized_small_temperature_matches_naive(backend, symmetric, small_blocks):
    # DPR-style raw dot products at tau = 0.05 and 0.07 (the subnormal-slowdown inputs)
    q, k = torch.randn(40, 256), torch.randn(40, 256)
    for tau in (0.05, 0.07, 1.0):
        compare_info_nce(backend, q, k, temperature=tau, symmetric=symmetric, rtol=2e-4)


# ---------------------------------------------------------------- huge gaps are exact

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


# ---------------------------------------------------------------- NaN and Inf where naive has them

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
    monkeypatch.setattr("fastcl.ops.common.backends.MATERIALIZE_OVERRIDE", 0)  # FASTCL_MATERIALIZE_LOGITS=0
    assert resolve_backend("auto", cpu, logits=1) == fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"normalize": True}, {"symmetric": True}, {"reduction": "none"},
                                     {"reduction": "sum", "normalize": True, "symmetric": True}])
def test_auto_small_plain_call_equals_the_reference(options, dtype, caplog):
    # the common small call skips the general argument handling: same values and gradients,
    # the same non-finite entries, and it says which path ran
    q, k = torch.randn(32, 16, dtype=dtype) * 3, torch.randn(40, 16, dtype=dtype) * 3
    with caplog.at_level("DEBUG", logger="fastcl"):
        compare_info_nce("auto", q, k, temperature=0.05, rtol=1e-4 if dtype == torch.float32 else 1e-10, **options)
    assert "backend='auto' -> 'naive' (the plain loss, materialized)" in caplog.text
    q[3, 2], k[5, 1] = float("nan"), float("inf")  # non-finite rows: the reference's formulas run
    caplog.clear()
    with caplog.at_level("DEBUG", logger="fastcl"):
        compare_info_nce("auto", q, k, temperature=0.05, **options)
    assert "(the plain loss" not in caplog.text and "backend='auto' -> 'naive' (1280 logits)" in caplog.text


@pytest.mark.parametrize("call, message", [
    (lambda q, k: fastcl.info_nce(q, k, temperature=0.0), "temperature must be a finite value > 0"),
    (lambda q, k: fastcl.info_nce(q, k, temperature=float("nan")), "temperature must be a finite value > 0"),
    (lambda q, k: fastcl.info_nce(q, k, temperature=float("inf")), "temperature must be a finite value > 0"),
    (lambda q, k: fastcl.info_nce(q, k[:, :4]), "key must have shape (N, D) with D = query.shape[1]"),
    (lambda q, k: fastcl.info_nce(q, k[:7]), "key has N = 7 rows but query has B = 8"),
    (lambda q, k: fastcl.info_nce(q[:0], k), "query is empty"),
    (lambda q, k: fastcl.info_nce(q, k, temperature="0.1"), "temperature must be a float or a scalar tensor"),
    (lambda q, k: fastcl.info_nce(q, k, temperature=torch.tensor(-1.0)), "temperature must be a finite value > 0"),
    (lambda q, k: fastcl.info_nce(q, k, reduction="avg"), "reduction must be one of"),
    (lambda q, k: fastcl.info_nce(q, k, label_smoothing=True), "label_smoothing must be a float"),
    (lambda q, k: fastcl.info_nce(q, k, guide_margin_strategy="abs"), "guide_margin_strategy must be one of"),
    (lambda q, k: fastcl.info_nce(q, k, key_labels=torch.zeros(8, dtype=torch.long)), "must be given together"),
    (lambda q, k: fastcl.info_nce(q, k, return_stats=1), "return_stats must be a bool"),
])
def test_auto_small_plain_call_keeps_every_argument_check(call, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        call(torch.randn(8, 6), torch.randn(8, 6))


def test_auto_takes_the_path_its_rule_names(monkeypatch):
    from fastcl.ops import info_nce as info_nce_module

    calls = []
    original = info_nce_module.info_nce_op
    monkeypatch.setattr(info_nce_module, "info_nce_op", lambda *a: calls.append(a[-1]) or original(*a))
    q, k = torch.randn(64, 8), torch.randn(64, 8)
    expected = naive.info_nce(q, k, hard_negatives=torch.randn(64, 2, 8).mul(0), temperature=0.1)
    loss = fastcl.info_nce(q, k, hard_negatives=torch.randn(64, 2, 8).mul(0), temperature=0.1)
    assert calls == [] and torch.equal(loss, expected)  # 64 x 66 logits: materialized
    monkeypatch.setattr("fastcl.ops.common.backends.MATERIALIZE_OVERRIDE", 64 * 66 - 1)
    fastcl.info_nce(q, k, hard_negatives=torch.zeros(64, 2, 8), temperature=0.1)
    assert calls == ["cpu" if backends()["cpu"].available else "torch"]
