#!/usr/bin/env bash
# Development build: compiles the native libraries (fastcl/_kernels_*.so) into ./fastcl, next to
# the sources, without installing,
# so `python -m pytest` from this directory tests this tree. Usage: ./dev_build.sh
set -euo pipefail
cd "$(dirname "$0")"
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTCL_CUDA=${FASTCL_CUDA:-OFF} >/dev/null
cmake --build build/dev -j2
cp build/dev/_kernels_*.so fastcl/
