"""GPU backends (Triton compiled, native CUDA) against the naive reference, on a GPU.

The ``cuda``-marked tests need a CUDA device (tests/conftest.py skips them otherwise) and run
at medium shapes with odd sizes. The unmarked tests at the end check the Python glue of the
native CUDA backend on CPU, with the two kernel launchers replaced by a PyTorch emulation of
their documented contract (csrc/cuda/info_nce_cuda.h): the reductions, the symmetric
combination, the column-overflow fallback, normalization and the temperature gradient.
"""
import pytest
import torch

import fastcl
from fastcl.ops.info_nce import naive
from fastcl.ops.info_nce import native_cuda
from fastcl.ops.info_nce.op import info_nce_op
from fastcl.ops.info_nce.options import InfoNCEOptions

from .compare import assert_close

TOLERANCE = {  # (loss, gradients), relative to the largest reference magnitude
    torch.float32: (1e-4, 1e-3),  # TF32 may be on for the user's float32 products
    torch.float16: (2e-4, 5e-3),
    torch.bfloat16: (2e-4, 3e-2),
}
DTYPES = list(TOLERANCE)


def make_inputs(device, dtype, batch, num_keys, dim, hard, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, dim, generator=generator) / dim**0.5
    key = torch.randn(num_keys, dim, generator=generator) / dim**0.5
    key[:batch] += 0.5 * query
    tensors = {"query": query, "key": key}
    if hard:
        tensors["hard_negatives"] = torch.randn(batch, hard, dim, generator=generator) / dim**0.5
    return {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}


def compare(device, backend, dtype, sizes, options, tolerances=None):
    batch, num_keys, dim, hard = sizes
    tensors = make_inputs(device, dtype, batch, num_keys, dim, hard)
    options = dict(options)
    tensor_temperature = options.pop("tensor_temperature", False)
    results = []
    for which in (backend, "naive"):
        leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}
        temperature = torch.tensor(0.2, device=device, requires_grad=True) if tensor_temperature else 0.2
        if which == "naive":
            loss = naive.info_nce(**leaves, temperature=temperature, **options)
        else:
            loss = fastcl.info_nce(**leaves, temperature=temperature, backend=which, **options)
        grad_output = torch.tensor(1.3, device=device) if loss.dim() == 0 else torch.linspace(-1, 1, loss.numel(), device=device)
        inputs = list(leaves.values()) + ([temperature] if tensor_temperature else [])
        results.append((loss, torch.autograd.grad(loss, inputs, grad_output)))
    (loss, grads), (expected, expected_grads) = results
    loss_tolerance, grad_tolerance = tolerances or TOLERANCE[dtype]
    assert_close(loss, expected, loss_tolerance, f"{backend} loss")
    names = list(tensors) + (["temperature"] if tensor_temperature else [])
    for name, grad, reference in zip(names, grads, expected_grads):
        assert_close(grad, reference, grad_tolerance, f"{backend} d{name}")


GPU_CASES = [
    ("plain", (1000, 1000, 256, 0), {}),
    ("clip_tensor_temperature", (1031, 1031, 200, 0), {"symmetric": True, "tensor_temperature": True}),
    ("symmetric_extra_keys_none", (517, 1100, 96, 0), {"symmetric": True, "reduction": "none"}),
    ("hard_negatives_normalize_sum", (777, 900, 130, 3), {"normalize": True, "reduction": "sum", "tensor_temperature": True}),
    ("exclude_self_permuted", (600, 600, 64, 0), {"exclude_self": True, "positive": "rolled"}),
]
TRITON_ONLY_CASES = [
    ("labels_margin_smoothing", (700, 800, 128, 2), {"labels": 7, "false_negative_margin": 0.05, "label_smoothing": 0.1}),
    ("supcon_symmetric", (500, 520, 64, 0), {"labels": 9, "multi_positive": "supcon", "symmetric": True}),
    ("pairwise_hard", (400, 450, 72, 2), {"labels": 5, "multi_positive": "pairwise"}),
]


def _materialize(options, sizes, device):
    options = dict(options)
    batch, num_keys = sizes[0], sizes[1]
    if options.get("positive") == "rolled":
        options["positive"] = torch.roll(torch.arange(batch, device=device), 1)
    if "labels" in options:
        generator = torch.Generator().manual_seed(5)
        classes = options.pop("labels")
        options["labels"] = torch.randint(0, classes, (batch,), generator=generator).to(device)
        options["key_labels"] = torch.randint(0, classes, (num_keys,), generator=generator).to(device)
    return options


# Every case in bfloat16, the two main ones in every dtype: each (options, dtype) pair is one
# more Triton compilation, and the interpreter tests already cover every dtype x option sample.
TRITON_GPU_PARAMS = [(case, torch.bfloat16) for case in GPU_CASES + TRITON_ONLY_CASES] + [
    (case, dtype) for case in GPU_CASES[:2] for dtype in (torch.float32, torch.float16)
]


@pytest.mark.cuda
@pytest.mark.parametrize("case,dtype", TRITON_GPU_PARAMS,
                         ids=[f"{c[0]}-{str(d).replace('torch.', '')}" for c, d in TRITON_GPU_PARAMS])
def test_triton_on_gpu_matches_naive(case, dtype):
    if not fastcl.backends()["triton"].available:
        pytest.skip(fastcl.backends()["triton"].reason)
    _, sizes, options = case
    compare("cuda", "triton", dtype, sizes, _materialize(options, sizes, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_cuda_kernels_match_naive(case, dtype):
    if not fastcl.backends()["cuda"].available:
        pytest.skip(fastcl.backends()["cuda"].reason)
    _, sizes, options = case
    # the CUDA kernels multiply in fp32 (no rounding of the gradient block): tighter for fp16/bf16
    compare("cuda", "cuda", dtype, sizes, _materialize(options, sizes, "cuda"), (1e-4, 2e-2 if dtype == torch.bfloat16 else 2e-3))


@pytest.mark.cuda
def test_cuda_backend_rejects_options_it_lacks():
    if not fastcl.backends()["cuda"].available:
        pytest.skip(fastcl.backends()["cuda"].reason)
    q = torch.randn(8, 16, device="cuda")
    with pytest.raises(ValueError, match="label_smoothing.*backend='triton'"):
        fastcl.info_nce(q, q, label_smoothing=0.1, backend="cuda")


@pytest.mark.cuda
def test_auto_picks_triton_on_cuda_and_clip_loss_runs():
    if not fastcl.backends()["triton"].available:
        pytest.skip(fastcl.backends()["triton"].reason)
    from fastcl.ops.info_nce import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    image = torch.nn.functional.normalize(torch.randn(300, 64, device="cuda"), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(300, 64, device="cuda"), dim=-1)
    expected = naive.info_nce(image, text, temperature=1 / 14.3, symmetric=True)
    assert_close(fastcl.clip_loss(image, text, 14.3), expected, 1e-4, "clip_loss")


# ---- glue of the CUDA backend, on CPU with emulated launchers --------------------------------


def _fake_forward(problem, row_stats, column_shift, column_sums):
    q, k = problem.query.double(), problem.key.double()
    scores = q @ k.T * problem.inv_temperature
    masked = scores.clone()
    if problem.exclude_self:
        rows = torch.arange(q.shape[0])
        masked[rows, rows] = float("-inf")
    every = masked
    if problem.hard is not None:
        every = torch.cat([masked, torch.einsum("bd,bhd->bh", q, problem.hard.double()) * problem.inv_temperature], 1)
    row_stats[:, 0] = torch.logsumexp(every, 1).float()
    row_stats[:, 1] = scores.gather(1, problem.positive[:, None])[:, 0].float()
    if problem.column_anchors:
        anchors = problem.column_anchors
        column_sums += torch.exp(scores[:, :anchors] - column_shift[None, :].double()).sum(0).float()


def _fake_backward(problem, row_stats, row_weight, column_lse, column_weight, d_query, d_key, d_hard, dtemp):
    q, k = problem.query.double(), problem.key.double()
    inv_t = problem.inv_temperature
    scores = q @ k.T * inv_t
    lse = row_stats[:, 0].double()[:, None]
    probabilities = torch.exp(scores - lse)
    if problem.exclude_self:
        rows = torch.arange(q.shape[0])
        probabilities[rows, rows] = 0.0
    one_hot = torch.zeros_like(scores)
    one_hot[torch.arange(q.shape[0]), problem.positive] = 1.0
    grad = row_weight.double()[:, None] * (probabilities - one_hot)
    if problem.column_anchors:
        anchors = problem.column_anchors
        column = torch.exp(scores[:, :anchors] - column_lse.double()[None, :]) - torch.eye(q.shape[0], anchors, dtype=torch.float64)
        grad[:, :anchors] += column_weight.double()[None, :] * column
    d_query += (grad @ k * inv_t).float()
    d_key += (grad.T @ q * inv_t).float()
    dtemp[:] = (grad * scores).sum(1).float()
    if problem.hard is not None:
        h = problem.hard.double()
        hard_scores = torch.einsum("bd,bhd->bh", q, h) * inv_t
        hard_grad = row_weight.double()[:, None] * torch.exp(hard_scores - lse)
        d_query += (torch.einsum("bh,bhd->bd", hard_grad, h) * inv_t).float()
        d_hard[:] = (hard_grad[:, :, None] * q[:, None, :] * inv_t).float()
        dtemp += (hard_grad * hard_scores).sum(1).float()


GLUE_CASES = [
    ({}, (13, 17, 8, 0)),
    ({"symmetric": True, "reduction": "none"}, (13, 19, 8, 0)),
    ({"symmetric": True, "normalize": True}, (13, 13, 8, 2)),
    ({"exclude_self": True, "reduction": "sum", "normalize": True}, (13, 13, 8, 3)),
]


@pytest.mark.parametrize("options,sizes", GLUE_CASES)
def test_cuda_glue_matches_naive_with_emulated_kernels(monkeypatch, options, sizes):
    monkeypatch.setattr(native_cuda, "launch_forward", _fake_forward)
    monkeypatch.setattr(native_cuda, "launch_backward", _fake_backward)
    batch, num_keys, dim, hard = sizes
    tensors = make_inputs("cpu", torch.float32, batch, num_keys, dim, hard)
    positive = torch.roll(torch.arange(batch), 2) if options.get("exclude_self") else None
    results = []
    for which in ("glue", "naive"):
        leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}
        temperature = torch.tensor(0.3, requires_grad=True)
        if which == "glue":
            full = InfoNCEOptions(**options)
            # the registered custom op with backend="cuda": the same path as fastcl.info_nce on a GPU
            loss = info_nce_op(leaves["query"], leaves["key"], leaves.get("hard_negatives"), temperature, positive,
                               None, None, full, "cuda")
        else:
            loss = naive.info_nce(**leaves, temperature=temperature, positive=positive, **options)
        grad_output = torch.tensor(0.8) if loss.dim() == 0 else torch.linspace(-1, 1, loss.numel())
        results.append((loss, torch.autograd.grad(loss, list(leaves.values()) + [temperature], grad_output)))
    (loss, grads), (expected, expected_grads) = results
    assert_close(loss, expected, 1e-5, "loss")
    for grad, reference in zip(grads, expected_grads):
        assert_close(grad, reference, 1e-4, "gradient")


def test_cuda_glue_column_overflow_fallback(monkeypatch):
    calls = []

    def counting_forward(problem, row_stats, column_shift, column_sums):
        calls.append(problem.column_anchors)
        _fake_forward(problem, row_stats, column_shift, column_sums)

    monkeypatch.setattr(native_cuda, "launch_forward", counting_forward)
    monkeypatch.setattr(native_cuda, "launch_backward", _fake_backward)
    query = torch.randn(11, 8)
    key = -query  # diagonal far below the rest at a tiny temperature: shifted sums overflow
    loss = info_nce_op(query, key, None, 0.002, None, None, None, InfoNCEOptions(symmetric=True, normalize=True), "cuda")
    assert calls == [11, 0], "expected the fused pass, then the column direction on its own"
    assert_close(loss, naive.info_nce(query, key, temperature=0.002, symmetric=True, normalize=True), 1e-5, "loss")


def test_cuda_backend_names_the_unsupported_options():
    options = InfoNCEOptions(multi_positive="supcon", label_smoothing=0.0, margin=0.1)
    with pytest.raises(ValueError, match=r"multi_positive='supcon'.*labels.*false_negative_margin.*backend='triton'"):
        native_cuda.check_cuda_options(torch.randn(4, 8), options, torch.zeros(4, dtype=torch.long))


def test_cuda_glue_compiles_without_graph_breaks(monkeypatch):
    """backend="cuda" runs inside the registered op: a fullgraph compile traces through it."""
    monkeypatch.setattr(native_cuda, "launch_forward", _fake_forward)
    monkeypatch.setattr(native_cuda, "launch_backward", _fake_backward)
    torch._dynamo.reset()
    options = InfoNCEOptions(symmetric=True, normalize=True)

    def loss_fn(query, key, temperature):
        return info_nce_op(query, key, None, temperature, None, None, None, options, "cuda") * 2.0

    tensors = make_inputs("cpu", torch.float32, 9, 9, 8, 0)
    outputs = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        leaves = [tensors["query"].clone().requires_grad_(), tensors["key"].clone().requires_grad_(),
                  torch.tensor(0.3, requires_grad=True)]
        loss = fn(*leaves)
        outputs.append((loss, torch.autograd.grad(loss, leaves)))
    (compiled, compiled_grads), (eager, eager_grads) = outputs[1], outputs[0]
    expected = 2.0 * naive.info_nce(tensors["query"], tensors["key"], temperature=0.3, symmetric=True, normalize=True)
    assert_close(eager, expected, 1e-5, "eager loss")
    assert_close(compiled, eager, 1e-6, "compiled loss")
    for got, want in zip(compiled_grads, eager_grads):
        assert_close(got, want, 1e-6, "compiled gradient")
