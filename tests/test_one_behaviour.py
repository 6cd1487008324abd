"""Every public loss behaves the same at every batch size, whichever implementation ``auto`` runs
(B = 64 materializes the logits on the CPU; B = 2048 runs the native kernels): torch.func.grad
and vmap work and equal eager autograd, autocast gives float32 losses from the autocast-dtype
inputs, and an empty input gets an (empty) zero gradient, never None or an error."""
import pytest
import torch
import torch.nn.functional as F

import fastcl

SIZES = [64, 2048]
DIM = 16


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _losses(batch):
    """name -> (loss of a tuple of differentiable tensors, the tensors)."""
    q, k = _unit(batch, DIM, seed=1), _unit(batch, DIM, seed=2)
    windows = _unit(batch, 4, DIM, seed=3)
    pages = _unit(max(2, batch // 16), 16, DIM, seed=4)
    clicks = torch.randint(0, 3, pages.shape[:2], generator=torch.Generator().manual_seed(5))
    bank = _unit(32, DIM, seed=6)
    guide = (_unit(batch, 8, seed=7), _unit(batch, 8, seed=8))
    return {
        "info_nce": (lambda a, b: fastcl.info_nce(a, b, temperature=0.1), (q, k)),
        "info_nce_raw_dot": (lambda a, b: fastcl.info_nce(a, b, normalize=False), (3 * q, 3 * k)),
        "clip_loss": (lambda a, b: fastcl.clip_loss(a, b, 20.0), (q, k)),
        "nt_xent": (lambda a, b: fastcl.nt_xent(a, b, temperature=0.5), (q, k)),
        "siglip_loss": (lambda a, b: fastcl.siglip_loss(a, b, 10.0, -10.0), (q, k)),
        "cml_loss": (lambda a, b, w: fastcl.cml_loss(a, b, w, num_items=100), (q, k, windows)),
        "collaborative": (lambda items: fastcl.collaborative_contrastive_loss(items, clicks), (pages,)),
        # the segment driver (memory bank, guide): its own autograd.Function
        "info_nce_memory_bank": (lambda a, b: fastcl.info_nce(a, b, temperature=0.1, memory_bank=bank), (q, k)),
        "info_nce_guide": (lambda a, b: fastcl.info_nce(a, b, temperature=0.1, guide=guide), (q, k)),
        "triplet": (lambda a, b: fastcl.triplet_margin_loss(a, b), (q, k)),
    }


NAMES = sorted(_losses(4))


@pytest.mark.parametrize("batch", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_func_grad_equals_autograd(name, batch):
    loss_fn, tensors = _losses(batch)[name]
    leaves = [t.clone().requires_grad_() for t in tensors]
    expected = torch.autograd.grad(loss_fn(*leaves), leaves)
    got = torch.func.grad(loss_fn, argnums=tuple(range(len(tensors))))(*tensors)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("batch", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_a_loop(name, batch):
    loss_fn, tensors = _losses(batch)[name]
    second = [t.roll(1, 0) for t in tensors]  # another problem of the same shape
    stacked = [torch.stack(pair) for pair in zip(tensors, second)]
    got = torch.func.vmap(loss_fn)(*stacked)
    expected = torch.stack([loss_fn(*tensors), loss_fn(*second)])
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("batch", SIZES)
@pytest.mark.parametrize("name", ["info_nce", "info_nce_raw_dot", "clip_loss", "nt_xent", "siglip_loss"])
def test_autocast_gives_float32_losses_from_low_precision_inputs(name, batch):
    """Under bf16 autocast: the inputs are rounded to bf16, the logits and the loss are float32
    (the products of bf16 values accumulated in float32), at every size and on every backend."""
    loss_fn, tensors = _losses(batch)[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(*tensors)
    expected = loss_fn(*[t.to(torch.bfloat16).float() for t in tensors])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_fn", [
    lambda a, b: fastcl.info_nce(a, b, temperature=0.1, backend="naive"),
    lambda a, b: fastcl.siglip_loss(a, b, 10.0, -10.0, backend="naive"),
], ids=["info_nce", "siglip_loss"])
def test_naive_backend_under_autocast_is_float32_like_the_others(loss_fn):
    q, k = _unit(64, DIM, seed=1), _unit(64, DIM, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(q, k)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_fn(q.to(torch.bfloat16).float(), k.to(torch.bfloat16).float()))


@pytest.mark.parametrize("batch", [64, 1100])
def test_empty_hard_negatives_get_an_empty_zero_gradient(batch):
    q, k = _unit(batch, DIM, seed=1), _unit(batch, DIM, seed=2)
    query = q.clone().requires_grad_()
    hard = torch.zeros(batch, 0, DIM, requires_grad=True)
    d_query, d_hard = torch.autograd.grad(fastcl.info_nce(query, k, hard_negatives=hard), [query, hard])
    assert d_hard is not None and d_hard.shape == hard.shape
    reference = q.clone().requires_grad_()
    torch.testing.assert_close(d_query, torch.autograd.grad(fastcl.info_nce(reference, k), [reference])[0])


def test_statistics_inside_torch_func_are_a_clear_error():
    q, k = _unit(8, DIM, seed=1), _unit(8, DIM, seed=2)
    bank = _unit(16, DIM, seed=3)
    with pytest.raises(NotImplementedError, match="return_stats=True is not available inside torch.func"):
        torch.func.grad(lambda a: fastcl.info_nce(a, k, memory_bank=bank, return_stats=True)[0])(q)
