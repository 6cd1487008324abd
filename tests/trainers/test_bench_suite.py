"""The trainers bench suite: each method's rows come from its own module; the table and CSV."""
import csv

import pytest

from .helpers import TINY  # noqa: F401  (skips without the trainers extra)

from fastcl.bench.suites import trainers as suite  # noqa: E402
from fastcl.trainers import load_method  # noqa: E402


def test_every_method_registers_its_bench_rows():
    from fastcl.trainers import METHODS

    for name in METHODS:
        assert "--steps" in load_method(name).BENCH_ARGS, name


@pytest.mark.slow
def test_suite_runs_naive_and_fused_and_writes_table_and_csv(tmp_path, monkeypatch, capsys):
    simcse = load_method("simcse")
    monkeypatch.setattr(simcse, "BENCH_ARGS", ["--data", "synthetic", "--steps", "2", *TINY["simcse"]])
    rows = suite.run("cpu", False, str(tmp_path), methods=["simcse"], providers=["naive", "fused"], batch_search=False)
    assert [r["provider"] for r in rows] == ["naive", "fused"]
    assert all(r["status"] == "ok" and r["time_per_step_s"] > 0 and r["goal_metric"] == "spearman" for r in rows)
    table = capsys.readouterr().out
    assert "x naive" in table and "simcse" in table
    with open(tmp_path / "trainers.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["provider"] for r in written] == ["naive", "fused"]


@pytest.mark.slow
def test_suite_takes_a_methods_peer_rows_and_its_own_search(tmp_path, monkeypatch):
    """PS3: the full high-res ViT row comes from ps3.BENCH_PEERS, the largest canvas from the
    suite's canvas search over ps3.bench_canvas_step (here with small sides: the real search
    trains at 1512 px)."""
    from .test_vision_distributed import TINY as PS3_TINY

    ps3 = load_method("ps3")
    monkeypatch.setattr(ps3, "BENCH_ARGS", [*PS3_TINY[:-4], "--steps", "2", "--lr", "1e-3"])
    monkeypatch.setattr(suite, "CANVAS_SIDES", (56, 112))
    monkeypatch.setattr(suite, "MEMORY_CAP_MB", 1e6)
    rows = suite.run("cpu", False, str(tmp_path), methods=["ps3"], providers=["fused+grad_cache32", "peers"])
    assert [r["provider"] for r in rows] == ["fused+grad_cache32", "full high-res ViT"]
    assert all(r["status"] == "ok" and r["time_per_step_s"] > 0 and r["goal_metric"] == "box_recall" for r in rows), rows
    assert rows[0]["largest_batch_2gb"] == "side 112 (full: 112)"
