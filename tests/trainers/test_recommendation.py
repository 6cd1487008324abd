"""The recommendation trainers (cml, ccn) end to end on synthetic data, fused = naive, their data
splits and metrics against independent computations."""
import json
import os

import numpy as np
import pytest
import torch

from fastcl.trainers import main
from fastcl.trainers.data import movielens
from fastcl.trainers.recommendation import gauc, topn_metrics

from .helpers import torchrun

pytest.importorskip("accelerate", reason="the trainers extra (accelerate) is not installed")

SYNTHETIC = {"cml": ["--bpr-epochs", "1", "--batch-size", "256", "--negatives", "16"],
             "ccn": ["--batch-size", "32", "--trigger-hadamard", "true"]}
KEYS = {"cml": (["recall@10", "recall@50", "ndcg@10"], ["popularity", "bpr_mf"]),
        "ccn": (["auc", "gauc"], ["lambda_0"])}


def _run(method, out, *extra):
    code = main([method, "--data", "synthetic", "--steps", "6", "--out", str(out), *SYNTHETIC[method], *extra])
    assert code == 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    return metrics, log


@pytest.mark.parametrize("method", ["cml", "ccn"])
def test_trainer_end_to_end_and_fused_equals_naive(method, tmp_path):
    fused, fused_log = _run(method, tmp_path / "fused")
    naive, naive_log = _run(method, tmp_path / "naive", "--loss", "naive")
    metrics, sections = KEYS[method]
    for name in metrics:
        assert 0.0 <= fused[name] <= 1.0
    for section in sections:
        assert set(metrics) <= set(fused[section])
    assert [r["step"] for r in fused_log] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) for r in fused_log)
    # the same random numbers (negatives, batches): the trajectories agree to rounding
    np.testing.assert_allclose([r["loss"] for r in fused_log], [r["loss"] for r in naive_log], rtol=2e-4)
    for name in metrics:
        assert abs(fused[name] - naive[name]) <= 0.02, name
    if method == "cml":  # six steps of CTR training are too noisy for this check
        assert fused_log[-1]["loss"] < fused_log[0]["loss"]


def test_ccn_without_contrastive_term_equals_its_ablation(tmp_path):
    """lambda = 0 through the engine is the ablation's recipe: the same metrics."""
    metrics, _ = _run("ccn", tmp_path / "zero", "--contrastive-weight", "0")
    for name in ("auc", "gauc"):
        assert metrics[name] == pytest.approx(metrics["lambda_0"][name], abs=1e-6)


def test_splits_and_pages():
    ratings = movielens.synthetic_ratings(num_users=30, num_items=50, per_user=25, seed=1)
    split = movielens.leave_last_out(ratings)
    positives = ratings.rating >= 4
    for u in range(ratings.num_users):
        mine = positives & (ratings.user == u)
        held = split.test_item[split.test_user == u]
        if mine.sum() >= 2:  # the latest positive is held out, the others train
            assert held.tolist() == [ratings.item[mine][np.argmax(ratings.timestamp[mine])]]
            assert sorted(split.train_item[split.train_user == u]) == sorted(ratings.item[mine][:-1])
        else:
            assert len(held) == 0
    pages = movielens.pages(ratings, window_seconds=3600, max_length=5)
    assert pages.mask.sum(1).min() >= 2 and pages.mask.sum(1).max() <= 5
    assert len(pages) > 10
    for p in range(len(pages)):
        clicked = pages.items[p][pages.mask[p] & pages.clicks[p]]
        assert pages.trigger[p] == (clicked[0] if len(clicked) else pages.pad)
    train, test = movielens.time_split(pages)
    assert len(train) + len(test) == len(pages)
    for u in np.unique(test.user):  # each user's test pages come after its training pages
        if (train.user == u).any():
            assert test.time[test.user == u].min() >= train.time[train.user == u].max()


@pytest.mark.skipif(movielens.ml100k_path() is None, reason="MovieLens-100k (recbole package) not installed")
def test_movielens_100k_loads():
    ratings = movielens.load_ml100k()
    assert (ratings.num_users, ratings.num_items, len(ratings)) == (943, 1682, 100_000)
    assert set(np.unique(ratings.rating).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_metrics_against_direct_computation():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    users = rng.integers(0, 6, 200)
    labels = rng.random(200) < 0.4
    scores = rng.random(200) + labels * 0.3
    labels[users == 5] = True  # a user with one class is skipped
    expected, weight = 0.0, 0
    for u in range(5):
        mine = users == u
        expected += roc_auc_score(labels[mine], scores[mine]) * mine.sum()
        weight += mine.sum()
    assert gauc(users, labels, scores) == pytest.approx(expected / weight)

    split = movielens.ImplicitSplit(np.array([0, 0, 1]), np.array([1, 2, 0]), np.array([0, 1]), np.array([3, 2]), 2, 5)
    scores = torch.tensor([[0.0, 9.0, 8.0, 1.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    # user 0: items 1, 2 excluded; 3 ranks after 4 -> rank 2 (0-based 1) ; user 1: 0 excluded, 2 ranks 2nd
    metrics = topn_metrics(scores, split, ks=(1, 2), ndcg_k=2)
    assert metrics["recall@1"] == 0.0 and metrics["recall@2"] == 1.0
    assert metrics["ndcg@2"] == pytest.approx(1.0 / np.log2(3))


@pytest.mark.distributed
@pytest.mark.slow
def test_cml_under_torchrun_two_processes(tmp_path):
    """gloo DDP on CPU: two processes, each half of the global batch and its own negatives (so
    the trajectory is not the single-process one: only that it runs and learns is checked)."""
    torchrun("cml", "--data", "synthetic", "--steps", "4", "--bpr-epochs", "0", "--batch-size", "128",
             "--negatives", "8", "--out", str(tmp_path))
    with open(tmp_path / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["processes"] == 2 and 0.0 <= metrics["recall@50"] <= 1.0
    with open(tmp_path / "log.jsonl") as f:
        log = [json.loads(line)["loss"] for line in f]
    assert len(log) == 4 and all(np.isfinite(log))


def test_cml_negatives_skip_the_users_training_positives():
    """sample_negatives redraws a negative that is one of the user's training positives (the
    authors' sampler does), so the hardest of the W is never a known positive; without the mask
    it is exactly torch.randint's draw."""
    from fastcl.trainers.cml import positive_mask, sample_negatives

    split = movielens.ImplicitSplit(np.array([0, 0, 0, 1]), np.array([0, 1, 2, 4]), np.array([0]), np.array([3]), 2, 6)
    liked = positive_mask(split)
    assert liked.tolist() == [[True, True, True, False, False, False], [False, False, False, False, True, False]]
    users = torch.tensor([0, 1, 0, 1] * 50)
    torch.manual_seed(3)
    ids = sample_negatives(users, 32, 6, liked)
    assert ids.shape == (200, 32)
    assert not liked[users.unsqueeze(1).expand_as(ids), ids].any()
    # uniform over the rest: user 0 draws 3, 4, 5, user 1 every item but 4, each about equally often
    counts_0 = torch.bincount(ids[users == 0].flatten(), minlength=6).double()
    assert counts_0[:3].sum() == 0 and (counts_0[3:] / counts_0[3:].mean() - 1).abs().max() < 0.1
    counts_1 = torch.bincount(ids[users == 1].flatten(), minlength=6).double()
    assert counts_1[4] == 0 and (counts_1[[0, 1, 2, 3, 5]] / counts_1[[0, 1, 2, 3, 5]].mean() - 1).abs().max() < 0.1
    torch.manual_seed(3)
    assert torch.equal(sample_negatives(users, 32, 6, liked), ids)  # the same random numbers: fused = naive
    torch.manual_seed(3)
    plain = sample_negatives(users, 32, 6)
    torch.manual_seed(3)
    assert torch.equal(plain, torch.randint(0, 6, (200, 32)))
