"""fastcl.integrations.open_clip against open_clip's loss module (loaded from its file when the
package cannot be imported: it is installed without torchvision)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastcl.integrations import open_clip as ours

from ..spawn import spawn
from .helpers import assert_same, assert_same_signature, loss_and_grads

pytestmark = pytest.mark.peers


def peer_loss_module():
    """open_clip's own loss module, always loaded from its file (``import open_clip`` needs torchvision)."""
    try:
        return ours.peer_loss_module(from_file=True)
    except ImportError:
        pytest.skip("open_clip is not installed")


@pytest.fixture(scope="module")
def peer():
    return peer_loss_module()


def _features(batch, dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(batch, dim, generator=generator), dim=-1),
            F.normalize(torch.randn(batch, dim, generator=generator), dim=-1))


def test_signatures_match_the_peer(peer):
    for name in ("ClipLoss", "SigLipLoss"):
        assert_same_signature(getattr(ours, name), getattr(peer, name))
        assert_same_signature(getattr(ours, name).forward, getattr(peer, name).forward)


@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_equals_peer(peer, with_bias):
    image, text = _features(45)
    scale, bias = torch.tensor(14.3), torch.tensor(-2.0)
    tensors = [image, text, scale] + ([bias] if with_bias else [])
    assert_same(loss_and_grads(lambda *t: ours.ClipLoss()(*t), *tensors),
                loss_and_grads(lambda *t: peer.ClipLoss()(*t), *tensors))
    assert set(ours.ClipLoss()(image, text, scale, output_dict=True)) == {"contrastive_loss"}


def test_siglip_loss_equals_peer(peer):
    image, text = _features(37)
    tensors = [image, text, torch.tensor(10.0), torch.tensor(-10.0)]
    assert_same(loss_and_grads(lambda *t: ours.SigLipLoss()(*t), *tensors),
                loss_and_grads(lambda *t: peer.SigLipLoss()(*t), *tensors))


def test_horovod_is_refused():
    with pytest.raises(NotImplementedError, match="horovod"):
        ours.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        ours.SigLipLoss(dist_impl="ring")


def test_patch_open_clip_swaps_and_undoes(peer):
    original = peer.ClipLoss, peer.SigLipLoss
    with ours.patch_open_clip(peer):
        assert peer.ClipLoss is ours.ClipLoss and peer.SigLipLoss is ours.SigLipLoss
    assert (peer.ClipLoss, peer.SigLipLoss) == original
    handle = ours.patch_open_clip(peer)
    assert peer.ClipLoss is ours.ClipLoss
    handle.undo()
    assert peer.ClipLoss is original[0]


def test_patch_handles_undone_in_any_order_restore_the_originals(peer):
    original = peer.ClipLoss, peer.SigLipLoss
    first, second = ours.patch_open_clip(peer), ours.patch_open_clip(peer)
    first.undo()
    assert peer.ClipLoss is ours.ClipLoss  # the second handle is still live
    second.undo()
    assert (peer.ClipLoss, peer.SigLipLoss) == original
    first, second = ours.patch_open_clip(peer), ours.patch_open_clip(peer)
    second.undo()
    first.undo()
    first.undo()  # a second undo of the same handle changes nothing
    assert (peer.ClipLoss, peer.SigLipLoss) == original


@pytest.mark.parametrize("name", ["ClipLoss", "SigLipLoss"])
def test_get_logits_and_ground_truth_equal_peer(peer, name):
    image, text = _features(9)
    scale, bias = torch.tensor(14.3), torch.tensor(-2.0)
    mine, theirs = getattr(ours, name)(), getattr(peer, name)()
    torch.testing.assert_close(mine.get_logits(image, text, scale, bias), theirs.get_logits(image, text, scale, bias))
    args = (image.device, 9) if name == "ClipLoss" else (image.device, image.dtype, 9)
    torch.testing.assert_close(mine.get_ground_truth(*args), theirs.get_ground_truth(*args))


@pytest.mark.parametrize("name", ["ClipLoss", "SigLipLoss"])
def test_subclass_overriding_get_logits_is_honoured(peer, name):
    """A user's subclass that changes the logits gets the loss over its logits, as with open_clip."""
    image, text = _features(11)
    tensors = [image, text, torch.tensor(10.0), torch.tensor(-3.0)]

    def subclass(base):
        class Shifted(base):
            def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
                return super().get_logits(image_features, text_features, 0.5 * logit_scale, logit_bias)

        return Shifted

    assert_same(loss_and_grads(lambda *t: subclass(getattr(ours, name))()(*t), *tensors),
                loss_and_grads(lambda *t: subclass(getattr(peer, name))()(*t), *tensors))


class _TinyClip(torch.nn.Module):
    """open_clip's model shape: two towers, normalized features, a learnable log scale."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 64), torch.nn.GELU(),
                                          torch.nn.Linear(64, 16))
        self.text = torch.nn.EmbeddingBag(100, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.659))

    def forward(self, images, tokens):
        return (F.normalize(self.visual(images), dim=-1), F.normalize(self.text(tokens), dim=-1), self.logit_scale.exp())


def test_clip_training_step_with_patched_open_clip(peer):
    """open_clip's train step (loss built from open_clip.loss after the patch), three steps."""
    def train():
        torch.manual_seed(0)
        model = _TinyClip()
        loss_fn = peer.ClipLoss()  # the training script builds the loss from the module
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        history = []
        for _ in range(3):
            images = torch.randn(32, 3, 8, 8, generator=generator)
            tokens = torch.randint(0, 100, (32, 6), generator=generator)
            loss = loss_fn(*model(images, tokens))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        return type(loss_fn), history, [p.detach().clone() for p in model.parameters()]

    their_type, theirs, their_params = train()
    with ours.patch_open_clip(peer):
        our_type, mine, our_params = train()
    assert our_type is ours.ClipLoss and their_type is not ours.ClipLoss
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=1e-5, atol=1e-6)
    for a, b in zip(our_params, their_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- two gloo processes: every distributed mode against open_clip on the same ranks ------------------

def _mean_over_ranks(value):
    value = value.detach().clone().reshape(1)
    dist.all_reduce(value)
    return value[0] / dist.get_world_size()


def _distributed_worker(rank, world):
    peer = peer_loss_module()
    image, text = _features(6 * world, dim=8, seed=3)
    image, text = image[rank * 6:(rank + 1) * 6].double(), text[rank * 6:(rank + 1) * 6].double()
    cases = [("ClipLoss", dict(local_loss=l, gather_with_grad=g), [torch.tensor(9.0, dtype=torch.float64)])
             for l in (False, True) for g in (False, True)]
    cases += [("SigLipLoss", dict(dist_impl=d), [torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)])
              for d in ("bidir", "shift", "reduce", "gather")]
    for name, kwargs, scalars in cases:
        results = []
        for module in (ours, peer):
            loss_fn = getattr(module, name)(rank=rank, world_size=world, **kwargs)
            leaves = [t.detach().clone().requires_grad_() for t in [image, text] + scalars]
            loss = loss_fn(*leaves)
            loss.backward()
            results.append((loss.detach(), [leaf.grad for leaf in leaves]))
        (mine, my_grads), (theirs, their_grads) = results
        label = f"{name} {kwargs} rank {rank}"
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-10, msg=lambda m: f"{label} loss: {m}")
        for index in range(2):  # feature gradients: per rank
            torch.testing.assert_close(my_grads[index], their_grads[index], rtol=1e-9, atol=1e-10,
                                       msg=lambda m: f"{label} grad {index}: {m}")
        for index in range(2, len(my_grads)):  # scale / bias: what DDP's averaging leaves
            torch.testing.assert_close(_mean_over_ranks(my_grads[index]), _mean_over_ranks(their_grads[index]),
                                       rtol=1e-9, atol=1e-10, msg=lambda m: f"{label} scalar grad: {m}")


@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_modes_equal_peer_on_two_gloo_processes():
    peer_loss_module()  # skip early when open_clip is missing
    spawn(_distributed_worker, 2)
