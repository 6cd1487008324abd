"""InfoNCE's autograd and dtypes: double backward (the InfoNCE family and SigLIP), retained
backwards, meta tensors, dtype promotion and autocast, eager import cost, argument checks.

Every check compares with the naive reference (fastcl/ops/info_nce/naive.py) or with what a
plain PyTorch loss does.
"""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.autograd import gradgradcheck

import fastcl
from fastcl.ops.info_nce import naive
from fastcl.ops.siglip import naive as siglip_naive

CPU_BACKENDS = ["torch"] + (["cpu"] if fastcl.backends()["cpu"].available else [])
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # every test deterministic, including those that draw from the global generator


def _float64(*shape, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).requires_grad_()


# -- double backward ---------------------------------------------------------------------
# (name, keyword arguments, number of keys, hard negatives per query, learnable temperature)
B, D = 4, 3
LABELS = torch.tensor([0, 1, 0, 2])
KEY_LABELS = torch.tensor([0, 1, 0, 2, 1, 0])
INFO_NCE_CASES = [
    ("default", dict(), 4, 0, True),
    ("positive", dict(positive=torch.tensor([2, 0, 5, 1])), 6, 0, True),
    ("hard_negatives", dict(), 5, 2, True),
    ("symmetric", dict(symmetric=True), 6, 0, True),
    ("exclude_self", dict(exclude_self=True, positive=torch.tensor([1, 2, 3, 0])), 4, 0, True),
    ("labels_mask", dict(labels=LABELS, key_labels=KEY_LABELS), 6, 1, False),
    ("supcon", dict(labels=LABELS, key_labels=KEY_LABELS, multi_positive="supcon"), 6, 0, True),
    ("pairwise", dict(labels=LABELS, key_labels=KEY_LABELS, multi_positive="pairwise"), 6, 0, False),
    ("margin", dict(false_negative_margin=0.05), 6, 0, True),
    ("smoothing", dict(label_smoothing=0.2), 5, 1, True),
    ("sum", dict(reduction="sum"), 5, 0, True),
    ("none", dict(reduction="none"), 5, 1, True),
    ("normalize", dict(normalize=True), 5, 1, True),
    ("symmetric_normalize_none", dict(symmetric=True, normalize=True, reduction="none"), 4, 0, True),
]


def _info_nce_inputs(num_keys, hard, learn_temperature):
    inputs = [_float64(B, D, seed=1), _float64(num_keys, D, seed=2)]
    if hard:
        inputs.append(_float64(B, hard, D, seed=3))
    if learn_temperature:
        inputs.append(torch.tensor(0.7, dtype=torch.float64, requires_grad=True))
    return inputs


def _info_nce_function(backend, kwargs, hard, learn_temperature):
    def function(query, key, *rest):
        rest = list(rest)
        hard_negatives = rest.pop(0) if hard else None
        temperature = rest.pop(0) if learn_temperature else 0.7
        return fastcl.info_nce(query, key, hard_negatives=hard_negatives, temperature=temperature, backend=backend,
                               **kwargs)

    return function


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,kwargs,num_keys,hard,learn_temperature", INFO_NCE_CASES, ids=[c[0] for c in INFO_NCE_CASES])
def test_info_nce_gradgradcheck(backend, name, kwargs, num_keys, hard, learn_temperature):
    inputs = _info_nce_inputs(num_keys, hard, learn_temperature)
    function = _info_nce_function(backend, kwargs, hard, learn_temperature)
    assert gradgradcheck(function, inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hessian_vector_product_matches_naive(backend):
    """A gradient penalty's gradient: the same as the naive loss gives, and not zero."""
    results = {}
    for which in ("naive", backend):
        query, key = _float64(5, 4, seed=4), _float64(6, 4, seed=5)
        temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        loss = fastcl.info_nce(query, key, temperature=temperature, normalize=True, backend=which)
        grad_query, = torch.autograd.grad(loss, query, create_graph=True)
        penalty = grad_query.pow(2).sum()
        results[which] = torch.autograd.grad(penalty, (query, key, temperature))
    for got, want in zip(results[backend], results["naive"]):
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_nt_xent_siglip_gradgradcheck(backend):
    image, text = _float64(4, 3, seed=6), _float64(4, 3, seed=7)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda i, t, s: fastcl.clip_loss(i, t, s, backend=backend), (image, text, scale))
    assert gradgradcheck(lambda a, b: fastcl.nt_xent(a, b, temperature=0.5, backend=backend), (image, text))
    assert gradgradcheck(lambda i, t, s, b: fastcl.siglip_loss(i, t, s, b, backend=backend), (image, text, scale, bias))
    assert gradgradcheck(lambda i, t: fastcl.siglip_loss(i, t, 3.0, -2.0, backend=backend), (image, text))


def test_double_backward_first_order_still_fused(monkeypatch):
    """Without create_graph the fused path runs (the differentiable recompute is not called)."""
    from fastcl.ops.info_nce import op

    calls = []
    original = op.differentiable_gradients
    monkeypatch.setattr(op, "differentiable_gradients", lambda *a, **k: calls.append(1) or original(*a, **k))
    query, key = _float64(4, 3), _float64(4, 3, seed=1)
    fastcl.info_nce(query, key, backend="torch").backward()
    assert calls == []
    loss = fastcl.info_nce(query, key, backend="torch")
    torch.autograd.grad(loss, query, create_graph=True)
    assert calls == [1]


# -- a second retained backward after editing .grad in place ------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_name", ["info_nce", "info_nce_none", "siglip"])
def test_second_retained_backward_after_in_place_grad_edit(backend, loss_name):
    def loss_of(which, query, key, temperature):
        if loss_name == "siglip":
            return fastcl.siglip_loss(query, key, 1.0 / temperature, -1.0, backend=which)
        if loss_name == "info_nce_none":
            return fastcl.info_nce(query, key, temperature=temperature, reduction="none", backend=which).sum()
        return fastcl.info_nce(query, key, temperature=temperature, backend=which)

    results = {}
    for which in ("naive", backend):
        generator = torch.Generator().manual_seed(3)
        query = torch.randn(6, 5, generator=generator).requires_grad_()
        key = torch.randn(6, 5, generator=generator).requires_grad_()
        temperature = torch.tensor(0.2, requires_grad=True)
        loss = loss_of(which, query, key, temperature)
        loss.backward(retain_graph=True)
        torch.nn.utils.clip_grad_norm_([query, key, temperature], max_norm=0.1)  # edits .grad in place
        loss.backward()
        results[which] = (query.grad, key.grad, temperature.grad)
    for got, want in zip(results[backend], results["naive"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- latent attention keeps a non-finite token in its own sequence ------------------------


# -- devices of the scalars, meta tensors -------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(), dict(reduction="none"), dict(symmetric=True, normalize=True),
                                    dict(positive=torch.tensor([1, 0, 3, 2])),
                                    dict(exclude_self=True, positive=torch.tensor([1, 0, 3, 2]))],
                         ids=["mean", "none", "symmetric", "positive", "exclude_self"])
def test_info_nce_meta_tensors_propagate_shapes(kwargs):
    kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    query = torch.randn(4, 3, device="meta", requires_grad=True)
    key = torch.randn(4, 3, device="meta", requires_grad=True)
    temperature = torch.tensor(0.1, device="meta", requires_grad=True)
    loss = fastcl.info_nce(query, key, temperature=temperature, **kwargs)
    assert loss.device.type == "meta" and loss.shape == ((4,) if kwargs.get("reduction") == "none" else ())
    loss.sum().backward()
    for tensor in (query, key, temperature):
        assert tensor.grad.device.type == "meta" and tensor.grad.shape == tensor.shape


# -- no torch._dynamo on an eager call ---------------------------------------------------
def test_eager_calls_do_not_import_dynamo():
    script = textwrap.dedent("""
        import sys, torch, fastcl
        from fastcl.ops.latent_attention import LatentAttentionPooling
        backends = ["torch"] + (["cpu"] if fastcl.backends()["cpu"].available else [])
        for backend in backends:
            q = torch.randn(6, 4, requires_grad=True); k = torch.randn(6, 4, requires_grad=True)
            t = torch.tensor(0.1, requires_grad=True)
            fastcl.info_nce(q, k, temperature=t, positive=torch.arange(6), backend=backend).backward()
            fastcl.info_nce(q, k, temperature=t, reduction="none", backend=backend).sum().backward()
            fastcl.clip_loss(q, k, 10.0, backend=backend).backward()
            fastcl.siglip_loss(q, k, 10.0, -10.0, backend=backend).backward()
            pool = LatentAttentionPooling(4, num_latents=2, num_heads=1, backend=backend)
            pool(torch.randn(2, 3, 4, requires_grad=True), torch.ones(2, 3)).sum().backward()
            u = torch.randn(6, 4, requires_grad=True)
            fastcl.cml_loss(u, torch.randn(6, 4), torch.randn(6, 3, 4), num_items=10, backend=backend).backward()
            items = torch.randn(2, 5, 4, requires_grad=True)
            fastcl.collaborative_contrastive_loss(items, torch.randint(0, 2, (2, 5)), backend=backend).backward()
        fastcl.triplet_margin_loss(q, k).backward()
        images = torch.randn(1, 3, 8, 8, requires_grad=True)
        fastcl.gather_patches(images, torch.tensor([[0, 3]]), patch_size=4)[0].sum().backward()
        print(sorted(m for m in sys.modules if m.startswith(("torch._dynamo", "sympy"))))
        # after those eager calls, torch.compile still traces the op in one graph
        torch.manual_seed(0); q = torch.randn(6, 4, requires_grad=True); k = torch.randn(6, 4)
        compiled = torch.compile(lambda q, k: fastcl.info_nce(q, k, temperature=0.1), fullgraph=True, backend="aot_eager")
        loss = compiled(q, k); loss.backward()
        from fastcl.ops.info_nce import naive
        q2 = q.detach().requires_grad_(); naive.info_nce(q2, k, temperature=0.1).backward()
        torch.testing.assert_close(q.grad, q2.grad, rtol=1e-4, atol=1e-5)
        print("compiled ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == "[]"
    assert lines[-1] == "compiled ok"


# -- smaller ones ------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.inf, math.nan, 0.0, -1.0])
def test_tensor_temperature_rejected_like_a_float(value):
    query, key = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
        fastcl.info_nce(query, key, temperature=value)
    with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
        fastcl.info_nce(query, key, temperature=torch.tensor(value))


@pytest.mark.parametrize("value", [0.0, -2.0, math.inf])
def test_clip_loss_names_logit_scale(value):
    features = torch.randn(4, 3)
    with pytest.raises(ValueError, match="logit_scale must be a finite value > 0"):
        fastcl.clip_loss(features, features, torch.tensor(value))
    with pytest.raises(ValueError, match="logit_scale must be a finite value > 0"):
        fastcl.clip_loss(features, features, value)


def test_learnable_temperature_cannot_start_above_max_scale():
    with pytest.raises(ValueError, match="max_scale"):
        fastcl.InfoNCELoss(temperature=0.005, learnable_temperature=True)
    # at the boundary the scale starts inside the clamp, so it learns
    criterion = fastcl.InfoNCELoss(temperature=0.01, learnable_temperature=True)
    assert criterion.logit_scale.exp() <= criterion.max_scale
    query, key = torch.randn(6, 4), torch.randn(6, 4)
    criterion(query, key + query).backward()
    assert criterion.logit_scale.grad != 0
    fastcl.InfoNCELoss(temperature=0.005, learnable_temperature=True, max_scale=200.0)  # allowed


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int32_positive_like_int64(backend):
    query, key = torch.randn(4, 3), torch.randn(7, 3)
    positive = torch.tensor([6, 0, 2, 5])
    want = naive.info_nce(query, key, positive=positive)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        got = fastcl.info_nce(query, key, positive=positive.to(dtype), backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_promote_with_gradients_in_each_dtype(backend):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(5, 8, generator=generator).bfloat16().requires_grad_()
    key = torch.randn(6, 8, generator=generator).requires_grad_()
    hard = torch.randn(5, 2, 8, generator=generator).half().requires_grad_()
    loss = fastcl.info_nce(query, key, hard_negatives=hard, temperature=0.2, backend=backend)
    loss.backward()
    # the reference: every input promoted to float32 first (bf16 and fp16 are exact in fp32)
    ref_query, ref_key, ref_hard = (t.detach().float().requires_grad_() for t in (query, key, hard))
    want = naive.info_nce(ref_query, ref_key, hard_negatives=ref_hard, temperature=0.2)
    want.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got, ref, dtype in ((query.grad, ref_query.grad, torch.bfloat16), (key.grad, ref_key.grad, torch.float32),
                            (hard.grad, ref_hard.grad, torch.float16)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, ref.to(dtype), rtol=1e-2, atol=1e-3)
    # float64 wins over float32, as torch.promote_types says
    loss64 = fastcl.info_nce(query.detach().double(), key.detach(), temperature=0.2, backend=backend)
    assert loss64.dtype == torch.float64
    image, text = torch.randn(4, 3).bfloat16(), torch.randn(4, 3)
    torch.testing.assert_close(fastcl.siglip_loss(image, text, 5.0, -2.0, backend=backend),
                               siglip_naive.siglip_loss(image.float(), text, 5.0, -2.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_behaves_as_the_naive_loss(backend):
    """Under autocast: products of the autocast-dtype inputs, float32 accumulation and loss."""
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(16, 32, generator=generator).requires_grad_()
    key = torch.randn(16, 32, generator=generator).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastcl.info_nce(query, key, temperature=0.1, backend=backend)
        with torch.no_grad():
            naive_autocast = naive.info_nce(query, key, temperature=0.1)
        siglip = fastcl.siglip_loss(query, key, 10.0, -10.0, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and query.grad.dtype == torch.float32
    # exactly the reference on bf16-rounded inputs, in float32
    low_query, low_key = query.detach().bfloat16().float(), key.detach().bfloat16().float()
    torch.testing.assert_close(loss.detach(), naive.info_nce(low_query, low_key, temperature=0.1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(siglip.detach(), siglip_naive.siglip_loss(low_query, low_key, 10.0, -10.0), rtol=1e-5, atol=1e-5)
    # and within bf16 rounding of the naive loss under the same autocast (which rounds the logits too)
    torch.testing.assert_close(loss.detach(), naive_autocast.float(), rtol=2e-2, atol=2e-2)
    # differs from the float32 loss: autocast is not ignored
    full = naive.info_nce(query.detach(), key.detach(), temperature=0.1)
    assert not torch.allclose(loss.detach(), full, rtol=1e-6, atol=0)


