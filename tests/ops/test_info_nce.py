"""Every InfoNCE backend against the naive reference: loss and every gradient, every option."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.ops.info_nce import naive

BACKENDS = ["torch"] + (["cpu"] if fastcl.backends()["cpu"].available else [])

# Tolerances for (loss, gradients) by input dtype. Every path computes in fp32 from the same
# low-precision inputs, so the loss stays tight; gradients are rounded to the input dtype.
TOLERANCE = {
    torch.float32: dict(loss=(1e-5, 1e-5), grad=(1e-5, 2e-5)),
    torch.float16: dict(loss=(1e-4, 1e-4), grad=(2e-3, 2e-3)),
    torch.bfloat16: dict(loss=(1e-4, 1e-4), grad=(1.6e-2, 1.6e-2)),
    torch.float64: dict(loss=(1e-10, 1e-10), grad=(1e-10, 1e-10)),
}


def make_inputs(batch, num_keys, dim, *, hard=0, dtype=torch.float32, labels=0, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    query = (torch.randn(batch, dim, generator=generator) * scale).to(dtype)
    key = (torch.randn(num_keys, dim, generator=generator) * scale).to(dtype)
    # make the positives a bit similar so losses are not all log(N)
    key[: min(batch, num_keys)] += query[: min(batch, num_keys)] * 0.5
    extra = {}
    if hard:
        extra["hard_negatives"] = (torch.randn(batch, hard, dim, generator=generator) * scale).to(dtype)
    if labels:
        extra["labels"] = torch.randint(0, labels, (batch,), generator=generator)
        extra["key_labels"] = torch.randint(0, labels, (num_keys,), generator=generator)
        extra["key_labels"][: min(batch, num_keys)] = extra["labels"][: min(batch, num_keys)]
    return query, key, extra


def run(backend, query, key, grad_seed=1, temperature=0.1, learn_temperature=True, **kwargs):
    """Loss and gradients (query, key, hard negatives, temperature) for one backend."""
    query = query.detach().clone().requires_grad_()
    key = key.detach().clone().requires_grad_()
    hard = kwargs.pop("hard_negatives", None)
    if hard is not None:
        hard = hard.detach().clone().requires_grad_()
    temp = torch.tensor(temperature, dtype=torch.float32, requires_grad=True) if learn_temperature else temperature
    loss = fastcl.info_nce(query, key, hard_negatives=hard, temperature=temp, backend=backend, **kwargs)
    if loss.dim() == 0:
        loss.backward()
    else:  # non-uniform grad_output for reduction="none"
        weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed)) + 0.5
        (loss * weights).sum().backward()
    grads = [query.grad, key.grad, hard.grad if hard is not None else None]
    grads.append(temp.grad if learn_temperature else None)
    return loss.detach(), grads


def assert_matches(backend, query, key, dtype=torch.float32, **kwargs):
    expected_loss, expected_grads = run("naive", query, key, **dict(kwargs))
    loss, grads = run(backend, query, key, **dict(kwargs))
    tol = TOLERANCE[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss, expected_loss, rtol=tol["loss"][0], atol=tol["loss"][1])
    names = ["query", "key", "hard_negatives", "temperature"]
    for name, got, want in zip(names, grads, expected_grads):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0, name
            continue
        assert got is not None, f"{name}: no gradient"
        assert got.dtype == want.dtype, name
        rtol, atol = tol["grad"]
        # gradients are sums of terms of size ~|x|/tau that may cancel: scale atol with 1/tau
        atol = atol * max(1.0, 0.1 / kwargs.get("temperature", 0.1))
        if name == "temperature":
            # -(1/tau) sum_ij g_ij s_ij: a sum of O(|s|) terms that nearly cancel, so the
            # rounding error is relative to |s| ~ 1/tau, not to the (small) result
            rtol, atol = max(rtol, 1e-4), max(atol, 1e-4 / kwargs.get("temperature", 0.1))
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * max(10.0, want.float().abs().max().item()),
                                   msg=lambda m: f"{backend} {name}: {m}")


# A sample of option combinations (pairwise coverage of the interacting options), not the
# full cross product.
CONFIGS = [
    dict(),
    dict(normalize=True),
    dict(hard=3),
    dict(hard=2, normalize=True, reduction="sum"),
    dict(symmetric=True),
    dict(symmetric=True, normalize=True, reduction="none"),
    dict(symmetric=True, labels=3, hard=2),
    dict(exclude_self=True, positive="shifted"),
    dict(labels=4),
    dict(labels=4, hard=2, reduction="none"),
    dict(labels=3, multi_positive="supcon"),
    dict(labels=3, multi_positive="supcon", exclude_self=True, reduction="none", hard=2),
    dict(labels=3, multi_positive="supcon", symmetric=True),
    dict(labels=3, multi_positive="pairwise"),
    dict(labels=3, multi_positive="pairwise", exclude_self=True, reduction="sum"),
    dict(labels=3, multi_positive="pairwise", symmetric=True, reduction="none", hard=2),
    dict(false_negative_margin=0.1),
    dict(false_negative_margin=0.0, hard=3, normalize=True),
    dict(false_negative_margin=0.2, symmetric=True, normalize=True),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.2, labels=3, hard=2, reduction="none"),
    dict(label_smoothing=0.1, symmetric=True, false_negative_margin=0.1),
    dict(positive="random", hard=1, labels=5),
]


def build_case(config, batch, num_keys, dim, dtype, seed=0):
    config = dict(config)
    hard = config.pop("hard", 0)
    labels = config.pop("labels", 0)
    positive = config.pop("positive", None)
    query, key, extra = make_inputs(batch, num_keys, dim, hard=hard, dtype=dtype, labels=labels, seed=seed)
    kwargs = dict(config, **extra)
    if positive == "shifted":
        kwargs["positive"] = (torch.arange(batch) + 1) % num_keys
        if batch == 1:
            kwargs["positive"] = torch.tensor([1 % num_keys])
    elif positive == "random":
        kwargs["positive"] = torch.randint(0, num_keys, (batch,), generator=torch.Generator().manual_seed(seed))
    return query, key, kwargs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_options_match_naive(backend, config, small_blocks):
    query, key, kwargs = build_case(config, 13, 17, 9, torch.float32)
    assert_matches(backend, query, key, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3], CONFIGS[5], CONFIGS[11], CONFIGS[15], CONFIGS[20]],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_dtypes_match_naive(backend, dtype, config):
    query, key, kwargs = build_case(config, 11, 19, 24, dtype)
    assert_matches(backend, query, key, dtype=dtype, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,num_keys,dim", [(1, 1, 3), (1, 5, 8), (37, 101, 3), (37, 37, 1000), (64, 64, 33)])
def test_odd_shapes(backend, batch, num_keys, dim, small_blocks):
    query, key, _ = make_inputs(batch, num_keys, dim)
    assert_matches(backend, query, key)
    if batch == num_keys:
        assert_matches(backend, query, key, symmetric=True, normalize=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sizes_agree(backend, monkeypatch):
    query, key, kwargs = build_case(dict(hard=2, labels=3, label_smoothing=0.1), 29, 41, 16, torch.float32)
    results = []
    for rows in ("1", "5", "29", "1000"):
        monkeypatch.setenv("FASTCL_BLOCK_ROWS", rows)
        results.append(run(backend, query, key, **dict(kwargs)))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for got, want in zip(grads, results[0][1]):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base_q = torch.randn(40, 2 * 24)
    base_k = torch.randn(24, 50)  # key as a transposed view
    query = base_q[::2, ::2]  # (20, 24), strided
    key = base_k.T  # (50, 24), column-major
    hard = torch.randn(3, 20, 24).transpose(0, 1)  # (20, 3, 24), non-contiguous
    assert not query.is_contiguous() and not key.is_contiguous() and not hard.is_contiguous()
    assert_matches(backend, query, key, hard_negatives=hard, normalize=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_temperature_and_no_grad(backend):
    query, key, _ = make_inputs(9, 12, 8)
    with torch.no_grad():
        loss = fastcl.info_nce(query, key, temperature=0.2, backend=backend)
    expected = naive.info_nce(query, key, temperature=0.2)
    torch.testing.assert_close(loss, expected)
    assert not loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scales_fused_gradients(backend):
    query, key, _ = make_inputs(10, 14, 8)
    q1, q2 = query.clone().requires_grad_(), query.clone().requires_grad_()
    (3.5 * fastcl.info_nce(q1, key, backend=backend)).backward()
    (3.5 * naive.info_nce(q2, key)).backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-5, atol=1e-5 * q2.grad.abs().max().item())
    assert q2.grad.abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite_and_exact(backend):
    # temperature 1e-4 on unnormalized inputs: logits around 1e4-1e5
    query, key, _ = make_inputs(12, 15, 16, dtype=torch.float64, scale=3.0)
    for kwargs in (dict(), dict(symmetric=True), dict(label_smoothing=0.1), dict(labels=2, multi_positive="pairwise")):
        if "labels" in kwargs:
            q, k, extra = make_inputs(12, 15, 16, dtype=torch.float64, scale=3.0, labels=2)
            kwargs = dict(kwargs, **{n: extra[n] for n in ("labels", "key_labels")})
        else:
            q, k = query, key
        loss, grads = run(backend, q, k, temperature=1e-4, **dict(kwargs))
        expected, expected_grads = run("naive", q, k, temperature=1e-4, **dict(kwargs))
        assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads if g is not None)
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-6)
        torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-7, atol=1e-6)
    # float32 too: no overflow
    q32, k32 = query.float(), key.float()
    loss = fastcl.info_nce(q32, k32, temperature=1e-4, backend=backend)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, naive.info_nce(q32, k32, temperature=1e-4), rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [dict(), dict(hard=2, normalize=True), dict(symmetric=True, label_smoothing=0.1),
                                    dict(labels=2, multi_positive="supcon", reduction="none"),
                                    dict(labels=2, multi_positive="pairwise", exclude_self=True),
                                    dict(false_negative_margin=0.3, hard=1)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_gradcheck_float64(backend, config):
    query, key, kwargs = build_case(config, 4, 5, 3, torch.float64, seed=3)
    hard = kwargs.pop("hard_negatives", None)
    inputs = [query.requires_grad_(), key.requires_grad_(), torch.tensor(0.3, dtype=torch.float64, requires_grad=True)]
    if hard is not None:
        inputs.append(hard.requires_grad_())

    def fn(q, k, t, h=None):
        return fastcl.info_nce(q, k, hard_negatives=h, temperature=t, backend=backend, **kwargs)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_auto_backend_is_native_on_cpu():
    from fastcl.ops.info_nce import resolve_backend

    expected = "cpu" if fastcl.backends()["cpu"].available else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected


def test_nt_xent_and_clip_match_definitions():
    z1, z2 = torch.randn(7, 10), torch.randn(7, 10)
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = z @ z.T / 0.5
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(7) + 7, torch.arange(7)])
    torch.testing.assert_close(fastcl.nt_xent(z1, z2, 0.5), F.cross_entropy(logits, target))
    image, text = F.normalize(torch.randn(9, 6), dim=-1), F.normalize(torch.randn(9, 6), dim=-1)
    logits = 30.0 * image @ text.T
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(9)) + F.cross_entropy(logits.T, torch.arange(9)))
    torch.testing.assert_close(fastcl.clip_loss(image, text, 30.0), expected)


def test_label_smoothing_matches_cross_entropy_when_nothing_is_masked():
    query, key, _ = make_inputs(8, 12, 5)
    logits = query @ key.T / 0.1
    expected = F.cross_entropy(logits, torch.arange(8), label_smoothing=0.15)
    for backend in BACKENDS:
        torch.testing.assert_close(fastcl.info_nce(query, key, temperature=0.1, label_smoothing=0.15, backend=backend), expected)
