"""--seeds: one run per seed in OUT/seed-N and OUT/metrics.json with the mean and spread of every
metric (fastcl/trainers/seeds.py)."""
import json
import statistics

import pytest

from fastcl.trainers.seeds import aggregate, parse_seeds

from .helpers import metrics, train


def test_aggregate_is_the_mean_and_sample_spread_of_every_number_in_the_runs_nesting():
    runs = [{"seed": s, "method": "dpr", "recall@1": r, "bm25": {"recall@1": b}, "note": n}
            for s, r, b, n in ((0, 0.70, 0.5, "a"), (1, 0.74, 0.5, "a"), (2, 0.75, 0.5, "b"))]
    summary = aggregate(runs, [0, 1, 2])
    values = [0.70, 0.74, 0.75]
    assert summary["seeds"] == [0, 1, 2]
    assert summary["mean"]["recall@1"] == pytest.approx(statistics.mean(values))
    assert summary["std"]["recall@1"] == pytest.approx(statistics.stdev(values))
    assert (summary["min"]["recall@1"], summary["max"]["recall@1"]) == (0.70, 0.75)
    assert summary["mean"]["bm25"] == {"recall@1": 0.5} and summary["std"]["bm25"] == {"recall@1": 0.0}
    assert summary["mean"]["method"] == "dpr"  # the same in every run: kept
    assert "note" not in summary["mean"] and "seed" not in summary["mean"]  # differing text, the seed itself
    assert summary["per_seed"]["1"] == runs[1]


@pytest.mark.parametrize("text", ["0", "0,0", "a,b", "1;2"])
def test_bad_seeds_are_a_clear_error(text):
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds(text)


def test_seeds_runs_each_seed_and_writes_the_summary(tmp_path):
    out = tmp_path / "runs"
    assert train("simcse", out, "--steps", "1", "--seeds", "3,4") == 0
    per_seed = [metrics(out / f"seed-{seed}") for seed in (3, 4)]
    assert [run["seed"] for run in per_seed] == [3, 4]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["mean"]["spearman"] == pytest.approx(statistics.mean(run["spearman"] for run in per_seed))
    assert summary["std"]["before"]["spearman"] == pytest.approx(
        statistics.stdev(run["before"]["spearman"] for run in per_seed))
    assert train("simcse", out, "--steps", "1", "--seeds", "3,4") == 2  # a summary is there: refused
