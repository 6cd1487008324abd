"""Batch-hard triplet loss: the blocked path against the materialized reference and a plain
Python loop (values and every gradient, float64 and float32, second order), its custom op
(opcheck, compile), dtypes and autocast, NaN propagation, torch.func, and clear errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.ops.triplet import naive
from fastcl.ops.triplet.op import hardest_negatives_op


def loop_reference(anchor, positive, margin, normalize):
    """Each row on its own, distances from the differences: independent of both paths."""
    a, p = anchor.double(), positive.double()
    if normalize:
        a, p = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    losses = []
    for i in range(a.shape[0]):
        positive_distance = (a[i] - p[i]).norm()
        negative_distance = min((a[i] - p[j]).norm() for j in range(a.shape[0]) if j != i)
        losses.append(torch.clamp(margin + positive_distance - negative_distance, min=0))
    return torch.stack(losses)


def pairs(batch, dim, dtype=torch.float64, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    anchor = scale * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    positive = anchor + 0.8 * scale * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    return anchor.to(dtype).requires_grad_(), positive.to(dtype).requires_grad_()


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("batch", [2, 7, 130])
def test_value_matches_a_plain_loop(batch, normalize, monkeypatch):
    monkeypatch.setenv("FASTCL_BLOCK_ROWS", "16")  # several row blocks
    anchor, positive = pairs(batch, 24, scale=3.0)
    for backend in ("naive", "torch"):
        losses = fastcl.triplet_margin_loss(anchor, positive, margin=0.3, normalize=normalize, reduction="none",
                                            backend=backend)
        torch.testing.assert_close(losses, loop_reference(anchor, positive, 0.3, normalize), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_blocked_path_equals_the_reference_with_every_gradient(dtype, tolerance, reduction, monkeypatch):
    monkeypatch.setenv("FASTCL_BLOCK_ROWS", "8")
    results = {}
    for backend in ("naive", "torch"):
        anchor, positive = pairs(50, 16, dtype)
        loss = fastcl.triplet_margin_loss(anchor, positive, margin=0.5, reduction=reduction, backend=backend)
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (loss * weights).sum().backward()
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        results[backend] = (loss.detach(), anchor.grad, positive.grad)
    for ours, reference in zip(results["torch"], results["naive"]):
        torch.testing.assert_close(ours, reference, rtol=tolerance, atol=tolerance)


def test_gradcheck_and_second_order():
    anchor, positive = pairs(6, 5, scale=2.0)
    function = lambda a, p: fastcl.triplet_margin_loss(a, p, margin=1.0, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(function, (anchor, positive))
    assert torch.autograd.gradgradcheck(function, (anchor, positive))
    # Hessian-vector product equals the reference's
    vector = torch.randn_like(anchor)
    hvps = []
    for backend in ("torch", "naive"):
        loss = fastcl.triplet_margin_loss(anchor, positive, margin=1.0, backend=backend)
        (grad,) = torch.autograd.grad(loss, anchor, create_graph=True)
        hvps.append(torch.autograd.grad((grad * vector).sum(), (anchor, positive)))
    for ours, reference in zip(*hvps):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_custom_op_passes_opcheck_and_compiles():
    anchor, positive = pairs(20, 8, torch.float32)
    torch.library.opcheck(hardest_negatives_op, (anchor.detach(), positive.detach()))
    compiled = torch.compile(lambda a, p: fastcl.triplet_margin_loss(a, p, backend="torch"), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(anchor, positive), fastcl.triplet_margin_loss(anchor, positive, backend="naive"))


def test_hardest_negative_is_the_closest_other_positive():
    anchor, positive = pairs(40, 6)
    a, p = F.normalize(anchor.detach(), dim=-1), F.normalize(positive.detach(), dim=-1)
    chosen = hardest_negatives_op(a, p)
    assert torch.equal(chosen, naive.hardest_negatives(anchor, positive))
    assert bool((chosen != torch.arange(40)).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_a_float32_loss_and_their_own_gradient_dtype(dtype):
    anchor, positive = pairs(32, 16, dtype)
    loss = fastcl.triplet_margin_loss(anchor, positive)
    loss.backward()
    assert loss.dtype == torch.float32 and anchor.grad.dtype == dtype
    reference = fastcl.triplet_margin_loss(anchor.detach().float(), positive.detach().float(), backend="naive")
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss = fastcl.triplet_margin_loss(anchor.float(), positive.float())
    assert autocast_loss.dtype == torch.float32


def test_nan_propagates_like_the_reference():
    anchor, positive = pairs(12, 4)
    with torch.no_grad():
        anchor[3, 1] = float("nan")
        positive[7, 0] = float("nan")
    outputs = [fastcl.triplet_margin_loss(anchor, positive, reduction="none", backend=b) for b in ("torch", "naive")]
    assert torch.equal(outputs[0].isnan(), outputs[1].isnan()) and bool(outputs[0][3].isnan())
    finite = ~outputs[1].isnan()
    torch.testing.assert_close(outputs[0][finite], outputs[1][finite])
    assert math.isnan(float(fastcl.triplet_margin_loss(anchor, positive)))


def test_torch_func_grad_and_the_module():
    anchor, positive = pairs(10, 4)
    grad = torch.func.grad(lambda a: fastcl.triplet_margin_loss(a, positive.detach(), margin=0.7))(anchor.detach())
    loss = fastcl.TripletMarginLoss(margin=0.7)(anchor, positive)
    (expected,) = torch.autograd.grad(loss, anchor)
    torch.testing.assert_close(grad, expected)
    assert "margin=0.7" in repr(fastcl.TripletMarginLoss(margin=0.7))


@pytest.mark.parametrize("call, error, message", [
    (lambda a, p: fastcl.triplet_margin_loss(a, p[:, :3]), ValueError, "positive must have the shape of anchor"),
    (lambda a, p: fastcl.triplet_margin_loss(a[0], p[0]), ValueError, "anchor must have shape (B, D)"),
    (lambda a, p: fastcl.triplet_margin_loss(a[:1], p[:1]), ValueError, "anchor needs at least 2 rows"),
    (lambda a, p: fastcl.triplet_margin_loss(a, p.long()), TypeError, "positive must be float16"),
    (lambda a, p: fastcl.triplet_margin_loss(a, p, margin=float("nan")), ValueError, "margin must be a finite float"),
    (lambda a, p: fastcl.triplet_margin_loss(a, p, normalize=1), TypeError, "normalize must be a bool"),
    (lambda a, p: fastcl.triplet_margin_loss(a, p, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda a, p: fastcl.triplet_margin_loss(a, p, backend="cpu"), ValueError, "backend must be one of ('auto', 'naive', 'torch')"),
])
def test_bad_arguments_name_the_argument(call, error, message):
    anchor, positive = pairs(4, 6, torch.float32)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(anchor, positive)
