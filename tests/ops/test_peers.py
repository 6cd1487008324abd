"""Parity with the peer libraries users migrate from (installed by the dev extra)."""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.integrations.open_clip import peer_loss_module

pytestmark = pytest.mark.peers
BACKENDS = ["naive", "torch"] + (["cpu"] if fastcl.backends()["cpu"].available else [])


def _open_clip_loss():
    """open_clip's loss module. `make test` installs open_clip without torchvision (whose wheels
    pin a CUDA torch build), so the package cannot be imported; its loss module needs only torch
    and is then loaded from the installed file."""
    try:
        return peer_loss_module()
    except ImportError:
        pytest.skip("open_clip is not installed")


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*tensors)
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


def _assert_same(ours, theirs, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(ours[0], theirs[0].to(ours[0].dtype), rtol=rtol, atol=atol)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_loss_equals_open_clip(backend):
    open_clip_loss = _open_clip_loss()
    image = F.normalize(torch.randn(23, 32), dim=-1)
    text = F.normalize(torch.randn(23, 32), dim=-1)
    scale = torch.tensor(14.3)
    theirs = _grads(lambda i, t, s: open_clip_loss.ClipLoss()(i, t, s), image, text, scale)
    ours = _grads(lambda i, t, s: fastcl.clip_loss(i, t, s, backend=backend), image, text, scale)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_loss_equals_open_clip(backend):
    open_clip_loss = _open_clip_loss()
    image = F.normalize(torch.randn(19, 16), dim=-1)
    text = F.normalize(torch.randn(19, 16), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    theirs = _grads(lambda i, t, s, b: open_clip_loss.SigLipLoss()(i, t, s, b), image, text, scale, bias)
    ours = _grads(lambda i, t, s, b: fastcl.siglip_loss(i, t, s, b, backend=backend), image, text, scale, bias)
    _assert_same(ours, theirs)


@pytest.mark.vision
def test_open_clip_package_loss_is_the_module_the_parity_tests_load():
    """Where open_clip imports in full (torchvision present), the loss module the parity tests
    load is the package's own, and the CLIP parity holds through the package's public name."""
    open_clip = pytest.importorskip("open_clip")
    assert _open_clip_loss() is open_clip.loss
    image = F.normalize(torch.randn(9, 8), dim=-1)
    text = F.normalize(torch.randn(9, 8), dim=-1)
    scale = torch.tensor(20.0)
    theirs = _grads(lambda i, t, s: open_clip.ClipLoss()(i, t, s), image, text, scale)
    ours = _grads(lambda i, t, s: fastcl.clip_loss(i, t, s), image, text, scale)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_equals_pytorch_metric_learning(backend):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    z1, z2 = torch.randn(17, 12), torch.randn(17, 12)
    labels = torch.cat([torch.arange(17), torch.arange(17)])
    theirs = _grads(lambda a, b: losses.NTXentLoss(temperature=0.5)(torch.cat([a, b]), labels), z1, z2)
    ours = _grads(lambda a, b: fastcl.nt_xent(a, b, 0.5, backend=backend), z1, z2)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_equals_pytorch_metric_learning_with_repeated_labels(backend):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    embeddings = torch.randn(24, 10)
    labels = torch.randint(0, 5, (24,), generator=torch.Generator().manual_seed(2))
    theirs = _grads(lambda e: losses.NTXentLoss(temperature=0.2)(e, labels), embeddings)
    ours = _grads(lambda e: fastcl.info_nce(e, e, temperature=0.2, normalize=True, exclude_self=True, labels=labels,
                                            key_labels=labels, multi_positive="pairwise", backend=backend), embeddings)
    _assert_same(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_equals_pytorch_metric_learning(backend):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    embeddings = torch.randn(20, 10)
    labels = torch.randint(0, 4, (20,), generator=torch.Generator().manual_seed(5))
    theirs = _grads(lambda e: losses.SupConLoss(temperature=0.1)(e, labels), embeddings)
    ours = _grads(lambda e: fastcl.info_nce(e, e, temperature=0.1, normalize=True, exclude_self=True, labels=labels,
                                            key_labels=labels, multi_positive="supcon", backend=backend), embeddings)
    _assert_same(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_equals_sentence_transformers_mnrl(backend):
    st_losses = pytest.importorskip("sentence_transformers.losses")
    anchor, positive, negative = torch.randn(9, 16), torch.randn(9, 16), torch.randn(9, 16)
    mnrl = st_losses.MultipleNegativesRankingLoss(model=torch.nn.Identity())
    theirs = _grads(lambda a, p, n: mnrl.compute_loss_from_embeddings([a, p, n], None), anchor, positive, negative)
    ours = _grads(lambda a, p, n: fastcl.info_nce(a, torch.cat([p, n]), temperature=1 / 20, normalize=True, backend=backend),
                  anchor, positive, negative)
    _assert_same(ours, theirs)
