"""Latent-attention pooling: every backend against the naive reference (fastcl/ops/latent_attention/naive.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton kernels run in the CPU interpreter (must be set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastcl  # noqa: E402
from fastcl.ops.latent_attention import (  # noqa: E402
    LatentAttentionPooling,
    NaiveLatentAttentionPooling,
    latent_attention_pool,
    naive,
)

NATIVE = fastcl.backends()["cpu"].available
TRITON = fastcl.backends()["triton"].available
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not NATIVE, reason="native kernels not built")),
    pytest.param("triton", marks=[pytest.mark.triton,
                                  pytest.mark.skipif(not TRITON, reason="triton unavailable (needs CUDA or TRITON_INTERPRET=1)")]),
]

# Odd sizes on purpose: d, r, heads and head size that are not powers of two, head_dim != d.
SHAPES = [
    dict(batch=3, length=7, hidden=24, latents=10, heads=3, head_dim=8, ff_mult=2),
    dict(batch=2, length=5, hidden=13, latents=1, heads=1, head_dim=None, ff_mult=1),
    dict(batch=1, length=9, hidden=16, latents=33, heads=2, head_dim=5, ff_mult=3),
]

NV_EMBED_KEYS = {
    "latents",
    "cross_attend_blocks.0.norm.weight", "cross_attend_blocks.0.norm.bias",
    "cross_attend_blocks.0.norm_context.weight", "cross_attend_blocks.0.norm_context.bias",
    "cross_attend_blocks.0.fn.to_q.weight", "cross_attend_blocks.0.fn.to_kv.weight",
    "cross_attend_blocks.0.fn.to_out.weight",
    "cross_attend_blocks.1.norm.weight", "cross_attend_blocks.1.norm.bias",
    "cross_attend_blocks.1.fn.net.0.weight", "cross_attend_blocks.1.fn.net.0.bias",
    "cross_attend_blocks.1.fn.net.2.weight", "cross_attend_blocks.1.fn.net.2.bias",
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Several token chunks even at test sizes, so the chunk loop and its accumulators are exercised."""
    monkeypatch.setenv("FASTCL_LATENT_CHUNK_TOKENS", "4")


def _module(shape, dtype=torch.float32, normalize=True):
    module = NaiveLatentAttentionPooling(shape["hidden"], num_latents=shape["latents"], num_heads=shape["heads"],
                                         head_dim=shape["head_dim"], ff_mult=shape["ff_mult"], normalize=normalize)
    with torch.no_grad():  # non-trivial norms and biases so their gradients are checked too
        for parameter in module.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.3 * torch.randn_like(parameter))
            else:
                parameter.mul_(2.0)
    return module.to(dtype)


def _inputs(shape, dtype=torch.float32):
    hidden = torch.randn(shape["batch"], shape["length"], shape["hidden"]).to(dtype)
    mask = torch.ones(shape["batch"], shape["length"])
    mask[0, -2:] = 0  # trailing padding
    if shape["batch"] > 1:
        mask[-1, :1] = 0  # leading exclusion (an instruction token)
    return hidden, mask


def _run(module, hidden, mask, backend, grad_output):
    """(output, dL/dhidden, [dL/dparameter ...]) for L = sum(output * grad_output)."""
    hidden = hidden.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in module.flat_parameters()]
    out = latent_attention_pool(hidden, mask, *params, num_heads=module.num_heads, normalize=module.normalize,
                                backend=backend)
    (out.float() * grad_output).sum().backward()
    return out.detach(), hidden.grad, [p.grad for p in params]


def _reference(module, hidden, mask, grad_output):
    """The naive module in float64: the ground truth."""
    return _run(module.double(), hidden.double(), mask, "naive", grad_output.double())


def _max_error(got, want):
    """Max error of each result relative to the reference's largest magnitude (floor 1e-3, so a
    gradient that is zero in exact arithmetic is compared in absolute terms)."""
    out, grad_hidden, grads = got
    ref_out, ref_hidden, ref_grads = want
    errors = [(out.double() - ref_out).abs().max() / ref_out.abs().max().clamp_min(1e-3),
              (grad_hidden.double() - ref_hidden).abs().max() / ref_hidden.abs().max().clamp_min(1e-3)]
    errors += [(g.double() - r).abs().max() / r.abs().max().clamp_min(1e-3) for g, r in zip(grads, ref_grads)]
    return torch.stack(errors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s['hidden']}-r{s['latents']}-h{s['heads']}")
def test_backend_matches_naive_float32(backend, shape, small_chunks):
    module = _module(shape)
    hidden, mask = _inputs(shape)
    grad_output = torch.randn(shape["batch"], shape["hidden"])  # not all ones
    want = _reference(module, hidden, mask, grad_output)
    got = _run(module.float(), hidden, mask, backend, grad_output)
    errors = _max_error(got, want)
    assert got[1][0, -2:].abs().max() == 0, "padding tokens must get no gradient"
    assert errors.max() < 2e-5, f"relative errors (out, dh, params...) {errors.tolist()}"


# Low precision: our error against the float64 truth may be at most this multiple of the error
# PyTorch's own eager module makes at that precision (plus a floor for near-exact cases).
LOW_PRECISION = {torch.bfloat16: (3.0, 2e-2), torch.float16: (3.0, 4e-3)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_within_eager_error(backend, dtype, small_chunks):
    shape = SHAPES[0]
    module = _module(shape)
    hidden, mask = _inputs(shape)
    grad_output = torch.randn(shape["batch"], shape["hidden"])
    want = _reference(module, hidden, mask, grad_output)
    eager = _run(module.to(dtype), hidden.to(dtype), mask, "naive", grad_output)
    got = _run(module.to(dtype), hidden.to(dtype), mask, backend, grad_output)
    assert got[0].dtype == dtype and got[1].dtype == dtype and all(g.dtype == dtype for g in got[2])
    factor, floor = LOW_PRECISION[dtype]
    ours, theirs = _max_error(got, want), _max_error(eager, want)
    assert (ours <= factor * theirs + floor).all(), f"ours {ours.tolist()} vs eager {theirs.tolist()}"


def test_gradcheck_float64():
    """Analytical gradients of the fused path against finite differences (independent of naive)."""
    shape = dict(batch=2, length=3, hidden=6, latents=4, heads=2, head_dim=3, ff_mult=1)
    module = _module(shape, torch.float64)
    hidden, mask = _inputs(shape, torch.float64)
    params = [p.detach().clone().requires_grad_() for p in module.flat_parameters()]
    hidden.requires_grad_()

    def function(h, *p):
        return latent_attention_pool(h, mask, *p, num_heads=2, backend="torch")

    assert torch.autograd.gradcheck(function, (hidden, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["naive", *BACKENDS])
def test_padding_invariance(backend):
    """Extra padding tokens (any values) change neither the output nor the gradients of real tokens."""
    shape = SHAPES[0]
    module = _module(shape)
    hidden, mask = _inputs(shape)
    grad_output = torch.randn(shape["batch"], shape["hidden"])
    base = _run(module, hidden, mask, backend, grad_output)
    padded_hidden = torch.cat([hidden, 50 * torch.randn(shape["batch"], 4, shape["hidden"])], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(shape["batch"], 4)], dim=1)
    padded = _run(module, padded_hidden, padded_mask, backend, grad_output)
    torch.testing.assert_close(padded[0], base[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded[1][:, :shape["length"]], base[1], atol=1e-6, rtol=1e-5)
    assert padded[1][:, shape["length"]:].abs().max() == 0
    for got, want in zip(padded[2], base[2]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_excluded_tokens_do_not_reach_the_output():
    """Tokens with pool weight 0 (e.g. the instruction) do not change the pooled embedding."""
    shape = SHAPES[0]
    module = LatentAttentionPooling(shape["hidden"], num_latents=shape["latents"], num_heads=shape["heads"],
                                    head_dim=shape["head_dim"], ff_mult=shape["ff_mult"])
    hidden, mask = _inputs(shape)
    changed = hidden.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum()), shape["hidden"])
    torch.testing.assert_close(module(changed, mask), module(hidden, mask))
    changed[0, 0] += 1.0  # a pooled token does
    assert not torch.allclose(module(changed, mask), module(hidden, mask))


def test_state_dict_uses_nv_embed_names_and_reproduces_reference():
    shape = SHAPES[0]
    reference = _module(shape)
    checkpoint = {f"latent_attention_model.{k}": v.clone() for k, v in reference.state_dict().items()}
    module = LatentAttentionPooling(shape["hidden"], num_latents=shape["latents"], num_heads=shape["heads"],
                                    head_dim=shape["head_dim"], ff_mult=shape["ff_mult"])
    assert set(module.state_dict()) == NV_EMBED_KEYS
    prefix = "latent_attention_model."
    module.load_state_dict({k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)})
    hidden, mask = _inputs(shape)
    expected = naive.latent_attention_pool(hidden.double(), mask, *(p.double() for p in reference.flat_parameters()),
                                           num_heads=shape["heads"])
    torch.testing.assert_close(module(hidden, mask).double(), expected, atol=1e-5, rtol=1e-5)


def test_module_defaults_follow_nv_embed():
    module = LatentAttentionPooling(32)
    assert module.num_latents == 512 and module.num_heads == 8 and module.head_dim == 32
    sizes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert sizes["cross_attend_blocks.0.fn.to_q.weight"] == (8 * 32, 32)
    assert sizes["cross_attend_blocks.0.fn.to_kv.weight"] == (2 * 8 * 32, 32)
    assert sizes["cross_attend_blocks.1.fn.net.0.weight"] == (2 * 4 * 32, 32)
    assert sizes["cross_attend_blocks.1.fn.net.2.weight"] == (32, 4 * 32)
    out = module(torch.randn(2, 3, 32), torch.ones(2, 3))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_unnormalized_output_is_the_masked_mean():
    """normalize=False: the output is the plain masked mean (checked through the naive maths)."""
    shape = SHAPES[2]
    module = _module(shape, normalize=False)
    hidden, mask = _inputs(shape)
    out = latent_attention_pool(hidden, mask, *module.flat_parameters(), num_heads=shape["heads"], normalize=False)
    expected = module(hidden, mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(out.norm(dim=-1), torch.ones(1))


def test_auto_never_picks_naive_and_runs_fused():
    from fastcl.ops.latent_attention import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")


def _args(shape=SHAPES[0]):
    module = _module(shape)
    hidden, mask = _inputs(shape)
    return hidden, mask, list(module.flat_parameters())


@pytest.mark.parametrize("mutate, error, match", [
    (lambda h, m, p: (h[0], m, p), ValueError, r"hidden_states must have shape \(B, L, d\)"),
    (lambda h, m, p: (h.long(), m, p), TypeError, "hidden_states must be float16"),
    (lambda h, m, p: (h, m[:, :-1], p), ValueError, r"pool_mask must have shape \(B, L\) = \(3, 7\)"),
    (lambda h, m, p: (h, torch.zeros_like(m), p), ValueError, "selects no token in sequence"),
    (lambda h, m, p: (h, m, [p[0][:, :-1]] + p[1:]), ValueError, r"latents must have shape \(num_latents, d\) = \(10, 24\)"),
    (lambda h, m, p: (h, m, p[:5] + [p[5][:-1]] + p[6:]), ValueError, "to_q_weight must have shape"),
    (lambda h, m, p: (h, m, p[:6] + [p[6][:-2]] + p[7:]), ValueError, r"to_kv_weight must have shape \(2\*num_heads\*head_dim, d\)"),
    (lambda h, m, p: (h, m, p[:11] + [p[11].double()] + p[12:]), TypeError, "ff_in_bias has dtype torch.float64"),
])
def test_bad_input_raises_clear_error(mutate, error, match):
    hidden, mask, params = mutate(*_args())
    with pytest.raises(error, match=match):
        latent_attention_pool(hidden, mask, *params, num_heads=3)


def test_bad_options_raise():
    hidden, mask, params = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        latent_attention_pool(hidden, mask, *params, num_heads=3, backend="gpu")
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        latent_attention_pool(hidden, mask, *params, num_heads=0)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        LatentAttentionPooling(8, head_dim=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_on_gpu_matches_naive(dtype, small_chunks):
    shape = dict(batch=3, length=37, hidden=64, latents=48, heads=4, head_dim=32, ff_mult=2)
    module = _module(shape)
    hidden, mask = _inputs(shape)
    grad_output = torch.randn(shape["batch"], shape["hidden"])
    want = _reference(module, hidden, mask, grad_output)
    eager = _run(module.to("cuda", dtype), hidden.to("cuda", dtype), mask.cuda(), "naive", grad_output.cuda())
    got = _run(module.to("cuda", dtype), hidden.to("cuda", dtype), mask.cuda(), "triton", grad_output.cuda())
    to_cpu = lambda result: (result[0].cpu(), result[1].cpu(), [g.cpu() for g in result[2]])  # noqa: E731
    ours, theirs = _max_error(to_cpu(got), want), _max_error(to_cpu(eager), want)
    factor, floor = LOW_PRECISION.get(dtype, (3.0, 1e-4))
    assert (ours <= factor * theirs + floor).all(), f"ours {ours.tolist()} vs eager {theirs.tolist()}"


def test_naive_sdpa_variant_matches_explicit_softmax():
    """The benchmark's second eager baseline computes the same function."""
    shape = SHAPES[0]
    module = _module(shape, torch.float64)
    hidden, mask = _inputs(shape, torch.float64)
    explicit = naive.latent_attention_pool(hidden, mask, *module.flat_parameters(), num_heads=3)
    fused_sdpa = naive.latent_attention_pool(hidden, mask, *module.flat_parameters(), num_heads=3, use_sdpa=True)
    torch.testing.assert_close(fused_sdpa, explicit)


def _saved_elements(run):
    """Elements autograd saves for backward during ``run()``, excluding the inputs and parameters."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        keep = run()
    return saved, keep


def test_backward_keeps_no_per_token_activation_of_the_wide_layers():
    """The fused op saves O(tokens x d) plus per-call products, never (tokens x H*r) or (tokens x 2F)."""
    shape = dict(batch=4, length=64, hidden=16, latents=64, heads=4, head_dim=16, ff_mult=4)
    tokens = shape["batch"] * shape["length"]
    module = _module(shape)
    hidden = torch.randn(shape["batch"], shape["length"], shape["hidden"], requires_grad=True)
    mask = torch.ones(shape["batch"], shape["length"])
    params = list(module.flat_parameters())
    inputs = {t.data_ptr() for t in [hidden, *params]}
    wide = min(tokens * shape["heads"] * shape["latents"], tokens * 2 * shape["ff_mult"] * shape["hidden"])

    def extra(backend):
        saved, keep = _saved_elements(lambda: latent_attention_pool(hidden, mask, *params, num_heads=4, backend=backend))
        unique = {t.data_ptr(): t.numel() for t in saved if t.data_ptr() not in inputs}
        return sum(unique.values()), max(unique.values()), keep

    fused_total, fused_largest, _ = extra("cpu" if NATIVE else "torch")
    naive_total, naive_largest, _ = extra("naive")
    assert naive_largest >= wide  # the measure sees the eager activations
    assert fused_total < wide, f"fused path saved {fused_total} elements, one wide activation is {wide}"
    assert fused_total < naive_total / 5


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_random_shapes_and_masks(backend):
    """Hypothesis over sizes and masks (small budget): fused output and gradients equal the naive ones."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
    @hypothesis.given(batch=st.integers(1, 3), length=st.integers(1, 6), hidden=st.integers(2, 12),
                      latents=st.integers(1, 9), heads=st.integers(1, 3), head_dim=st.integers(1, 6),
                      ff_mult=st.integers(1, 2), chunk=st.integers(1, 5), seed=st.integers(0, 2**16))
    def check(batch, length, hidden, latents, heads, head_dim, ff_mult, chunk, seed):
        torch.manual_seed(seed)
        shape = dict(batch=batch, length=length, hidden=hidden, latents=latents, heads=heads, head_dim=head_dim,
                     ff_mult=ff_mult)
        module = _module(shape)
        hidden_states = torch.randn(batch, length, hidden)
        mask = (torch.rand(batch, length) < 0.6).float()
        mask[:, torch.randint(length, (1,))] = 1  # every sequence pools at least one token
        grad_output = torch.randn(batch, hidden)
        os.environ["FASTCL_LATENT_CHUNK_TOKENS"] = str(chunk)
        try:
            got = _run(module.float(), hidden_states, mask, backend, grad_output)
        finally:
            del os.environ["FASTCL_LATENT_CHUNK_TOKENS"]
        want = _reference(module, hidden_states, mask, grad_output)
        errors = _max_error(got, want)
        assert errors.max() < 5e-5, errors.tolist()

    check()


@pytest.mark.triton
def test_triton_kernels_compile_for_h100_without_a_gpu():
    """The interpreter does not check GPU lowering: compile every kernel to an sm_90 cubin (bf16).

    In a fresh process without TRITON_INTERPRET (benchmarks/triton_compile_check.py): under the
    interpreter triton's own library functions (tl.max, tl.sum) are interpreter objects, so this
    process cannot compile kernels that call them. The check compiles into a cache of its own,
    so a cubin cached by an earlier run cannot stand in for the compile.
    """
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        pytest.skip(f"this triton has no offline compile API ({error})")
    from fastcl.ops.latent_attention import triton as kernels

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_compile_check.py"
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(script), "--arch", "90", "--dtype", "bfloat16", "--only", "latent_attention"],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    compiled = re.findall(r"^sm_90 (latent .*?)\s+bfloat16\s+ok\b", result.stdout, flags=re.MULTILINE)
    kernel_names = [name for name in vars(kernels) if name.startswith("latent_attention_") and "_kernel_" in name]
    assert kernel_names and len(compiled) == len(kernel_names), (triton.__version__, compiled, output)
