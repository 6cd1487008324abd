"""The GPU check's scripts, smoke-tested on CPU: a GPU session has minutes, not time to debug them.

benchmarks/bench_info_nce_gpu.py runs its measurement loop here on CPU tensors (the Triton
kernels in the interpreter) at a tiny size, and its summary is built from the rows; the shell
script is parsed by bash.
"""
import importlib.util
import os
import shutil
import subprocess

import pytest
import torch

import fastcl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_info_nce_gpu", os.path.join(ROOT, "benchmarks", "bench_info_nce_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")
def test_bench_rows_and_summary_on_cpu():
    bench = _load_bench()
    providers = ["naive"] + (["triton"] if fastcl.backends()["triton"].available else [])
    rows = [bench.run_case("clip", provider, 24, 24, 16, True, repeats=1, dtype=torch.float32, device="cpu")
            for provider in providers]
    for row in rows:
        assert row["status"] == "ok", row
        assert float(row["time_ms"]) > 0
    if len(rows) == 2:  # the same loss from both providers
        assert float(rows[0]["loss"]) == pytest.approx(float(rows[1]["loss"]), rel=1e-4)
    text = bench.summary(rows, "cpu", quick=True)
    assert "| clip | naive | 24 | 24 | 16 |" in text
    assert "CLIP time triton / naive" in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_scripts_parse():
    for script in ("gpu_check.sh", "gpu_check_patches.sh"):
        path = os.path.join(ROOT, "benchmarks", script)
        if os.path.exists(path):
            subprocess.run(["bash", "-n", path], check=True)


def test_summary_compares_with_naive_where_it_fits():
    bench = _load_bench()

    def row(case, provider, batch, time_ms, status="ok"):
        return {"case": case, "provider": provider, "batch": batch, "num_keys": batch, "dim": 512,
                "dtype": "bfloat16", "symmetric": True, "time_ms": str(time_ms), "tflops": "1", "pct_of_h100_peak": "1",
                "peak_extra_mb": "1", "beyond_grads_mb": "1", "loss": "1", "status": status}

    rows = [row("clip", "triton", 65536, 40.0), row("clip", "inf_cl", 65536, 100.0),
            row("clip", "naive", 65536, "", status="out of memory"),
            row("clip_fit", "naive", 32768, 20.0), row("clip_fit", "triton", 32768, 15.0)]
    text = bench.summary(rows, "test", quick=False)
    assert "triton / inf_cl at B=65536 = 0.40 (goal <= 0.7): met" in text
    assert "triton / naive at B=32768 = 0.75 (goal <= 1.0): met" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_dry_run_writes_the_summary(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every step the GPU run takes, on CPU at tiny sizes
    (Triton interpreter), down to the summary a reader pastes."""
    import sys

    environment = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_BUDGET="600")
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(tmp_path), "--dry-run"],
                            env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for line in ("# GPU check", "- compile_check: exit status 0", "- tests_cuda_and_gpu_paths: exit status 0",
                 "- info_nce_gpu: exit status 0", "| clip | triton |", "| clip_1m | triton |",
                 "CUDA-graph capture of a CLIP step: not run", "autotuned triton vs naive"):
        assert line in summary, line
