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


def test_dpr_mixed_rows_repeat_the_faq_rows_to_the_asked_share():
    from fastcl.trainers.dpr import mixed_rows

    faq_rows = [(f"q{i}", f"p{i}", f"n{i}") for i in range(206)]
    extra = [(f"t{i}", f"s{i}", f"m{i}") for i in range(1869)]
    rows, repeats = mixed_rows(faq_rows, extra, 0.5)
    assert repeats == 9 and len(rows) == 9 * 206 + 1869
    assert rows[:206] == faq_rows and rows[-1869:] == extra
    assert abs(1869 / len(rows) - 0.5) < 0.03  # the share asked, to one repeat
    assert mixed_rows(faq_rows, extra[:10], 0.5) == (faq_rows + extra[:10], 1)  # never fewer than one copy


def test_dpr_extra_rows_come_with_bm25_negatives_that_are_other_sections():
    from fastcl.trainers.data import faq
    from fastcl.trainers.dpr import training_rows

    sections = faq.python_doc_sections()
    if not sections:
        pytest.skip("python3-doc is not installed")
    sample = sections[:300]
    rows = training_rows(sample, list(range(len(sample))), 1)
    passages = {p for _, p in sample}
    assert [(q, p) for q, p, _ in rows] == sample
    assert all(n != p and n in passages for _, p, n in rows)
    # BM25's pick shares a word with the title more often than the next section does
    shared = sum(bool(set(q.lower().split()) & set(n.lower().split())) for q, _, n in rows)
    shifted = sum(bool(set(q.lower().split()) & set(sample[(i + 1) % 300][1].lower().split())) for i, (q, _, _) in enumerate(rows))
    assert shared > shifted
