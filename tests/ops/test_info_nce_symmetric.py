"""The two-pass symmetric (CLIP) path of the native CPU backend (fastcl/ops/info_nce/symmetric.py)
against the naive reference, and the cases that must not take it."""
import pytest
import torch

import fastcl
from fastcl.ops.info_nce import function

from .compare import record_calls
from .test_info_nce import TOLERANCE, assert_matches, make_inputs, run

pytestmark = pytest.mark.skipif(not fastcl.backends()["cpu"].available, reason="native CPU backend not built")


@pytest.fixture
def two_pass_calls(monkeypatch):
    """Per call of the two-pass driver: whether it computed gradients (weights given)."""
    return record_calls(monkeypatch, function, "two_pass_symmetric", "weights")


def with_gradients(calls):
    return [weights is not None for weights in calls]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extra_keys", [0, 13])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_two_pass_matches_naive(dtype, extra_keys, reduction, small_blocks, two_pass_calls):
    query, key, _ = make_inputs(29, 29 + extra_keys, 12, dtype=dtype)
    assert_matches("cpu", query, key, dtype=dtype, symmetric=True, reduction=reduction)
    # a per-row loss runs the forward without gradients, then the backward op with them
    expected = [False, True] if reduction == "none" else [True]
    assert with_gradients(two_pass_calls) == expected, "the plain symmetric loss did not take the two-pass path"


@pytest.mark.parametrize("normalize", [False, True])
def test_two_pass_several_column_slices_and_blocks(normalize, small_blocks, two_pass_calls):
    # 300 columns: two of the kernel's 256-column slices; blocks of 7 rows: 43 blocks
    query, key, _ = make_inputs(300, 311, 16, seed=3)
    assert_matches("cpu", query, key, symmetric=True, normalize=normalize, temperature=0.05)
    assert with_gradients(two_pass_calls) == [True]


def test_two_pass_column_max_moves_between_blocks(small_blocks, two_pass_calls):
    """Large similarities at a low temperature, rows growing in norm so each column's maximum
    keeps moving to later blocks: the running column statistics are rescaled many times, and
    exp would overflow without the shifts."""
    query, key, _ = make_inputs(40, 40, 8, seed=5, scale=3.0)
    query = query * torch.linspace(0.5, 2.0, 40)[:, None]
    assert_matches("cpu", query, key, symmetric=True, temperature=0.01)
    loss, grads = run("cpu", query, key, symmetric=True, temperature=0.01)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads if g is not None)


def test_two_pass_single_pair_is_exactly_zero(two_pass_calls):
    query, key, _ = make_inputs(1, 1, 4)
    loss, grads = run("cpu", query, key, symmetric=True)
    assert loss.item() == 0.0
    for grad in (grads[0], grads[1], grads[3]):
        assert torch.count_nonzero(grad) == 0


def test_two_pass_without_gradients(two_pass_calls):
    query, key, _ = make_inputs(33, 40, 8, seed=2)
    with torch.no_grad():
        ours = fastcl.info_nce(query, key, symmetric=True, reduction="none", backend="cpu")
        want = fastcl.info_nce(query, key, symmetric=True, reduction="none", backend="naive")
    torch.testing.assert_close(ours, want, **dict(zip(("rtol", "atol"), TOLERANCE[torch.float32]["loss"])))
    assert with_gradients(two_pass_calls) == [False]


@pytest.mark.parametrize("config", [
    dict(labels=3),
    dict(hard=2),
    dict(label_smoothing=0.1),
    dict(false_negative_margin=0.1),
    dict(labels=3, multi_positive="pairwise", exclude_self=True),
    dict(labels=3, multi_positive="supcon"),
])
def test_other_symmetric_losses_keep_the_row_kernel(config, two_pass_calls):
    config = dict(config)
    query, key, extra = make_inputs(17, 17, 8, hard=config.pop("hard", 0), labels=config.pop("labels", 0))
    assert_matches("cpu", query, key, symmetric=True, **extra, **config)
    assert two_pass_calls == []


def test_torch_backend_keeps_the_row_kernel(two_pass_calls):
    query, key, _ = make_inputs(17, 17, 8)
    assert_matches("torch", query, key, symmetric=True)
    assert two_pass_calls == []
