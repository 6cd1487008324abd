"""torchrun --nproc_per_node 2 (gloo on CPU) gives PS3's single-process run with the global batch.

PS3 is the vision trainer whose data draw no per-step random numbers (each canvas and its
caption come from (seed, index)), so the two runs see the same batches and must agree; SimCLR's
views and CLIP's captions are drawn per rank, which changes the draws, not the maths.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from fastcl.trainers import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--data", "synthetic", "--batch-size", "4", "--canvas-side", "112", "--low-res", "56", "--dim", "16",
        "--depth", "1", "--heads", "2", "--embed-dim", "16", "--eval-canvases", "2", "--timing-batch", "1",
        "--train-canvases", "32", "--steps", "3", "--lr", "1e-3"]


def free_port() -> int:
    # an explicit port: with --master_port 0 the workers never met on this machine (rendezvous hang)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def losses(out):
    with open(os.path.join(str(out), "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.distributed
@pytest.mark.slow
def test_ps3_two_gloo_processes_equal_one_with_the_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "fastcl.trainers", "ps3", *TINY, "--out", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    assert main(["ps3", *TINY, "--out", str(tmp_path / "one")]) == 0
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 3
    for step, (a, b) in enumerate(zip(two, one), 1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"
