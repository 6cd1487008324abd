#!/usr/bin/env bash
# GPU check of the patch ops (issue 6) on the device machine, < 5 minutes: build with CUDA,
# run the cuda/triton tests of the patch ops and the encoder, then the patches bench suite
# (issue shapes). Usage: benchmarks/gpu_check_patches.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python}
FASTCL_CUDA=ON "$python" -m pip install --no-build-isolation --no-deps . >/dev/null
"$python" -c "import fastcl; print(fastcl.backends())"
"$python" -m pytest tests/ops/test_patches.py tests/test_ps3.py -q -m "cuda or triton or not cuda"
"$python" benchmarks/bench_patches.py --device cuda --out bench_results
