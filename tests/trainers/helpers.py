"""Run a trainer in this process (the imports are paid once) and read what it wrote."""
from __future__ import annotations

import json
import os
import signal
import socket
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


def torchrun(method: str, *args: str, timeout: int = 300, nodes: int = 1, env=None) -> str:
    """``torchrun --standalone --nproc_per_node 2 -m fastcl.trainers METHOD ARGS`` (gloo on CPU,
    one thread per worker); with ``nodes=2``, two launchers of one worker each, ``--nnodes 2``
    on this host (a simulated two-node run). Asserts it succeeded on 2 processes and returns the
    first launcher's stdout. On a timeout every launcher and worker is killed."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **(env or {})}
    if nodes == 1:
        launchers = [["--standalone", "--nproc_per_node", "2"]]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launchers = [["--nnodes", str(nodes), "--node_rank", str(rank), "--nproc_per_node", "1",
                      "--master_addr", "127.0.0.1", "--master_port", str(port)] for rank in range(nodes)]
    processes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "fastcl.trainers",
                                   method, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=ROOT, start_new_session=True) for launcher in launchers]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other in processes:
                os.killpg(other.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"torchrun did not finish in {timeout} s: {stderr[-2000:]}")
        assert process.returncode == 0, outputs[-1][1][-3000:]
    stdout = outputs[0][0]
    assert "on 2 process(es)" in stdout
    return stdout
