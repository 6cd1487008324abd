"""The adapters' distributed paths in each ``distributed_mode`` against the peers' own losses.

One spawn of 2 gloo processes runs every case (process start-up dominates): open_clip's
ClipLoss and SigLipLoss and lightly's NTXentLoss (``gather_distributed=True``), ours with
``distributed_mode`` "gather" and "ring" against the peer's on the same ranks and float64 rows:
the loss of each rank, the gradient of each rank's local features, and the mean over ranks of a
logit scale / bias gradient (what DDP's averaging leaves). The peers' modules are loaded from
their files (their packages import torchvision, which is not installed).
"""
import inspect

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastcl.integrations import lightly as our_lightly
from fastcl.integrations import open_clip as our_open_clip

from ..spawn import spawn
from .helpers import restored_modules

pytestmark = pytest.mark.peers

TOLERANCE = dict(rtol=1e-9, atol=1e-10)  # float64 on both sides: only summation order differs
FLOAT32_TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # lightly's bank is float32 (its einsum takes one dtype)
LOCAL_ROWS, DIM = 4, 8
DISTRIBUTED_MODES = ("gather", "ring")


def open_clip_peer():
    return our_open_clip.peer_loss_module(from_file=True)


def lightly_peer():
    """lightly's loss module from its file, beside the stubs of ``_peer_module_from_files``: once
    per process (a second find_spec would meet the stubbed ``lightly``); the caller restores
    ``sys.modules`` where that matters (a spawned worker exits instead)."""
    if "peer" not in _LIGHTLY:
        root = our_lightly._peer_root()
        if root is None:
            raise ImportError("lightly is not installed (pip install --no-deps lightly)")
        _LIGHTLY["peer"] = our_lightly._peer_module_from_files(root)
    return _LIGHTLY["peer"]


_LIGHTLY = {}


def _mean_over_ranks(value):
    value = value.detach().clone().reshape(1)
    dist.all_reduce(value)
    return value[0] / dist.get_world_size()


def _local_rows(rank, count, seed):
    """This rank's ``count`` float64 unit rows of a fixed global draw (ranks hold disjoint rows)."""
    generator = torch.Generator().manual_seed(seed)
    rows = F.normalize(torch.randn(8 * LOCAL_ROWS, DIM, generator=generator, dtype=torch.float64), dim=-1)
    return rows[rank * LOCAL_ROWS:rank * LOCAL_ROWS + count]


def _run(loss_fn, tensors):
    """(loss, gradients of ``tensors``) of ``loss_fn`` on fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def _check_against_peer(label, ours, theirs, tensors, features=2, tolerance=TOLERANCE):
    """Per rank: loss and the gradients of the first ``features`` tensors; the rest (scalars):
    gradient averaged over ranks."""
    (mine, my_grads), (peer, peer_grads) = _run(ours, tensors), _run(theirs, tensors)
    torch.testing.assert_close(mine, peer, **tolerance, msg=lambda m: f"{label}: loss: {m}")
    for index in range(len(tensors)):
        mine_grad, peer_grad = my_grads[index], peer_grads[index]
        if index >= features:
            mine_grad, peer_grad = _mean_over_ranks(mine_grad), _mean_over_ranks(peer_grad)
        torch.testing.assert_close(mine_grad, peer_grad, **tolerance, msg=lambda m: f"{label}: gradient {index}: {m}")


def case_open_clip(rank, world):
    peer = open_clip_peer()
    image, text = _local_rows(rank, LOCAL_ROWS, seed=1), _local_rows(rank, LOCAL_ROWS, seed=2)
    scale, bias = torch.tensor(9.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    for mode in DISTRIBUTED_MODES:
        options = dict(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        _check_against_peer(f"ClipLoss {mode} rank {rank}", our_open_clip.ClipLoss(**options, distributed_mode=mode),
                            peer.ClipLoss(**options), [image, text, scale])
        for dist_impl in our_open_clip.DIST_IMPLS:
            options = dict(rank=rank, world_size=world, dist_impl=dist_impl)
            _check_against_peer(f"SigLipLoss {dist_impl} {mode} rank {rank}",
                                our_open_clip.SigLipLoss(**options, distributed_mode=mode),
                                peer.SigLipLoss(**options), [image, text, scale, bias])
    # the combinations that gather the features themselves: distributed_mode="gather" is today's path
    for local_loss, gather_with_grad in ((False, False), (False, True), (True, False)):
        options = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
        _check_against_peer(f"ClipLoss {options} gather rank {rank}",
                            our_open_clip.ClipLoss(**options, distributed_mode="gather"),
                            peer.ClipLoss(**options), [image, text, scale])


def case_lightly(rank, world):
    peer = lightly_peer()
    # out0 not of unit norm: the losses normalize it
    out0, out1 = 3 * _local_rows(rank, LOCAL_ROWS, seed=3), _local_rows(rank, LOCAL_ROWS, seed=4)
    for mode in DISTRIBUTED_MODES:
        _check_against_peer(f"NTXentLoss {mode} rank {rank}",
                            our_lightly.NTXentLoss(0.3, gather_distributed=True, distributed_mode=mode),
                            peer.NTXentLoss(0.3, gather_distributed=True), [out0, out1])


def case_lightly_bank(rank, world):
    """With a bank and gather_distributed, every rank's out1 enters the bank (lightly's rule);
    float32, as lightly's bank."""
    peer = lightly_peer()
    torch.manual_seed(0)
    theirs = peer.NTXentLoss(0.3, memory_bank_size=(12, DIM), gather_distributed=True)
    torch.manual_seed(0)
    ours = our_lightly.NTXentLoss(0.3, memory_bank_size=(12, DIM), gather_distributed=True)
    for step in range(2):
        out0, out1 = (_local_rows(rank, LOCAL_ROWS, seed=seed).float() for seed in (10 + step, 20 + step))
        _check_against_peer(f"NTXentLoss bank step {step} rank {rank}", ours, theirs, [out0, out1],
                            tolerance=FLOAT32_TOLERANCE)
    torch.testing.assert_close(ours.bank.embeddings, theirs.memory_bank.bank)


def case_lightly_uneven(rank, world):
    """Uneven batches (which lightly's equal-size gather cannot take): the mean over ranks of
    the losses is the one-process loss on the global batch, a rank's gradients world times it."""
    sizes = [3, 5][:world]
    generator = torch.Generator().manual_seed(5)
    out0_all = torch.randn(sum(sizes), DIM, generator=generator, dtype=torch.float64)
    out1_all = torch.randn(sum(sizes), DIM, generator=generator, dtype=torch.float64)
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    expected, expected_grads = _run(our_lightly.NTXentLoss(0.3), [out0_all, out1_all])
    for mode in DISTRIBUTED_MODES:
        loss, grads = _run(our_lightly.NTXentLoss(0.3, gather_distributed=True, distributed_mode=mode),
                           [out0_all[local], out1_all[local]])
        torch.testing.assert_close(_mean_over_ranks(loss), expected, **TOLERANCE)
        for grad, full in zip(grads, expected_grads):
            torch.testing.assert_close(grad / world, full[local], **TOLERANCE)


def worker(rank, world):
    case_open_clip(rank, world)
    case_lightly(rank, world)
    case_lightly_bank(rank, world)
    case_lightly_uneven(rank, world)


@pytest.mark.distributed
def test_adapters_in_each_distributed_mode_equal_the_peers_on_two_gloo_processes():
    try:
        open_clip_peer()  # skip early when a peer is missing
    except ImportError as error:
        pytest.skip(str(error))
    if our_lightly._peer_root() is None:
        pytest.skip("lightly is not installed (pip install --no-deps lightly)")
    spawn(worker, 2)


# -- one process: construction checks ---------------------------------------------------------------

@pytest.mark.parametrize("adapter", [our_open_clip.ClipLoss, our_open_clip.SigLipLoss, our_lightly.NTXentLoss])
def test_a_bad_distributed_mode_names_the_argument_and_the_modes(adapter):
    with pytest.raises(ValueError, match=r"distributed_mode must be one of \('auto', 'gather', 'ring'\), got 'rings'"):
        adapter(distributed_mode="rings")
    assert adapter().distributed_mode == "auto"


@pytest.mark.parametrize("local_loss, gather_with_grad", [(False, False), (False, True), (True, False)])
def test_clip_ring_needs_the_local_loss_with_gradient(local_loss, gather_with_grad):
    with pytest.raises(ValueError, match="needs local_loss=True and gather_with_grad=True"):
        our_open_clip.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=0, world_size=2,
                               distributed_mode="ring")
    # one process never reaches the distributed path, and "auto" / "gather" keep every combination
    our_open_clip.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, distributed_mode="ring")
    our_open_clip.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=0, world_size=2)
    our_open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=2, distributed_mode="ring")


def test_clip_ring_refuses_a_subclass_with_its_own_logits():
    class Shifted(our_open_clip.ClipLoss):
        def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
            return super().get_logits(image_features, text_features, 0.5 * logit_scale, logit_bias)

    loss = Shifted(local_loss=True, gather_with_grad=True, rank=0, world_size=2, distributed_mode="ring")
    with pytest.raises(ValueError, match="overriding get_logits"):
        loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor(10.0))


def test_signatures_are_the_peers_then_keyword_only_distributed_mode():
    peers = []
    try:
        module = open_clip_peer()
        peers += [(our_open_clip.ClipLoss, module.ClipLoss), (our_open_clip.SigLipLoss, module.SigLipLoss)]
    except ImportError:
        pass
    if our_lightly._peer_root() is not None:
        with restored_modules(our_lightly._PEER_MODULE_NAMES):  # lightly's file beside stubs, then ours back
            peers.append((our_lightly.NTXentLoss, lightly_peer().NTXentLoss))
    if not peers:
        pytest.skip("neither open_clip nor lightly is installed")
    for ours, theirs in peers:
        mine = list(inspect.signature(ours).parameters.values())
        peer = [(p.name, p.kind, p.default) for p in inspect.signature(theirs).parameters.values()]
        assert [(p.name, p.kind, p.default) for p in mine[:-1]] == peer, ours
        assert (mine[-1].name, mine[-1].kind, mine[-1].default) == \
            ("distributed_mode", inspect.Parameter.KEYWORD_ONLY, "auto"), ours
