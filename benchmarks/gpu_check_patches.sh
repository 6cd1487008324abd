#!/usr/bin/env bash
# GPU check of the patch ops on the device machine, < 5 minutes: build with CUDA,
# run the cuda/triton tests of the patch ops and the encoder, then the patches bench suite
# (issue shapes). Usage: benchmarks/gpu_check_patches.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python}
# in-place build so `python -m pytest` from this directory imports this tree with its CUDA kernels
FASTCL_CUDA=ON ./dev_build.sh "$python"
"$python" -c "import fastcl; print(fastcl.backends())"
"$python" -m pytest tests/ops/test_patches.py tests/test_ps3.py -q -q
"$python" benchmarks/bench_patches.py --device cuda --out bench_results
