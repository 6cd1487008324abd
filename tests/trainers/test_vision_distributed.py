"""torchrun --nproc_per_node 2 (gloo on CPU) gives PS3's single-process run with the global batch.

PS3 is the vision trainer whose data draw no per-step random numbers (each canvas and its
caption come from (seed, index)), so the two runs see the same batches and must agree; SimCLR's
views and CLIP's captions are drawn per rank, which changes the draws, not the maths.
"""
import pytest

from fastcl.trainers import main

from .helpers import losses, torchrun

TINY = ["--data", "synthetic", "--batch-size", "4", "--canvas-side", "112", "--low-res", "56", "--dim", "16",
        "--depth", "1", "--heads", "2", "--embed-dim", "16", "--eval-canvases", "2", "--timing-batch", "1",
        "--train-canvases", "32", "--steps", "3", "--lr", "1e-3"]


@pytest.mark.distributed
@pytest.mark.slow
def test_ps3_two_gloo_processes_equal_one_with_the_global_batch(tmp_path):
    torchrun("ps3", *TINY, "--out", str(tmp_path / "two"), timeout=600)
    assert main(["ps3", *TINY, "--out", str(tmp_path / "one")]) == 0
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 3
    for step, (a, b) in enumerate(zip(two, one), 1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"
