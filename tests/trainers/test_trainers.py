"""Every trainer end to end on synthetic data; fused = naive; GradCache = without; exact resume."""
import os

import pytest

from .helpers import assert_relative, losses, metrics, train

METHODS = ["simcse", "dpr", "nv_embed"]
GOAL = {"simcse": "spearman", "dpr": "recall@1", "nv_embed": "recall@1"}


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end_on_synthetic_data(method, tmp_path):
    assert train(method, tmp_path, "--steps", "3") == 0
    result = metrics(tmp_path)
    assert result["data"].startswith("synthetic")
    assert result["steps"] == 3 and len(losses(tmp_path)) == 3
    assert GOAL[method] in result and GOAL[method] in result["before"]
    assert result["train"]["time_per_step_s"] > 0
    assert os.path.isfile(tmp_path / "curves.png")
    if method == "dpr":
        assert {"recall@1", "recall@5", "recall@20", "mrr@10"} <= set(result) and "bm25" in result and "zero_shot" in result
    if method == "nv_embed":
        assert "recall@1" in result["mean_pooling"]  # the ablation, trained in the same run


@pytest.mark.parametrize("method", METHODS)
def test_fused_and_naive_losses_agree(method, tmp_path):
    """Same seed, dropout off, 10 steps: the loss trajectories agree to 1e-4 relative."""
    common = ["--steps", "10", "--dropout", "0", "--lr", "1e-3"]
    assert train(method, tmp_path / "fused", *common, "--loss", "fused") == 0
    assert train(method, tmp_path / "naive", *common, "--loss", "naive") == 0
    fused, naive = losses(tmp_path / "fused"), losses(tmp_path / "naive")
    assert_relative(fused, naive, 1e-4)
    assert fused[-1] < fused[0]  # and it learns


@pytest.mark.parametrize("method", ["simcse", "dpr"])
def test_grad_cache_equals_plain_training(method, tmp_path):
    common = ["--steps", "6", "--dropout", "0", "--lr", "1e-3"]
    assert train(method, tmp_path / "plain", *common) == 0
    assert train(method, tmp_path / "cached", *common, "--grad-cache", "3") == 0
    assert_relative(losses(tmp_path / "cached"), losses(tmp_path / "plain"), 1e-4)


def test_simcse_dropout_is_the_same_random_numbers_in_fused_and_naive(tmp_path):
    """With dropout on, fused and naive still agree: they draw the same masks."""
    assert train("simcse", tmp_path / "fused", "--steps", "4", "--lr", "1e-3", "--loss", "fused") == 0
    assert train("simcse", tmp_path / "naive", "--steps", "4", "--lr", "1e-3", "--loss", "naive") == 0
    assert_relative(losses(tmp_path / "fused"), losses(tmp_path / "naive"), 1e-4)


def test_resume_is_exact(tmp_path):
    common = ["--steps", "6", "--lr", "1e-3", "--warmup-steps", "2"]  # dropout on: the RNG must resume too
    assert train("simcse", tmp_path / "full", *common) == 0
    assert train("simcse", tmp_path / "part", *common, "--stop-after", "3") == 0
    assert len(losses(tmp_path / "part")) == 3 and not os.path.exists(tmp_path / "part" / "metrics.json")
    assert train("simcse", tmp_path / "part", *common, "--resume", str(tmp_path / "part")) == 0
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert resumed == full  # step 4 (k + 1) onwards: bit for bit
    assert metrics(tmp_path / "part")["spearman"] == metrics(tmp_path / "full")["spearman"]


def test_nv_embed_mean_pooling_main_model(tmp_path):
    assert train("nv_embed", tmp_path, "--steps", "2", "--pooling", "mean") == 0
    assert "latent_pooling" in metrics(tmp_path)


def test_simcse_supervised_triples_fused_equals_naive(tmp_path):
    common = ["--steps", "4", "--dropout", "0", "--lr", "1e-3", "--mode", "sup"]
    assert train("simcse", tmp_path / "fused", *common, "--loss", "fused") == 0
    assert train("simcse", tmp_path / "naive", *common, "--loss", "naive") == 0
    assert_relative(losses(tmp_path / "fused"), losses(tmp_path / "naive"), 1e-4)


def test_dpr_cosine_score_fused_equals_naive_and_differs_from_dot(tmp_path):
    common = ["--steps", "4", "--dropout", "0", "--lr", "1e-3"]
    assert train("dpr", tmp_path / "fused", *common, "--score", "cosine", "--loss", "fused") == 0
    assert train("dpr", tmp_path / "naive", *common, "--score", "cosine", "--loss", "naive") == 0
    assert train("dpr", tmp_path / "dot", *common) == 0
    cosine = losses(tmp_path / "fused")
    assert_relative(cosine, losses(tmp_path / "naive"), 1e-4)
    assert abs(cosine[0] - losses(tmp_path / "dot")[0]) > 1e-3 * abs(cosine[0])
