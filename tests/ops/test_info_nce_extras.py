"""info_nce's memory_bank, guide and return_stats (and clip_loss / siglip_loss stats) against
the materializing reference naive.info_nce_extras; fastcl.MemoryBank's FIFO."""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.ops.info_nce import naive

B, N, D, G = 13, 20, 8, 5


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, dtype=torch.float64, generator=generator)
    k = torch.randn(N, D, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 4, (B,), generator=generator)
    key_labels = torch.randint(0, 4, (N,), generator=generator)
    key_labels[:B] = labels
    return q, k, labels, key_labels, generator


def _bank(generator):
    bank = fastcl.MemoryBank(11, D, dtype=torch.float64)
    bank.push(torch.randn(7, D, dtype=torch.float64, generator=generator), labels=torch.randint(0, 4, (7,), generator=generator),
              indices=torch.arange(7))
    bank.push(torch.randn(6, D, dtype=torch.float64, generator=generator), labels=torch.randint(0, 4, (6,), generator=generator),
              indices=torch.arange(7, 13))  # wraps: 13 pushed into 11 slots
    return bank


CASES = {
    "bank": lambda g, labels, kl, bank: dict(memory_bank=bank, normalize=True),
    "bank_label_and_index_exclusion": lambda g, labels, kl, bank: dict(
        memory_bank=bank, labels=labels, key_labels=kl, sample_index=torch.randint(0, 13, (B,), generator=g)),
    "bank_tensor_with_hard_negatives": lambda g, labels, kl, bank: dict(
        memory_bank=bank.negatives().clone(), hard_negatives=torch.randn(B, 3, D, dtype=torch.float64, generator=g)),
    "guide_absolute": lambda g, labels, kl, bank: dict(guide=(torch.randn(B, G, dtype=torch.float64, generator=g),
                                                              torch.randn(N, G, dtype=torch.float64, generator=g)),
                                                       guide_margin=0.1),
    "guide_relative": lambda g, labels, kl, bank: dict(guide=(torch.randn(B, G, dtype=torch.float64, generator=g),
                                                              torch.randn(N, G, dtype=torch.float64, generator=g)),
                                                       guide_margin=0.2, guide_margin_strategy="relative", normalize=True),
    "stats_symmetric": lambda g, labels, kl, bank: dict(normalize=True, symmetric=True),
    "stats_labels_margin": lambda g, labels, kl, bank: dict(labels=labels, key_labels=kl, false_negative_margin=0.3),
    "stats_exclude_self": lambda g, labels, kl, bank: dict(exclude_self=True, positive=(torch.arange(B) + 1) % B),
}


def _reference_kwargs(kwargs):
    kwargs = dict(kwargs)
    bank = kwargs.get("memory_bank")
    if isinstance(bank, fastcl.MemoryBank):
        kwargs["memory_bank"] = bank.negatives()
        if "labels" in kwargs:
            kwargs["bank_labels"] = bank.filled_labels()
        if "sample_index" in kwargs:
            kwargs["bank_indices"] = bank.filled_indices()
    return kwargs


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_reference(case, reduction, small_blocks):
    q, k, labels, key_labels, generator = _inputs()
    kwargs = CASES[case](generator, labels, key_labels, _bank(generator))
    temperature = torch.tensor(0.3, dtype=torch.float64)
    weight = torch.randn(B, dtype=torch.float64, generator=generator) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    results = []
    for fn, extra in ((fastcl.info_nce, dict(return_stats=True)), (naive.info_nce_extras, {})):
        leaves = [t.clone().requires_grad_() for t in (q, k, temperature)]
        loss, stats = fn(leaves[0], leaves[1], temperature=leaves[2], reduction=reduction,
                         **(kwargs if fn is fastcl.info_nce else _reference_kwargs(kwargs)), **extra)
        grads = torch.autograd.grad((loss * weight).sum(), leaves)
        results.append((loss, grads, stats))
    (loss, grads, stats), (ref_loss, ref_grads, ref_stats) = results
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert set(stats) == set(ref_stats)
    for name in ref_stats:
        torch.testing.assert_close(stats[name], ref_stats[name])
    assert stats["rank"].dtype == torch.int64


def test_stats_rank_zero_is_top1_accuracy():
    q = F.normalize(torch.randn(64, 16), dim=-1)
    k = F.normalize(q + 0.3 * torch.randn(64, 16), dim=-1)
    _, stats = fastcl.info_nce(q, k, temperature=0.05, return_stats=True)
    top1 = ((q @ k.T).argmax(1) == torch.arange(64)).float().mean()
    assert float((stats["rank"] == 0).float().mean()) == pytest.approx(float(top1))


def test_clip_and_siglip_stats_equal_materialized_logits():
    image, text = F.normalize(torch.randn(17, 8), dim=-1), F.normalize(torch.randn(17, 8), dim=-1)
    logits = 7.0 * image @ text.T - 3.0
    diagonal = logits.diagonal()
    for loss_fn, shift in ((lambda **kw: fastcl.clip_loss(image, text, 7.0, **kw), 3.0),
                           (lambda **kw: fastcl.siglip_loss(image, text, 7.0, -3.0, **kw), 0.0)):
        loss, stats = loss_fn(return_stats=True)
        torch.testing.assert_close(loss, loss_fn())
        for prefix, matrix in (("", logits + shift), ("column_", (logits + shift).T)):
            torch.testing.assert_close(stats[prefix + "lse"], torch.logsumexp(matrix, 1))
            torch.testing.assert_close(stats[prefix + "positive_logit"], diagonal + shift)
            torch.testing.assert_close(stats[prefix + "rank"], (matrix > (diagonal + shift)[:, None]).sum(1))


def test_memory_bank_is_a_fifo_on_the_embeddings_device():
    bank = fastcl.MemoryBank(5, 2)
    assert len(bank) == 0 and bank.negatives().shape == (0, 2)
    bank.push(torch.tensor([[1.0, 0], [2, 0], [3, 0]], requires_grad=True), labels=torch.tensor([1, 2, 3]))
    bank.push(torch.tensor([[4.0, 0], [5, 0], [6, 0]]), labels=torch.tensor([4, 5, 6]))
    assert len(bank) == 5 and not bank.negatives().requires_grad
    assert sorted(bank.negatives()[:, 0].tolist()) == [2, 3, 4, 5, 6]  # the oldest (1) went out
    assert sorted(bank.filled_labels().tolist()) == [2, 3, 4, 5, 6]
    bank.push(torch.arange(14.0).reshape(7, 2))  # more rows than slots: the newest five stay
    assert sorted(bank.negatives()[:, 0].tolist()) == [4, 6, 8, 10, 12]
    drop = fastcl.MemoryBank(4, 1, overflow="drop")
    drop.push(torch.tensor([[1.0], [2], [3]]))
    drop.push(torch.tensor([[4.0], [5]]))  # lightly: 4 fills the last slot, 5 is dropped, restart at 0
    assert drop.negatives()[:, 0].tolist() == [1, 2, 3, 4] and drop.pointer == 0


def test_bad_extra_arguments_raise():
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match="memory_bank"):
        fastcl.info_nce(q, k, memory_bank=[1, 2])
    with pytest.raises(ValueError, match="memory_bank"):
        fastcl.info_nce(q, k, memory_bank=torch.randn(5, 7))
    with pytest.raises(ValueError, match="sample_index"):
        fastcl.info_nce(q, k, sample_index=torch.arange(4))
    with pytest.raises(ValueError, match="guide_margin_strategy"):
        fastcl.info_nce(q, k, guide=(q, k), guide_margin_strategy="percent")
    with pytest.raises(ValueError, match="guide"):
        fastcl.info_nce(q, k, guide=(q[:2], k))
    with pytest.raises(ValueError, match="multi_positive"):
        fastcl.info_nce(q, k, labels=torch.arange(4), key_labels=torch.arange(4), multi_positive="supcon", return_stats=True)
    with pytest.raises(ValueError, match="size"):
        fastcl.MemoryBank(0, 3)


def test_memory_bank_state_dict_resumes_the_same_queue():
    torch.manual_seed(0)
    bank = fastcl.MemoryBank(7, 3)
    for rows in (4, 5):
        bank.push(torch.randn(rows, 3), labels=torch.arange(rows))
    state = bank.state_dict()
    assert set(state) == {"embeddings", "labels", "indices", "_extra_state"}
    resumed = fastcl.MemoryBank(7, 3)
    resumed.load_state_dict(state)
    assert (len(resumed), resumed.pointer) == (len(bank), bank.pointer) == (7, 2)
    torch.testing.assert_close(resumed.negatives(), bank.negatives())
    torch.testing.assert_close(resumed.filled_labels(), bank.filled_labels())
    assert resumed.filled_indices() is None
    more = torch.randn(3, 3)
    bank.push(more)
    resumed.push(more)
    torch.testing.assert_close(resumed.negatives(), bank.negatives())
    # a checkpoint from before the queue was saved loads as an empty bank, strict or not
    holder = torch.nn.Module()
    holder.bank = fastcl.MemoryBank(7, 3)
    holder.bank.push(torch.randn(2, 3))
    holder.load_state_dict({})
    assert len(holder.bank) == 0
    with pytest.raises(ValueError, match="count 9"):
        fastcl.MemoryBank(7, 3).load_state_dict({**state, "_extra_state": {**state["_extra_state"], "count": 9}})


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("case", [c for c in sorted(CASES) if not c.startswith("stats")])
def test_second_order_equals_reference(case, normalize, reduction, small_blocks):
    """Hessian-vector products through memory_bank= / guide= (gradient penalties, HVPs): exact,
    also when the bank is pushed to between the loss and the double backward."""
    q, k, labels, key_labels, generator = _inputs(1)
    bank = _bank(generator)
    kwargs = {**CASES[case](generator, labels, key_labels, bank), "normalize": normalize}
    temperature = torch.tensor(0.3, dtype=torch.float64)
    weight = torch.randn(B, dtype=torch.float64, generator=generator) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    vectors = [torch.randn_like(q), torch.randn_like(k), torch.tensor(0.4, dtype=torch.float64)]
    results = []
    for fn in (fastcl.info_nce, naive.info_nce_extras):
        leaves = [t.clone().requires_grad_() for t in (q, k, temperature)]
        loss = fn(leaves[0], leaves[1], temperature=leaves[2], reduction=reduction,
                  **(kwargs if fn is fastcl.info_nce else _reference_kwargs(kwargs)))
        if fn is naive.info_nce_extras:
            loss = loss[0]  # (loss, stats)
        if fn is fastcl.info_nce and isinstance(kwargs.get("memory_bank"), fastcl.MemoryBank):
            reference_rows = bank.negatives().clone()
            bank.push(torch.randn(3, D, dtype=torch.float64, generator=generator))  # as a training loop does
        grads = torch.autograd.grad((loss * weight).sum(), leaves, create_graph=True)
        product = sum((g * v).sum() for g, v in zip(grads, vectors))
        results.append(torch.autograd.grad(product, leaves))
        if fn is fastcl.info_nce and isinstance(kwargs.get("memory_bank"), fastcl.MemoryBank):
            bank.embeddings[: bank.count] = reference_rows  # the reference reads the rows the loss saw
            bank.pointer = (bank.pointer - 3) % bank.size
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
