"""Chunked SigLIP against the naive reference: loss and every gradient, dtypes, blocks."""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.ops.siglip import naive

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
