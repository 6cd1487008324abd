"""Run a trainer in this process (the imports are paid once) and read what it wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torchrun(method: str, *args: str, timeout: int = 300) -> str:
    """``torchrun --standalone --nproc_per_node 2 -m fastcl.trainers METHOD ARGS`` (gloo on CPU,
    one thread per worker); asserts it succeeded on 2 processes and returns its stdout. On a
    timeout the whole process group (torchrun and both workers) is killed."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastcl.trainers", method, *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s: {stderr[-2000:]}")
    assert process.returncode == 0, stderr[-3000:]
    assert "on 2 process(es)" in stdout
    return stdout
