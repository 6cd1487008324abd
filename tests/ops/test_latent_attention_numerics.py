"""Latent attention on the inputs users pass: GELU and softmax at huge gates and gaps, a
non-finite token kept in its own sequence (both pooling branches), and a clear error for the
second derivative the fused backward does not give."""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl._native import backends

from .compare import no_subnormal

CPU_BACKENDS = ["torch"] + (["cpu"] if fastcl.backends()["cpu"].available else [])
native = pytest.mark.skipif(not backends()["cpu"].available, reason="native CPU kernels not built")


@native
def test_latent_attention_gelu_at_huge_gates():
    from fastcl.ops.latent_attention.native import NativeKernels

    kernels = NativeKernels()
    gate = torch.tensor([-3e4, -1e3, -40.0, -9.0, -5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 9.0, 40.0, 1e3, 3e4])
    value = torch.linspace(-2, 2, gate.numel())
    u = torch.cat([value, gate])[None].contiguous()
    expected_gated = value * F.gelu(gate)
    # the erf approximation is accurate to 1.5e-7 absolute (latent_attention.cpp), not relative
    torch.testing.assert_close(kernels.geglu_forward(u)[0], expected_gated, rtol=2e-6, atol=5e-7)
    leaf_value, leaf_gate = value.clone().requires_grad_(), gate.clone().requires_grad_()
    grad_gated = torch.linspace(0.5, 1.5, gate.numel())
    (leaf_value * F.gelu(leaf_gate)).backward(grad_gated)
    grad_u = kernels.geglu_backward(u, grad_gated[None].contiguous())[0]
    torch.testing.assert_close(grad_u[: gate.numel()], leaf_value.grad, rtol=2e-6, atol=5e-7)
    torch.testing.assert_close(grad_u[gate.numel():], leaf_gate.grad, rtol=2e-6, atol=1e-6)
    # softmax rows with gaps of 1e30: the others are exactly 0
    scores = torch.tensor([[0.0, -1e30, -1e10, -50.0, -1.0]])
    lse = kernels.softmax_forward(scores)
    # exp(-50) = 2e-22 is under the flush threshold (2^-64 of the row's largest): exactly 0
    torch.testing.assert_close(scores, torch.softmax(torch.tensor([[0.0, -1e30, -1e10, -50.0, -1.0]]), 1),
                               rtol=1e-6, atol=1e-19)
    assert scores[0, 3] == 0
    assert torch.isfinite(lse).all() and no_subnormal(scores)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_latent_attention_non_finite_token_stays_in_its_sequence(backend, bad, monkeypatch):
    from fastcl.ops.latent_attention import NaiveLatentAttentionPooling, latent_attention_pool

    monkeypatch.setenv("FASTCL_LATENT_CHUNK_TOKENS", "4")  # several chunks, the bad token in the first
    torch.manual_seed(0)
    module = NaiveLatentAttentionPooling(8, num_latents=4, num_heads=2, head_dim=4, ff_mult=1, normalize=False)
    hidden = torch.randn(3, 5, 8)
    hidden[0, 1, 2] = bad
    mask = torch.ones(3, 5)
    mask[2, -1] = 0
    results = {}
    for which in ("naive", backend):
        h = hidden.clone().requires_grad_()
        out = latent_attention_pool(h, mask, *module.flat_parameters(), num_heads=2, normalize=False, backend=which)
        out.sum().backward()
        results[which] = (out.detach(), h.grad)
    (out, grad), (ref_out, ref_grad) = results[backend], results["naive"]
    assert not torch.isfinite(ref_out[0]).all()  # the reference: sequence 0 is poisoned, the others not
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref_out))
    assert torch.equal(torch.isfinite(grad), torch.isfinite(ref_grad))
    torch.testing.assert_close(out[1:], ref_out[1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad[1:], ref_grad[1:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_latent_attention_double_backward_is_a_clear_error(backend):
    """The fused latent-attention backward is first order only: an error, never a silent zero."""
    from fastcl.ops.latent_attention import LatentAttentionPooling

    pool = LatentAttentionPooling(4, num_latents=2, num_heads=1, backend=backend)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    grad, = torch.autograd.grad(pool(hidden, torch.ones(2, 3)).sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.pow(2).sum().backward()


@pytest.mark.parametrize("host_check", [True, False], ids=["cpu_branch", "no_sync_branch"])
def test_masked_mean_keeps_non_finite_tokens_in_their_sequence(host_check):
    """Both branches of the chunk pooling (the GPU one runs here on CPU tensors) against a per-sequence sum."""
    from fastcl.ops.latent_attention.chunked import _masked_mean_add

    values = torch.randn(7, 5, dtype=torch.float64)
    values[1, 2], values[5, 0] = float("inf"), float("nan")
    sequence = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    weight = torch.rand(7, dtype=torch.float64)
    pooled = torch.zeros(5, 5, dtype=torch.float64)
    _masked_mean_add(pooled, values, sequence, weight, 5, host_check=host_check)
    want = torch.stack([(values[sequence == b] * weight[sequence == b, None]).sum(0) for b in range(5)])
    torch.testing.assert_close(pooled, want, equal_nan=True)
