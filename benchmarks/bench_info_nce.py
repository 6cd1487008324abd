"""pytest-benchmark microbenchmarks of InfoNCE / CLIP fwd+bwd (CPU or CUDA).

    pytest benchmarks/bench_info_nce.py --benchmark-columns=median,iqr --benchmark-sort=name

Each provider runs on the same inputs as in ``python -m fastcl.bench`` (the same factory), so
the two agree; this file is for quick A/B comparisons while working on a kernel.
"""
import pytest
import torch

import fastcl
from fastcl.bench.suites.info_nce import make_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ["naive", "torch"]
if DEVICE == "cpu" and fastcl.backends()["cpu"].available:
    PROVIDERS.append("cpu")
if DEVICE == "cuda":
    PROVIDERS += [name for name in ("triton", "cuda") if fastcl.backends()[name].available]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("symmetric", [False, True], ids=["info_nce", "clip"])
@pytest.mark.parametrize("batch", [1024, 4096])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_info_nce_fwd_bwd(benchmark, provider, batch, symmetric):
    step = make_step(DEVICE, provider, batch=batch, dim=256, symmetric=symmetric)
    step()

    def run():
        step()
        _sync()

    benchmark.extra_info.update(device=DEVICE, provider=provider, batch=batch, dim=256)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
