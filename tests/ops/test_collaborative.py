"""collaborative_contrastive_loss: every backend against the float64 reference (naive.py) for
the loss and every gradient, options, dtypes, padding; bad inputs and edge cases."""
import pytest
import torch

import fastcl
from fastcl.ops.collaborative import naive

from .compare import backend_device, fused_backends, record_calls

BACKENDS = fused_backends()  # torch, cpu, triton (on CUDA tensors on a GPU machine)
_device = backend_device
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def _inputs(pages, length, dim, dtype, seed=0, labels=2):
    generator = torch.Generator().manual_seed(seed)
    items = torch.randn(pages, length, dim, generator=generator).to(dtype)
    clicks = torch.randint(0, labels, (pages, length), generator=generator)
    lengths = torch.randint(0, length + 1, (pages, 1), generator=generator)
    mask = torch.arange(length).unsqueeze(0) < lengths
    trigger = torch.randn(pages, dim, generator=generator).to(dtype)
    return items, clicks, mask, trigger


def _run(backend, items, clicks, mask, trigger, upstream, **options):
    device = _device(backend)
    clicks, mask, upstream = clicks.to(device), mask.to(device), upstream.to(device)
    leaves = [items.detach().to(device).clone().requires_grad_()]
    if trigger is not None:
        leaves.append(trigger.detach().to(device).clone().requires_grad_())
    trig = leaves[1] if trigger is not None else None
    if backend == "naive":
        loss = naive.collaborative_contrastive_loss(leaves[0], clicks, mask, trigger=trig, **options)
    else:
        loss = fastcl.collaborative_contrastive_loss(leaves[0], clicks, mask, trigger=trig, backend=backend, **options)
    (loss * (upstream if loss.dim() else 1.7)).sum().backward()
    return loss.detach().cpu(), [leaf.grad.cpu() for leaf in leaves]


OPTION_CASES = [  # (trigger, normalize, temperature, reduction, click dtype): pairwise-sampled
    (True, True, 0.1, "mean", torch.bool),
    (False, True, 0.5, "sum", torch.int64),
    (True, False, 2.0, "none", torch.int64),
    (False, False, 1.0, "mean", torch.bool),
    (True, True, 0.05, "sum", torch.bool),
    (False, True, 0.2, "none", torch.bool),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_trigger,normalize,temperature,reduction,click_dtype", OPTION_CASES)
def test_collaborative_matches_float64_reference(backend, dtype, with_trigger, normalize, temperature, reduction,
                                                 click_dtype, small_blocks):
    items, clicks, mask, trigger = _inputs(11, 9, 6, dtype)
    if not normalize:
        items = (items.float() * 0.3).to(dtype)
    clicks = clicks.to(click_dtype)
    trigger = trigger if with_trigger else None
    upstream = torch.linspace(-1.0, 2.0, items.shape[0] * items.shape[1], dtype=torch.float64).reshape(mask.shape)
    options = dict(normalize=normalize, temperature=temperature, reduction=reduction)
    want = _run("naive", items.double(), clicks, mask, None if trigger is None else trigger.double(), upstream, **options)
    got = _run(backend, items, clicks, mask, trigger, upstream.float(), **options)
    tolerance = TOLERANCE[dtype]
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), want[0], rtol=tolerance, atol=tolerance)
    for a, b in zip(got[1], want[1]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tolerance, atol=tolerance * max(1.0, b.abs().max().item()))
    assert (got[1][0][~mask] == 0).all(), "padding got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_collaborative_float64_many_labels_and_edge_pages(backend):
    """float64; integer outcomes beyond click/no-click (and negative ones, counted pairwise);
    an empty page, a one-item page, a page whose items all differ (no anchor counts)."""
    items, clicks, mask, trigger = _inputs(6, 5, 4, torch.float64, seed=2, labels=3)
    clicks[1] = torch.tensor([-5, 7, 7, -5, 100])
    mask[0] = False
    mask[2] = torch.tensor([True, False, False, False, False])
    mask[3] = True
    clicks[3] = torch.arange(5)
    upstream = torch.ones(6, 5, dtype=torch.float64)
    for reduction in ("mean", "none"):
        want = _run("naive", items, clicks, mask, trigger, upstream, reduction=reduction)
        got = _run(backend, items, clicks, mask, trigger, upstream, reduction=reduction)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (want[0][[0, 2, 3]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_collaborative_no_anchor_and_nan(backend):
    items, clicks, mask, trigger = (t.to(_device(backend)) for t in _inputs(3, 4, 5, torch.float32))
    alone = torch.zeros(3, 4, dtype=torch.bool, device=items.device)
    alone[:, 0] = True
    leaf = items.clone().requires_grad_()
    loss = fastcl.collaborative_contrastive_loss(leaf, clicks, alone, backend=backend)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(leaf.grad, torch.zeros_like(items))
    poisoned = items.clone()
    poisoned[1, 2, 0] = float("nan")
    mask = torch.ones(3, 4, dtype=torch.bool, device=items.device)
    clicks = torch.tensor([[1, 1, 0, 0]] * 3, device=items.device)
    want = naive.collaborative_contrastive_loss(poisoned, clicks, mask, reduction="none").cpu()
    got = fastcl.collaborative_contrastive_loss(poisoned, clicks, mask, reduction="none", backend=backend).cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want[1]).all()
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)


def test_collaborative_bad_inputs():
    items, clicks, mask, trigger = _inputs(3, 4, 5, torch.float32)
    f = fastcl.collaborative_contrastive_loss
    with pytest.raises(ValueError, match="clicks must be"):
        f(items, clicks[:, :3], mask)
    with pytest.raises(TypeError, match="clicks must be bool or integer"):
        f(items, clicks.float(), mask)
    with pytest.raises(ValueError, match="mask must be a bool"):
        f(items, clicks, mask.long())
    with pytest.raises(ValueError, match="trigger must have shape"):
        f(items, clicks, mask, trigger=trigger[:2])
    with pytest.raises(TypeError, match="trigger must have the dtype"):
        f(items, clicks, mask, trigger=trigger.double())
    with pytest.raises(ValueError, match="temperature"):
        f(items, clicks, mask, temperature=0.0)
    with pytest.raises(ValueError, match="L >= 1"):
        f(items[:, :0], clicks[:, :0], mask[:, :0])
    with pytest.raises(ValueError, match="items is empty"):
        f(items[:0], clicks[:0], mask[:0])
    with pytest.raises(ValueError, match="backend"):
        f(items, clicks, mask, backend="cuda")


def test_collaborative_gradcheck_opcheck_compile_and_module(monkeypatch):
    items, clicks, mask, trigger = _inputs(3, 5, 4, torch.float64, seed=4)
    mask[:] = True
    leaves = (items.clone().requires_grad_(), trigger.clone().requires_grad_())
    for backend in [b for b in BACKENDS if isinstance(b, str)]:
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(lambda e, t: fastcl.collaborative_contrastive_loss(
                e, clicks, mask, trigger=t, reduction=reduction, backend=backend), leaves)
    weights = torch.rand(3, 5, dtype=torch.float64)
    for compute_grads in (True, False):
        torch.library.opcheck(torch.ops.fastcl.collaborative_forward.default,
                              (leaves[0], clicks, mask, leaves[1], weights, 0.1, True, "torch", compute_grads))
    torch._dynamo.reset()

    def loss_fn(e, t):
        return fastcl.collaborative_contrastive_loss(e, clicks, mask, trigger=t, backend="torch") * 2.0

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_value = loss_fn(*leaves)
    compiled_value = compiled(*leaves)
    torch.testing.assert_close(compiled_value, eager_value)
    for a, b in zip(torch.autograd.grad(compiled_value, leaves), torch.autograd.grad(eager_value, leaves)):
        torch.testing.assert_close(a, b)
    if "cpu" in BACKENDS:
        from fastcl.ops.collaborative import native

        calls = record_calls(monkeypatch, native, "native_pages", "compute_grads")
        criterion = fastcl.CollaborativeContrastiveLoss(temperature=0.3)
        value = criterion(*leaves[:1], clicks, mask, trigger=leaves[1])
        value.backward()
        assert calls == [True]
        torch.testing.assert_close(value, naive.collaborative_contrastive_loss(
            items, clicks, mask, trigger=trigger, temperature=0.3))
