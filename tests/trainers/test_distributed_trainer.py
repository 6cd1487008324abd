"""torchrun --nproc_per_node 2 (gloo on CPU) gives the single-process run with the global batch."""
import pytest

from .helpers import TINY, assert_relative, losses, metrics, torchrun, train


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("dpr", [])])  # two DDP forwards per step, hard negatives gathered
def test_two_gloo_processes_equal_one_with_the_global_batch(method, extra, tmp_path):
    common = ["--data", "synthetic", *TINY[method], "--steps", "4", "--dropout", "0", "--lr", "1e-3", *extra]
    torchrun(method, *common, "--out", str(tmp_path / "two"))
    assert train(method, tmp_path / "one", "--steps", "4", "--dropout", "0", "--lr", "1e-3", *extra) == 0
    assert metrics(tmp_path / "two")["processes"] == 2
    assert_relative(losses(tmp_path / "two"), losses(tmp_path / "one"), 1e-4)
