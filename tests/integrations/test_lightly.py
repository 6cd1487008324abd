"""fastcl.integrations.lightly against lightly's NTXentLoss. lightly is installed without its
dependencies (torchvision pins a CUDA torch), so its loss and memory-bank modules are loaded
from their files with the two lightly modules they import stubbed or loaded alike."""
import sys

import pytest
import torch

from fastcl.integrations import lightly as ours

from .helpers import assert_same, assert_same_signature, loss_and_grads, restored_modules

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def peer():
    root = ours._peer_root()
    if root is None:
        pytest.skip("lightly is not installed (pip install --no-deps lightly)")
    with restored_modules(ours._PEER_MODULE_NAMES) as saved:
        for name in saved:  # fresh stubs, not any lightly modules already imported
            sys.modules.pop(name, None)
        yield ours._peer_module_from_files(root)


def test_signature_matches_the_peer(peer):
    assert_same_signature(ours.NTXentLoss, peer.NTXentLoss)
    assert_same_signature(ours.NTXentLoss.forward, peer.NTXentLoss.forward)


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_in_batch_equals_peer(peer, temperature):
    out0, out1 = torch.randn(33, 16), torch.randn(33, 16)
    assert_same(loss_and_grads(ours.NTXentLoss(temperature), out0, out1),
                loss_and_grads(peer.NTXentLoss(temperature), out0, out1))


def test_memory_bank_fills_past_its_size_like_the_peer(peer):
    """Same random initial bank, then eight batches of 24 through a bank of 80 (it wraps and
    cuts the batch that runs past the end, as lightly does); loss and gradients at every step."""
    torch.manual_seed(0)
    theirs_loss = peer.NTXentLoss(temperature=0.2, memory_bank_size=(80, 16))
    torch.manual_seed(0)
    our_loss = ours.NTXentLoss(temperature=0.2, memory_bank_size=(80, 16))
    generator = torch.Generator().manual_seed(2)
    for step in range(8):
        out0, out1 = torch.randn(24, 16, generator=generator), torch.randn(24, 16, generator=generator)
        assert_same(loss_and_grads(our_loss, out0, out1), loss_and_grads(theirs_loss, out0, out1))
    torch.testing.assert_close(our_loss.bank.embeddings, theirs_loss.memory_bank.bank)
    # no update without gradient (evaluation), as lightly
    before = our_loss.bank.embeddings.clone()
    with torch.no_grad():
        our_loss(torch.randn(24, 16), torch.randn(24, 16))
    torch.testing.assert_close(our_loss.bank.embeddings, before)


def test_int_bank_size_takes_its_width_from_the_first_batch():
    loss = ours.NTXentLoss(memory_bank_size=50)
    out0 = torch.randn(8, 12, requires_grad=True)
    loss(out0, torch.randn(8, 12)).backward()
    assert tuple(loss.bank.embeddings.shape) == (50, 12) and out0.grad is not None


def test_simclr_loop_with_bank_equals_peer(peer):
    """A tiny projector trained through the bank filling past its size: the same trajectory
    and weights as with lightly's loss."""
    def train(module):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        loss_fn = module.NTXentLoss(temperature=0.5, memory_bank_size=(40, 8))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        generator = torch.Generator().manual_seed(1)
        history = []
        for _ in range(5):
            x = torch.randn(16, 10, generator=generator)
            noise = 0.05 * torch.randn(2, 16, 10, generator=generator)
            loss = loss_fn(model(x + noise[0]), model(x + noise[1]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        return history, list(model.parameters())

    mine, my_params = train(ours)
    theirs, their_params = train(peer)
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=1e-5, atol=1e-6)
    for a, b in zip(my_params, their_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("memory_bank_size", [12, (12, 8)], ids=["int", "size_dim"])
def test_memory_bank_survives_a_checkpoint(memory_bank_size):
    """state_dict holds the bank (also one whose width came from the first batch), so a resumed
    loss sees the same negatives as the one that kept training."""
    torch.manual_seed(0)
    loss = ours.NTXentLoss(memory_bank_size=memory_bank_size)
    for _ in range(3):
        loss(torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True))
    assert loss.memory_bank is loss.bank and len(loss.bank) == 12
    resumed = ours.NTXentLoss(memory_bank_size=memory_bank_size)
    resumed.load_state_dict(loss.state_dict())
    out0, out1 = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    torch.testing.assert_close(resumed(out0, out1), loss(out0, out1))
    torch.testing.assert_close(resumed.bank.negatives(), loss.bank.negatives())


def test_second_order_through_the_bank_equals_peer(peer):
    """Hessian-vector products of the loss with a memory bank (create_graph=True), as lightly's."""
    results = []
    for module in (ours, peer):
        torch.manual_seed(0)
        loss_fn = module.NTXentLoss(temperature=0.3, memory_bank_size=(20, 8))
        generator = torch.Generator().manual_seed(4)
        for _ in range(2):  # fill part of the bank with real rows first
            loss_fn(torch.randn(6, 8, generator=generator, requires_grad=True), torch.randn(6, 8, generator=generator))
        out0 = torch.randn(6, 8, generator=generator).requires_grad_()
        out1 = torch.randn(6, 8, generator=generator).requires_grad_()
        vectors = (torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator))
        grads = torch.autograd.grad(loss_fn(out0, out1), (out0, out1), create_graph=True)
        product = sum((g * v).sum() for g, v in zip(grads, vectors))
        results.append(torch.autograd.grad(product, (out0, out1)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
