"""torchrun --nproc_per_node 2 (gloo on CPU) gives the single-process run with the global batch."""
import os
import signal
import subprocess
import sys

import pytest

from .helpers import TINY, assert_relative, losses, metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("dpr", [])])  # two DDP forwards per step, hard negatives gathered
def test_two_gloo_processes_equal_one_with_the_global_batch(method, extra, tmp_path):
    common = ["--data", "synthetic", *TINY[method], "--steps", "4", "--dropout", "0", "--lr", "1e-3", *extra]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastcl.trainers", method, *common, "--out", str(tmp_path / "two")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 300 s: {stderr[-2000:]}")
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    assert train(method, tmp_path / "one", "--steps", "4", "--dropout", "0", "--lr", "1e-3", *extra) == 0
    assert metrics(tmp_path / "two")["processes"] == 2
    assert_relative(losses(tmp_path / "two"), losses(tmp_path / "one"), 1e-4)
