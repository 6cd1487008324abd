"""Property-based sweep of the numerics contract: input scale (norms 1e-3 .. 1e3),
temperature (1e-6 .. 10), dtypes, every option family of info_nce, clip_loss, nt_xent and
siglip_loss, on every CPU backend (torch, cpu, auto), with NaN / +-inf injected now and then.

In float64 the loss and every gradient match the naive reference where it is finite and are
non-finite exactly where it is not. In float32 the same finiteness pattern is required, and the
values are compared where the scores stay moderate (|s| <= 100; beyond, float32 itself cannot
tell the two apart). The example budget keeps the sweep near 30 s on a 2-core machine.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcl
from fastcl._native import backends
from fastcl.ops.info_nce import naive
from fastcl.ops.siglip import naive as siglip_naive

from .compare import assert_like_naive

BACKENDS = ["torch", "auto"] + (["cpu"] if backends()["cpu"].available else [])
FUNCTIONS = ["info_nce", "clip_loss", "nt_xent", "siglip_loss"]
SWEEP = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _rows(generator, count, dim, scale, dtype):
    """(count, dim) rows whose norms spread over a decade around ``scale``."""
    x = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    norms = scale * 10 ** (torch.rand(count, 1, generator=generator, dtype=torch.float64) - 0.5)
    return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-300) * norms).to(dtype)


@st.composite
def problems(draw):
    function = draw(st.sampled_from(FUNCTIONS))
    dtype = draw(st.sampled_from([torch.float64, torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    scale = 10 ** draw(st.floats(-3, 3))
    temperature = 10 ** draw(st.floats(-6, 1))
    batch = draw(st.integers(1, 9))
    dim = draw(st.integers(1, 12))
    problem = dict(function=function, dtype=dtype, tensors={}, kwargs={}, poison=None)
    tensors, kwargs = problem["tensors"], problem["kwargs"]
    if function == "info_nce":
        symmetric = draw(st.booleans())
        num_keys = draw(st.integers(batch if symmetric else 1, 12))
        tensors["query"] = _rows(generator, batch, dim, scale, dtype)
        tensors["key"] = _rows(generator, num_keys, dim, scale, dtype)
        kwargs.update(symmetric=symmetric, normalize=draw(st.booleans()),
                      reduction=draw(st.sampled_from(["mean", "sum", "none"])))
        mode = draw(st.sampled_from(["mask", "mask", "supcon", "pairwise"]))
        kwargs["multi_positive"] = mode
        if not symmetric and draw(st.booleans()):
            tensors["hard_negatives"] = _rows(generator, batch * 2, dim, scale, dtype).reshape(batch, 2, dim)
        if mode != "mask" or draw(st.booleans()):
            classes = draw(st.integers(1, 4))
            kwargs["labels"] = torch.randint(0, classes, (batch,), generator=generator)
            kwargs["key_labels"] = torch.randint(0, classes, (num_keys,), generator=generator)
        if mode == "mask":
            if not symmetric and (num_keys < batch or draw(st.booleans())):
                positive = torch.randint(0, num_keys, (batch,), generator=generator)
                if num_keys > 1 and draw(st.booleans()):
                    rows = torch.arange(batch)
                    positive = torch.where(positive == rows, (positive + 1) % num_keys, positive)
                    kwargs["exclude_self"] = True
                kwargs["positive"] = positive
            if draw(st.booleans()):
                kwargs["false_negative_margin"] = draw(st.floats(-0.5, 1.0)) * scale * scale
            if draw(st.booleans()):
                kwargs["label_smoothing"] = draw(st.floats(0.0, 0.5))
        elif not symmetric:
            kwargs["exclude_self"] = draw(st.booleans())
        problem["temperature"] = temperature
    elif function == "siglip_loss":
        tensors["image_features"] = _rows(generator, batch, dim, scale, dtype)
        tensors["text_features"] = _rows(generator, batch, dim, scale, dtype)
        problem["logit_scale"] = 1.0 / temperature
        problem["logit_bias"] = draw(st.floats(-20, 20))
    else:
        tensors["a"] = _rows(generator, batch, dim, scale, dtype)
        tensors["b"] = _rows(generator, batch, dim, scale, dtype)
        problem["temperature"] = temperature
    problem["learn_scalars"] = draw(st.booleans())
    if draw(st.integers(0, 4)) == 0:  # a NaN or +-inf somewhere
        name = draw(st.sampled_from(sorted(tensors)))
        flat_index = draw(st.integers(0, tensors[name].numel() - 1))
        problem["poison"] = (name, flat_index, draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    return problem


def _call(backend, problem):
    """(outputs, leaves): the loss and the gradients of every tensor input."""
    tensors = {name: t.clone() for name, t in problem["tensors"].items()}
    if problem["poison"] is not None:
        name, index, value = problem["poison"]
        tensors[name].view(-1)[index] = value
    leaves = {name: t.requires_grad_() for name, t in tensors.items()}
    scalars = {}
    for name in ("temperature", "logit_scale", "logit_bias"):
        if name in problem:
            value = problem[name]
            scalars[name] = torch.tensor(value, dtype=torch.float64, requires_grad=True) if problem["learn_scalars"] \
                else value
    kwargs = dict(problem["kwargs"])
    function = problem["function"]
    extra = {} if backend == "naive" else {"backend": backend}
    if function == "info_nce":
        fn = naive.info_nce if backend == "naive" else fastcl.info_nce
        loss = fn(leaves["query"], leaves["key"], hard_negatives=leaves.get("hard_negatives"),
                  temperature=scalars["temperature"], **kwargs, **extra)
    elif function == "siglip_loss":
        fn = siglip_naive.siglip_loss if backend == "naive" else fastcl.siglip_loss
        loss = fn(leaves["image_features"], leaves["text_features"], scalars["logit_scale"], scalars["logit_bias"],
                  **extra)
    elif function == "clip_loss":
        scale = 1.0 / scalars["temperature"]
        if backend == "naive":
            loss = naive.info_nce(leaves["a"], leaves["b"], temperature=1.0 / scale, symmetric=True)
        else:
            loss = fastcl.clip_loss(leaves["a"], leaves["b"], scale, **extra)
    else:  # nt_xent against its definition: the 2B views, self excluded
        if backend == "naive":
            views = torch.cat([leaves["a"], leaves["b"]])
            batch = leaves["a"].shape[0]
            index = torch.arange(batch)
            loss = naive.info_nce(views, views, positive=torch.cat([index + batch, index]),
                                  temperature=scalars["temperature"], normalize=True, exclude_self=True)
        else:
            loss = fastcl.nt_xent(leaves["a"], leaves["b"], scalars["temperature"], **extra)
    inputs = list(leaves.values()) + [s for s in scalars.values() if isinstance(s, torch.Tensor)]
    grad_output = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad(loss, inputs, grad_output, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return [loss, *grads]


def _score_bound(problem):
    """(a bound on |score|, the inverse temperature / logit scale)."""
    scale = max(float(t.abs().max()) for t in problem["tensors"].values())
    inverse = problem.get("logit_scale") or 1.0 / problem["temperature"]
    if problem["kwargs"].get("normalize") or problem["function"] == "nt_xent":
        scale = 1.0
    return scale * scale * inverse * 12 + abs(problem.get("logit_bias", 0.0)), inverse


def _moderate_scores(problem) -> bool:
    return _score_bound(problem)[0] <= 100


@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(problem=problems())
def test_contract_sweep(backend, problem):
    expected = _call("naive", problem)
    actual = _call(backend, problem)
    names = ["loss"] + list(problem["tensors"]) + ["scalar", "scalar"]
    compare_values = problem["dtype"] == torch.float64 or _moderate_scores(problem)
    rtol = 1e-7 if problem["dtype"] == torch.float64 else 2e-3
    # the scale of the problem: the largest finite output; a gradient that is 0 but for
    # rounding (a loss constant in that input) is compared against it
    floor = max((float(e.detach()[torch.isfinite(e.detach())].abs().max()) for e in expected
                 if torch.isfinite(e.detach()).any()), default=0.0) * 1e-3
    # a temperature / scale gradient sums score-sized terms times 1/tau: its rounding is that big
    bound, inverse = _score_bound(problem)
    scalar_floor = max(floor, 1e-3 * (bound * inverse + bound + 1.0))
    # an input's gradient is of order (1/tau) x (the other inputs' size), or (1/tau) / |x| when
    # normalized: a loss constant in that input (one key, ties) leaves only rounding below that
    largest = max(float(t.abs().max()) for t in problem["tensors"].values())
    smallest_norm = min(float(t.reshape(-1, t.shape[-1]).norm(dim=-1).min()) for t in problem["tensors"].values())
    normalized = problem["kwargs"].get("normalize") or problem["function"] == "nt_xent"
    natural = inverse / max(smallest_norm, 1e-300) if normalized else inverse * largest
    floor = max(floor, 1e-3 * natural)
    for index, (name, a, e) in enumerate(zip(names, actual, expected)):
        if compare_values:
            scalar = index > len(problem["tensors"])
            assert_like_naive(a, e, f"{problem['function']} {backend} {name}", rtol,
                              scalar_floor if scalar else floor)
        else:
            finite = torch.isfinite(e.detach())
            assert torch.equal(torch.isfinite(a.detach()), finite), f"{backend} {name}: finiteness differs"
