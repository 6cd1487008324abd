"""fastcl.integrations.pytorch_metric_learning against pytorch-metric-learning itself."""
import inspect
import logging

import pytest
import torch

pml = pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning is not installed")
from pytorch_metric_learning import distances, losses, miners, reducers  # noqa: E402

from fastcl.integrations import pytorch_metric_learning as ours  # noqa: E402

from .helpers import assert_same, loss_and_grads  # noqa: E402

pytestmark = pytest.mark.peers
NAMES = ["NTXentLoss", "SupConLoss"]


def _both(name, kwargs, call):
    mine = loss_and_grads(lambda *t: call(getattr(ours, name)(**kwargs), *t), *call.tensors)
    theirs = loss_and_grads(lambda *t: call(getattr(losses, name)(**kwargs), *t), *call.tensors)
    return mine, theirs


class _Call:
    def __init__(self, tensors, **extra):
        self.tensors, self.extra = tensors, extra

    def __call__(self, loss, embeddings, ref=None):
        kwargs = dict(self.extra)
        if ref is not None:
            kwargs["ref_emb"] = ref
        return loss(embeddings, **kwargs)


def test_signatures_match_the_peer():
    for name in NAMES:
        assert inspect.signature(getattr(ours, name)) == inspect.signature(getattr(losses, name))
        assert inspect.signature(getattr(ours, name).forward) == inspect.signature(getattr(losses, name).forward)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [None, 0.3])
def test_labels_equal_peer(name, temperature):
    embeddings = torch.randn(40, 16)
    labels = torch.randint(0, 6, (40,))
    kwargs = {} if temperature is None else {"temperature": temperature}
    assert_same(*_both(name, kwargs, _Call([embeddings], labels=labels)))


@pytest.mark.parametrize("name", NAMES)
def test_ref_emb_equals_peer(name):
    embeddings, ref = torch.randn(21, 8), torch.randn(33, 8)
    labels, ref_labels = torch.randint(0, 4, (21,)), torch.randint(0, 4, (33,))
    assert_same(*_both(name, {}, _Call([embeddings, ref], labels=labels, ref_labels=ref_labels)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("miner", ["pairs", "triplets", "handmade_pairs", "handmade_triplets"])
def test_indices_tuple_equals_peer(name, miner):
    embeddings = torch.randn(32, 12)
    labels = torch.randint(0, 4, (32,))
    if miner == "pairs":
        indices = miners.MultiSimilarityMiner(epsilon=0.3)(embeddings, labels)
    elif miner == "triplets":
        indices = miners.TripletMarginMiner(margin=0.5, type_of_triplets="all")(embeddings, labels)
    elif miner == "handmade_pairs":  # repeated pairs and anchors without negatives
        a1 = torch.tensor([0, 0, 1, 2, 2, 5]); p = torch.tensor([3, 3, 4, 7, 8, 9])
        a2 = torch.tensor([0, 1, 1, 2, 6]); n = torch.tensor([10, 11, 11, 12, 13])
        indices = (a1, p, a2, n)
    else:
        indices = (torch.tensor([0, 0, 1, 1]), torch.tensor([2, 2, 3, 5]), torch.tensor([4, 6, 4, 4]))
    assert len(indices[0]) > 0
    assert_same(*_both(name, {}, _Call([embeddings], labels=labels, indices_tuple=indices)))


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_batches_equal_peer(name):
    for labels in (torch.zeros(6, dtype=torch.long), torch.arange(6), torch.tensor([0, 0, 1, 2, 3, 4])):
        embeddings = torch.randn(6, 4)
        mine, theirs = _both(name, {}, _Call([embeddings], labels=labels))
        assert_same(mine, theirs)


def test_other_distance_or_reducer_runs_the_peer_code(caplog):
    embeddings, labels = torch.randn(12, 4), torch.randint(0, 3, (12,))
    for kwargs in ({"distance": distances.DotProductSimilarity()}, {"reducer": reducers.SumReducer()}):
        with caplog.at_level(logging.DEBUG, logger="fastcl.integrations"):
            assert_same(*_both("NTXentLoss", kwargs, _Call([embeddings], labels=labels)))
        assert "peer path" in caplog.text


def test_miner_feeds_indices_tuple_in_a_training_loop():
    """A tiny model, a miner each step, our loss: same trajectory as the peer's loss."""
    def train(loss_module):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        miner = miners.MultiSimilarityMiner()
        generator = torch.Generator().manual_seed(1)
        history = []
        for _ in range(3):
            x = torch.randn(64, 10, generator=generator)
            y = torch.randint(0, 5, (64,), generator=generator)
            embeddings = model(x)
            loss = loss_module(embeddings, y, miner(embeddings, y))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        return history, list(model.parameters())

    mine, mine_params = train(ours.NTXentLoss(temperature=0.1))
    theirs, their_params = train(losses.NTXentLoss(temperature=0.1))
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=1e-5, atol=1e-6)
    for a, b in zip(mine_params, their_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("aliased", [True, False], ids=["ref_labels_is_labels", "cloned"])
def test_ref_labels_aliasing_labels_equals_peer(name, aliased):
    """PML drops the (i, i) pairs when ref_labels is the labels object itself, even with a
    ref_emb of other rows (two views): with one view per label that leaves no positive."""
    torch.manual_seed(0)
    v1 = torch.randn(32, 16)
    v2 = v1 + 0.3 * torch.randn(32, 16)
    for y in (torch.arange(32), torch.arange(16).repeat(2)):
        ref = y if aliased else y.clone()
        call = _Call((v1, v2), labels=y, ref_labels=ref)
        mine, theirs = _both(name, {"temperature": 0.07}, call)
        assert_same(mine, theirs)


@pytest.mark.parametrize("miner", [None, "batch_hard"])
@pytest.mark.parametrize("temperature", [0.01, 0.005])
def test_ntxent_small_temperature_caps_pairs_like_the_peer(temperature, miner):
    """PML adds small_val to each pair's probability (a cap of -log(small_val) per pair term),
    which binds at small temperatures with confidently wrong pairs."""
    torch.manual_seed(0)
    embeddings = torch.randn(48, 16)
    labels = torch.randint(0, 6, (48,))
    extra = {}
    if miner == "batch_hard":
        extra["indices_tuple"] = miners.BatchHardMiner()(embeddings, labels)
    call = _Call([embeddings], labels=labels, **extra)
    mine, theirs = _both("NTXentLoss", {"temperature": temperature}, call)
    assert_same(mine, theirs)
