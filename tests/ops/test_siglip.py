"""Chunked SigLIP against the naive reference: loss and every gradient, dtypes, blocks."""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.ops.siglip import naive

from .compare import record_calls

BACKENDS = ["torch"] + (["cpu"] if fastcl.backends()["cpu"].available else [])
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2),
             torch.float64: (1e-10, 1e-10)}


def _run(backend, image, text, scale, bias):
    tensors = [image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_(),
               scale.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
    if backend == "naive":
        loss = naive.siglip_loss(*tensors)
    else:
        loss = fastcl.siglip_loss(*tensors, backend=backend)
    (2.5 * loss).backward()
    return loss.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("batch,dim", [(1, 4), (13, 7), (37, 64)])
def test_siglip_matches_naive(backend, dtype, batch, dim, small_blocks):
    image = F.normalize(torch.randn(batch, dim), dim=-1).to(dtype)
    text = F.normalize(torch.randn(batch, dim), dim=-1).to(dtype)
    scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(12.0, dtype=scalar_dtype)
    bias = torch.tensor(-8.0, dtype=scalar_dtype)
    want_loss, want = _run("naive", image, text, scale, bias)
    got_loss, got = _run(backend, image, text, scale, bias)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got_loss, want_loss, rtol=max(rtol, 1e-5) if dtype != torch.float64 else rtol, atol=1e-5 if dtype != torch.float64 else atol)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * max(1.0, b.float().abs().max().item()))


def test_siglip_float_scale_and_gradcheck():
    image = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    text = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s, b: fastcl.siglip_loss(i, t, s, b, backend="torch"), (image, text, scale, bias))
    torch.testing.assert_close(fastcl.siglip_loss(image, text, 2.0, -1.0), naive.siglip_loss(image, text, 2.0, -1.0))


def _compile_cases():
    cases = list(BACKENDS)
    if fastcl.backends()["triton"].available:
        # on a GPU also `cuda`: benchmarks/gpu_check.sh runs `pytest -m cuda`
        marks = [pytest.mark.triton] + ([pytest.mark.cuda] if torch.cuda.is_available() else [])
        cases.append(pytest.param("triton", marks=marks))
    return cases


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", _compile_cases())
def test_siglip_compiles_without_graph_breaks(backend, compiler):
    torch._dynamo.reset()
    device = _device(backend)
    image, text = torch.randn(11, 6, device=device), torch.randn(11, 6, device=device)

    def loss_fn(image, text, scale, bias):
        return fastcl.siglip_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale.exp(), bias,
                                  backend=backend) * 3.0

    outputs = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend=compiler)):
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
                  torch.tensor(2.0, device=device, requires_grad=True), torch.tensor(-3.0, device=device, requires_grad=True)]
        loss = fn(*leaves)
        outputs.append((loss, torch.autograd.grad(loss, leaves)))
    (eager, eager_grads), (compiled, compiled_grads) = outputs
    expected = 3.0 * naive.siglip_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), torch.tensor(2.0).exp(), -3.0)
    torch.testing.assert_close(eager.cpu(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", _compile_cases())
@pytest.mark.parametrize("compute_grads", [True, False])
def test_siglip_opcheck(backend, compute_grads):
    device = _device(backend)
    args = (torch.randn(5, 4, device=device, requires_grad=True), torch.randn(5, 4, device=device, requires_grad=True),
            torch.tensor(4.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True), backend, compute_grads)
    torch.library.opcheck(torch.ops.fastcl.siglip_forward.default, args)


needs_native = pytest.mark.skipif(not fastcl.backends()["cpu"].available, reason="native CPU backend not built")


@pytest.fixture
def native_calls(monkeypatch):
    """Per call of the native SigLIP block kernel (the op looks it up when it runs): with_grad."""
    from fastcl.ops.siglip import native

    return record_calls(monkeypatch, native, "native_siglip_rows", "with_grad")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (100.0, -50.0), (300.0, 200.0)], ids=["unit", "large", "huge"])
def test_native_block_kernel_matches_naive_at_extreme_logits(dtype, scale, bias, small_blocks, native_calls):
    """Logits far into both tails (softplus ~ |z|, sigmoid ~ 0 or 1) and near 0, each row over
    several blocks: the kernel's exp and log1p against the naive loss."""
    image = F.normalize(torch.randn(23, 8), dim=-1).to(dtype)
    text = F.normalize(torch.randn(23, 8), dim=-1).to(dtype)
    text[:5] = image[:5]  # some positives at similarity 1
    scale_t, bias_t = torch.tensor(scale, dtype=dtype), torch.tensor(bias, dtype=dtype)
    want_loss, want = _run("naive", image, text, scale_t, bias_t)
    got_loss, got = _run("cpu", image, text, scale_t, bias_t)
    assert native_calls and all(native_calls), "the cpu backend did not run the native kernel with gradients"
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=atol)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


@needs_native
def test_native_block_kernel_without_gradients(native_calls):
    image, text = torch.randn(19, 6), torch.randn(19, 6)
    with torch.no_grad():
        got = fastcl.siglip_loss(image, text, 5.0, -2.0, backend="cpu")
    torch.testing.assert_close(got, naive.siglip_loss(image, text, 5.0, -2.0), rtol=1e-5, atol=1e-5)
    assert native_calls == [False]
