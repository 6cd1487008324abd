"""cml_loss: every backend against the float64 reference (naive.py) for the loss and every
gradient, dense and indexed negatives, options, dtypes; bad inputs; the helpers."""

import pytest
import torch

import fastcl
from fastcl.ops.cml import clip_norm_, covariance_loss, naive

from .compare import backend_device, fused_backends, record_calls

BACKENDS = fused_backends()  # torch, cpu, triton (on CUDA tensors on a GPU machine)
_device = backend_device
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def _inputs(batch, window, dim, items, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    users = 0.6 * torch.randn(batch, dim, generator=generator)
    positives = 0.6 * torch.randn(batch, dim, generator=generator)
    table = 0.6 * torch.randn(items, dim, generator=generator)
    indices = torch.randint(0, items, (batch, window), generator=generator)
    return users.to(dtype), positives.to(dtype), table.to(dtype), indices


def _run(backend, users, positives, table, indices, indexed, upstream=None, **options):
    device = _device(backend)
    indices = indices.to(device)
    leaves = [t.detach().to(device).clone().requires_grad_() for t in (users, positives, table)]
    u, p, t = leaves
    if indexed:
        kwargs = dict(negative_indices=indices, item_table=t)
        negatives = None
    else:
        negatives = t[indices].detach().requires_grad_()  # its own leaf: (B, W, D) gradient
        kwargs = {}
        leaves[2] = negatives
    if backend == "naive":
        loss = naive.cml_loss(u, p, negatives, **kwargs, **options)
    else:
        loss = fastcl.cml_loss(u, p, negatives, **kwargs, backend=backend, **options)
    weight = upstream.to(device) if loss.dim() else 2.5
    (loss * weight).sum().backward()
    return loss.detach().cpu(), [leaf.grad.cpu() for leaf in leaves]


def _assert_matches(got, want, dtype):
    tolerance = TOLERANCE[dtype]
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert got_loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got_loss.double(), want_loss, rtol=tolerance, atol=tolerance)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == dtype
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=tolerance, atol=tolerance * scale)


OPTION_CASES = [  # (indexed, reduction, rank_weight, num_items, margin): pairwise-sampled
    (True, "mean", True, None, 0.5),
    (False, "sum", True, 40, 0.9),
    (True, "none", False, None, 0.5),
    (False, "mean", False, None, 0.1),
    (True, "sum", True, 1000, 0.3),
    (False, "none", True, None, 0.5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("indexed,reduction,rank_weight,num_items,margin", OPTION_CASES)
def test_cml_matches_float64_reference(backend, dtype, indexed, reduction, rank_weight, num_items, margin, small_blocks):
    batch, window, dim, items = 19, 11, 13, 29
    users, positives, table, indices = _inputs(batch, window, dim, items, dtype)
    options = dict(margin=margin, num_items=num_items, rank_weight=rank_weight, reduction=reduction)
    upstream = torch.linspace(0.5, 2.0, batch, dtype=torch.float64)
    want = _run("naive", users.double(), positives.double(), table.double(), indices, indexed, upstream, **options)
    got = _run(backend, users, positives, table, indices, indexed, upstream.float(), **options)
    # the hinge must be active for some rows and not for others, or the test says little
    per_row = naive.cml_loss(users.double(), positives.double(), negative_indices=indices, item_table=table.double(),
                             margin=margin, reduction="none", rank_weight=False)
    assert 0 < int((per_row > 0).sum()) < batch
    _assert_matches(got, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cml_float64_and_duplicate_indices(backend):
    """float64 end to end; an item drawn twice in a row (a tie) and by several rows (its table
    gradient is a sum)."""
    users, positives, table, _ = _inputs(9, 5, 4, 6, torch.float64, seed=3)
    indices = torch.tensor([[0, 0, 1, 2, 3]] * 9)
    want = _run("naive", users, positives, table, indices, True, margin=2.0)
    got = _run(backend, users, positives, table, indices, True, margin=2.0)
    _assert_matches(got, want, torch.float64)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if "cpu" in BACKENDS else []))
def test_cml_gradcheck_and_second_order(backend):
    users, positives, table, indices = _inputs(5, 4, 3, 7, torch.float64, seed=1)
    leaves = [t.requires_grad_() for t in (users, positives, table)]

    def loss(u, p, t):
        return fastcl.cml_loss(u, p, negative_indices=indices, item_table=t, margin=1.0, backend=backend)

    assert torch.autograd.gradcheck(loss, leaves)
    assert torch.autograd.gradgradcheck(loss, leaves)


def test_cml_scan_runs_without_big_tensors(monkeypatch):
    """The cpu backend takes the native scan, once, with the table read in place."""
    if "cpu" not in BACKENDS:
        pytest.skip("native CPU backend not built")
    from fastcl.ops.cml import native

    calls = record_calls(monkeypatch, native, "native_scan", "item_table")
    users, positives, table, indices = _inputs(8, 6, 5, 10, torch.float32)
    fastcl.cml_loss(users, positives, negative_indices=indices, item_table=table, backend="cpu")
    assert len(calls) == 1 and calls[0].shape == (10, 5)


def test_cml_opcheck_and_compile():
    users, positives, table, indices = _inputs(6, 4, 5, 9, torch.float32)
    for negatives, index_arg, source in ((table[indices], None, None), (None, indices, table)):
        torch.library.opcheck(torch.ops.fastcl.cml_scan.default, (users, positives, negatives, index_arg, source, 0.5, "torch"))
    torch._dynamo.reset()

    def loss_fn(u, p, t):
        return fastcl.cml_loss(u, p, negative_indices=indices, item_table=t, margin=0.5, backend="torch") * 3.0

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (users, positives, table)]
        value = fn(*leaves)
        results.append((value, torch.autograd.grad(value, leaves)))
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["naive"] + [b for b in BACKENDS if isinstance(b, str)])
def test_cml_bad_inputs(backend):
    users, positives, table, indices = _inputs(4, 3, 5, 6, torch.float32)
    call = lambda **kw: fastcl.cml_loss(**{**dict(users=users, positives=positives, negative_indices=indices,  # noqa: E731
                                                  item_table=table, backend=backend), **kw})
    with pytest.raises(ValueError, match="negative_indices must lie in"):
        call(negative_indices=indices + 6)
    with pytest.raises(ValueError, match="negative_indices must lie in"):
        call(negative_indices=indices - 6)
    with pytest.raises(ValueError, match="W >= 1"):
        call(negative_indices=indices[:, :0])
    with pytest.raises(ValueError, match="W >= 1"):
        fastcl.cml_loss(users, positives, table[indices][:, :0], backend=backend)
    with pytest.raises(ValueError, match="not both"):
        fastcl.cml_loss(users, positives, table[indices], negative_indices=indices, backend=backend)
    with pytest.raises(ValueError, match="positives must have the shape"):
        call(positives=positives[:3])
    with pytest.raises(TypeError, match="negative_indices must be an int64"):
        call(negative_indices=indices.int())
    with pytest.raises(TypeError, match="share one dtype"):
        call(item_table=table.double())
    with pytest.raises(ValueError, match="margin"):
        call(margin=float("nan"))
    with pytest.raises(ValueError, match="num_items"):
        call(num_items=0)
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="max")
    poisoned = table.clone()
    poisoned[indices[2, 1], 3] = float("nan")
    if backend == "naive":  # the reference's semantics: NaN flows into the loss
        assert torch.isnan(call(item_table=poisoned))
    else:
        with pytest.raises(ValueError, match="NaN or Inf"):
            call(item_table=poisoned)


def test_covariance_loss_and_clip_norm():
    a, b = torch.randn(30, 6), torch.randn(20, 6) * 2
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    got_a, got_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = naive.covariance_loss(a64, b64)
    got = covariance_loss(got_a, got_b)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    want.backward()
    got.backward()
    torch.testing.assert_close(got_a.grad.double(), a64.grad, rtol=1e-4, atol=1e-6)
    weight = torch.randn(10, 4) * torch.tensor([0.1, 3.0]).repeat(5).unsqueeze(1)
    original = weight.clone()
    clip_norm_(weight, 1.0, rows=torch.tensor([1, 2, 3]))
    assert torch.equal(weight[0], original[0]) and torch.equal(weight[4:], original[4:])
    clip_norm_(weight)
    norms = original.norm(dim=1)
    torch.testing.assert_close(weight.norm(dim=1), norms.clamp_max(1.0))
    torch.testing.assert_close(weight, original * (1.0 / norms.clamp_min(1.0)).unsqueeze(1))
    with pytest.raises(ValueError, match="max_norm"):
        clip_norm_(weight, 0.0)


def test_cml_module_wrapper():
    users, positives, table, indices = _inputs(5, 4, 3, 8, torch.float32)
    criterion = fastcl.CMLLoss(margin=0.7, reduction="sum")
    got = criterion(users, positives, negative_indices=indices, item_table=table)
    want = naive.cml_loss(users, positives, negative_indices=indices, item_table=table, margin=0.7, reduction="sum")
    torch.testing.assert_close(got, want)
    assert "margin=0.7" in repr(criterion)
