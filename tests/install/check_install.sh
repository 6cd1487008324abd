#!/usr/bin/env bash
# What users install, checked outside the source tree (make check-install; CI runs it):
#   1. the wheel in a fresh venv: every backend against naive, with each CPU variant this machine
#      runs forced by FASTCL_CPU_CAPABILITY, and the best one chosen by default;
#   2. the same wheel under qemu as a Nehalem (x86-64-v2: the default kernels must be chosen) and
#      a Haswell (avx2), where qemu-user is installed (apt-get install qemu-user);
#   3. the same wheel with torch 2.14.1 (.venv-vision's torch, when that venv exists);
#   4. the sdist on a machine without a C++ compiler: the install succeeds with the pure-Python
#      package, which matches naive.
# Usage: tests/install/check_install.sh PYTHON "TORCH_PINS"   (after `make wheel sdist`)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
python=${1:-python3}
torch_pins=${2:-torch==2.13.0}
wheel=$(ls "$root"/dist/fastcl-*.whl | head -1)
sdist=$(ls "$root"/dist/fastcl-*.tar.gz | head -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
smoke="$root/tests/install/smoke.py"
log() { echo "[check-install $(date +%H:%M:%S)] $*"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1

log "wheel: $wheel"
case "$wheel" in
  *py3-none-manylinux_2_28_*|*py3-none-manylinux_2_27_x86_64.manylinux_2_28_*) ;;
  *) echo "expected a py3-none manylinux_2_28 wheel, got $wheel" >&2; exit 1 ;;
esac
if unzip -l "$wheel" | grep -q -E "libgomp|libomp|libiomp"; then
  echo "the wheel bundles an OpenMP runtime; it must use torch's" >&2; exit 1
fi

log "1. fresh venv with $torch_pins and the wheel (no source tree on the path)"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q $torch_pins
"$work/venv/bin/pip" install -q --no-deps "$wheel"
cd "$work"
supported=$("$work/venv/bin/python" -c 'from fastcl._native import native_module; print(*native_module().cpu_supported)')
best=${supported##* }
log "this CPU runs: $supported (best: $best)"
"$work/venv/bin/python" "$smoke" --expect-capability "$best"
for capability in $supported; do
  FASTCL_CPU_CAPABILITY=$capability "$work/venv/bin/python" "$smoke" --expect-capability "$capability" | tail -1
done

log "2. qemu-user as older CPUs"
if command -v qemu-x86_64 >/dev/null 2>&1 && [ "$(uname -m)" = x86_64 ]; then
  for pair in Nehalem:default Haswell:avx2; do
    cpu=${pair%%:*} expected=${pair##*:}
    log "qemu-x86_64 -cpu $cpu: expecting the $expected kernels"
    timeout 900 qemu-x86_64 -cpu "$cpu" "$work/venv/bin/python" "$smoke" --expect-capability "$expected"
  done
else
  log "qemu-x86_64 not installed (apt-get install qemu-user): the older-CPU runs are left out"
fi

log "3. the same wheel with torch 2.14.1"
if [ -x "$root/.venv-vision/bin/python" ]; then
  "$root/.venv-vision/bin/pip" install -q --no-deps --target "$work/site-2.14" "$wheel"
  PYTHONPATH="$work/site-2.14" "$root/.venv-vision/bin/python" "$smoke" --expect-capability "$best" | tail -2
else
  log "no .venv-vision (make test-vision makes it): left out"
fi

log "4. the sdist without a C++ compiler"
"$python" -m venv "$work/fallback"
"$work/fallback/bin/pip" install -q $torch_pins
"$work/fallback/bin/pip" install -q scikit-build-core cmake ninja
CC=/nonexistent/cc CXX=/nonexistent/c++ CMAKE_ARGS="-DCMAKE_CXX_COMPILER=/nonexistent/c++" \
  "$work/fallback/bin/pip" install -v --no-deps --no-build-isolation "$sdist" > "$work/fallback.log" 2>&1 \
  || { cat "$work/fallback.log"; echo "the sdist did not install without a compiler" >&2; exit 1; }
grep -q "pure-Python package" "$work/fallback.log" || { cat "$work/fallback.log"; echo "no fallback message" >&2; exit 1; }
if ls "$work"/fallback/lib/python*/site-packages/fastcl/_kernels_* >/dev/null 2>&1; then
  echo "the fallback install holds native libraries: the compiler was not really missing" >&2; exit 1
fi
"$work/fallback/bin/python" "$smoke" --expect-fallback | tail -2
log "all install checks passed"
