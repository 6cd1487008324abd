#!/usr/bin/env bash
# Development build: compiles fastcl._C into ./fastcl (next to the sources) without installing,
# so `python -m pytest` from this directory tests this tree. Usage: ./dev_build.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")"
python=${1:-${PYTHON:-python3}}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTCL_CUDA=${FASTCL_CUDA:-OFF} \
  -DPython_EXECUTABLE="$("$python" -c 'import sys; print(sys.executable)')" \
  -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" >/dev/null
cmake --build build/dev -j2
cp build/dev/_C*.so fastcl/
