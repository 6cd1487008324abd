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


@pytest.mark.distributed
@pytest.mark.slow
def test_two_simulated_nodes_with_the_ring_exchange_equal_one_process(tmp_path):
    """Two torchrun launchers (--nnodes 2, one worker each, on this host) with the keys passed
    around the ring instead of all-gathered: the loss curve of one process on the global batch."""
    common = ["--data", "synthetic", *TINY["dpr"], "--steps", "4", "--dropout", "0", "--lr", "1e-3"]
    torchrun("dpr", *common, "--out", str(tmp_path / "ring"), nodes=2, env={"FASTCL_DISTRIBUTED_MODE": "ring"})
    assert train("dpr", tmp_path / "one", "--steps", "4", "--dropout", "0", "--lr", "1e-3") == 0
    assert metrics(tmp_path / "ring")["processes"] == 2
    assert_relative(losses(tmp_path / "ring"), losses(tmp_path / "one"), 1e-4)
