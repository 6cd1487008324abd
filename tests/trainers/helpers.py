"""Run a trainer in this process (the imports are paid once) and read what it wrote."""
from __future__ import annotations

import json
import os
from typing import List

import pytest

pytest.importorskip("accelerate", reason="the trainers extra is not installed (pip install -e '.[trainers]')")
pytest.importorskip("transformers", reason="the trainers extra is not installed")
pytest.importorskip("rank_bm25", reason="the trainers extra is not installed")

from fastcl.trainers import main  # noqa: E402

# Tiny and fast: the 2-layer BERT of the synthetic runs, short texts, a few latents.
TINY = {
    "simcse": ["--batch-size", "8", "--max-length", "16", "--eval-max-length", "24"],
    "dpr": ["--batch-size", "8", "--max-length", "16", "--passage-max-length", "24", "--eval-max-length", "24"],
    "nv_embed": ["--batch-size", "8", "--max-length", "16", "--passage-max-length", "24", "--eval-max-length", "24",
                 "--num-latents", "8", "--num-heads", "2"],
}


def train(method: str, out, *args: str) -> int:
    return main([method, "--data", "synthetic", *TINY[method], "--out", str(out), *args])


def losses(out) -> List[float]:
    with open(os.path.join(str(out), "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def metrics(out) -> dict:
    with open(os.path.join(str(out), "metrics.json")) as f:
        return json.load(f)


def assert_relative(a: List[float], b: List[float], tolerance: float) -> None:
    assert len(a) == len(b) and a, (a, b)
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= tolerance * max(abs(y), 1e-6), f"step {step}: {x} vs {y} (relative {abs(x - y) / abs(y):.2e})"
