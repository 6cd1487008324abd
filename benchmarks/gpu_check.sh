#!/usr/bin/env bash
# The GPU check, one command on a machine with a GPU (no internet needed), <= 5 minutes on one
# H100 / H200:
#   benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine
#   benchmarks/gpu_check.sh OUT_DIR --dry-run   # anywhere: CPU, Triton interpreter, tiny sizes
# Steps (each with a share of the time budget, stopped with exit status 124 when over):
# 1. installs fastcl (`pip install --no-build-isolation --no-deps .`; CUDA kernels built when
#    nvcc and a driver are present) and Inf-CL when its wheel is carried (wheels/inf_cl-*.whl,
#    fetched elsewhere with `pip download --no-deps -d wheels inf-cl`; never committed);
# 2. compiles every Triton kernel and variant for this GPU's architecture, every autotuning
#    configuration included (benchmarks/triton_compile_check.py --all-configs), in the
#    background on the CPU while the GPU steps run;
# 3. runs the `cuda` tests AND the Triton parity tests (`-m "cuda or triton"`: on a GPU the
#    Triton tests run compiled on CUDA tensors) with one pinned tile configuration (correctness;
#    each autotuning candidate would be one more compile per option set): first the cuda tests,
#    the GPU-path tests and the patch / latent-attention ones, then (after the benchmark)
#    the InfoNCE / SigLIP parity tests in bf16, then in fp32 / fp16 with the time left;
# 4. the InfoNCE / CLIP benchmark (benchmarks/bench_info_nce_gpu.py): B = 65536 and B = 1M CLIP
#    rows against Inf-CL and naive, achieved TFLOP/s, the autotuned (not pinned) kernels'
#    parity with bf16 products, and a CUDA-graph capture of a training step;
# 5. the latent-attention, patch and SigLIP suites of `python -m fastcl.bench --device cuda`;
# 6. writes OUT_DIR/summary.md, one file a reader can paste (every step's status, the tests'
#    line, the compile check's line, the benchmark tables and goals, the suites' rows).
# Everything else lands in OUT_DIR too: gpu_check.log, install.log, compile_check.log,
# tests_*.log/.xml, info_nce_gpu.csv/.md/.log, bench/ (suite CSVs and plots), triton_tiles.json
# (the tuned tile choices). GPU_CHECK_BUDGET seconds in all (default 290).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run]}
dry_run=0
[ "${2:-}" = "--dry-run" ] && dry_run=1
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${PYTHON:-python}
budget=${GPU_CHECK_BUDGET:-290}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( budget - $(elapsed) )); }
share() { local s=$(( $(left) - $1 )); [ "$s" -lt "$2" ] && s=$2; echo "$s"; }  # share RESERVE MINIMUM
cap() { local s; s=$(share "$2" "$3"); [ "$s" -gt "$1" ] && s=$1; echo "$s"; }  # cap MAX RESERVE MINIMUM
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$out/gpu_check.log"; }
declare -A step_status
steps="install compile_check tests_cuda_and_gpu_paths info_nce_gpu tests_triton_bf16 suites tests_triton_other"
for step in $steps; do step_status[$step]="not run"; done
export FASTCL_TUNE_CACHE="$out/triton_tiles.json"

if [ "$dry_run" = 1 ]; then
  export TRITON_INTERPRET=1
  device="dry run: CPU, Triton interpreter"
  arch=90
  log "dry run: no install, tiny sizes, CPU tensors"
  step_status[install]="skipped (dry run)"
else
  device=$($python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)
  if [ -z "$device" ]; then
    log "no CUDA device visible to $python: nothing to check (use --dry-run to exercise this script)"; exit 1
  fi
  arch=$($python -c 'import torch; a, b = torch.cuda.get_device_capability(0); print(10 * a + b)')
  log "device: $device (sm_$arch)"
  log "installing fastcl"
  if $python -m pip install --no-build-isolation --no-deps . > "$out/install.log" 2>&1; then
    step_status[install]=0
  else
    # a CUDA toolchain that cannot build the native kernels must not cost the Triton figures
    log "pip install failed (see install.log); retrying without the native CUDA kernels (FASTCL_CUDA=OFF)"
    tail -20 "$out/install.log"
    if FASTCL_CUDA=OFF $python -m pip install --no-build-isolation --no-deps . >> "$out/install.log" 2>&1; then
      step_status[install]="0 (without the native CUDA kernels)"
    else
      log "pip install failed again (see install.log)"; tail -20 "$out/install.log"; exit 1
    fi
  fi
  # Tests run from this tree (pytest puts it first on sys.path): give it the freshly built libraries.
  installed=$(cd / && $python -c 'import fastcl, os; print(os.path.dirname(fastcl.__file__))')
  cp "$installed"/_kernels_*.so fastcl/ 2>/dev/null || log "no native libraries in $installed"
  if compgen -G "wheels/inf_cl-*.whl" > /dev/null; then
    $python -m pip install --no-deps wheels/inf_cl-*.whl >> "$out/install.log" 2>&1 && log "Inf-CL installed from wheels/" \
      || log "Inf-CL wheel did not install (see install.log)"
  else
    log "no wheels/inf_cl-*.whl: the Inf-CL rows are left out"
  fi
fi
$python -c 'import fastcl; [print(" ", b) for b in fastcl.backends().values()]' 2>&1 | tee -a "$out/gpu_check.log"

log "compile check (background, sm_$arch)"
if [ "$dry_run" = 1 ]; then compile_args=(--quick --arch "$arch" --only "pair dot" --only "latent softmax fwd")
else compile_args=(--all-configs --arch "$arch"); fi
( env -u TRITON_INTERPRET timeout "$(share 15 30)" $python benchmarks/triton_compile_check.py "${compile_args[@]}" \
    > "$out/compile_check.log" 2>&1; echo $? > "$out/compile_check.rc" ) &
compile_pid=$!

# The tests, most telling first (each option set and dtype is one more compile on the device):
# the cuda-marked tests and the GPU-path tests, then the Triton parity tests in bf16, and
# (after the benchmarks, with the time left) their fp32 / fp16 cases. One pinned tile
# configuration: the tests check correctness; the benchmark checks the autotuned kernels.
run_tests() {  # STEP SECONDS PYTEST-ARGS...
  local step=$1 seconds=$2; shift 2
  log "pytest $* (up to ${seconds}s)"
  FASTCL_TRITON_CONFIG=${FASTCL_TRITON_CONFIG:-64,64,64,8,2} timeout "$seconds" \
    $python -m pytest -q -p no:cacheprovider --junitxml="$out/$step.xml" "$@" > "$out/$step.log" 2>&1
  step_status[$step]=$?
  tail -8 "$out/$step.log"
}
if [ "$dry_run" = 1 ]; then
  run_tests tests_cuda_and_gpu_paths "$(cap 120 150 30)" -m "cuda or triton" tests/ops/test_gpu_paths.py -k "softplus or cuda_kernels"
else
  run_tests tests_cuda_and_gpu_paths "$(cap 90 150 30)" -m "cuda or triton" tests/ops/test_info_nce_cuda.py \
    tests/ops/test_gpu_paths.py tests/ops/test_patches.py tests/ops/test_latent_attention.py tests/test_ps3.py
fi

log "InfoNCE / CLIP benchmark"
bench_args=(--out "$out")
[ "$dry_run" = 1 ] && bench_args+=(--dry-run)
timeout "$(cap 110 60 45)" $python benchmarks/bench_info_nce_gpu.py "${bench_args[@]}" > "$out/info_nce_gpu.log" 2>&1
step_status[info_nce_gpu]=$?
tail -25 "$out/info_nce_gpu.log"

if [ "$dry_run" = 1 ]; then
  step_status[tests_triton_bf16]="skipped (dry run)"
else
  run_tests tests_triton_bf16 "$(cap 60 45 20)" -m triton tests/ops/test_info_nce_triton.py -k bfloat16
fi

if [ "$dry_run" = 1 ]; then
  step_status[suites]="skipped (dry run)"
else
  log "python -m fastcl.bench --device cuda: latent_attention, patches, siglip"
  # one suite at a time, each with an equal share of the time left (a suite writes its CSV
  # when it finishes, so a suite stopped by the budget does not cost the others theirs)
  step_status[suites]=0
  remaining=3
  for suite in latent_attention patches siglip; do
    s=$(( ($(left) - 35) / remaining )); [ "$s" -lt 15 ] && s=15
    log "  suite $suite (up to ${s}s)"
    timeout "$s" $python -m fastcl.bench --device cuda --suite "$suite" --out "$out/bench" --timeout 40 \
      >> "$out/bench.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || { step_status[suites]=$rc; log "  suite $suite: exit status $rc"; }
    remaining=$(( remaining - 1 ))
  done
  tail -30 "$out/bench.log"
fi

if [ "$dry_run" = 1 ] || [ "$(left)" -lt 25 ]; then
  step_status[tests_triton_other]="not run (dry run or no time left)"
else
  run_tests tests_triton_other "$(share 10 15)" -m triton tests/ops/test_ring_triton.py tests/ops/test_info_nce_triton.py -k "not bfloat16"
fi

wait "$compile_pid"
step_status[compile_check]=$(cat "$out/compile_check.rc" 2>/dev/null || echo "no status")

summary_file="$out/summary.md"
{
  echo "# GPU check"
  echo
  echo "- device: $device"
  echo "- torch $($python -c 'import torch; print(torch.__version__)'), triton $($python -c 'import triton; print(triton.__version__)' 2>&1 | tail -1), fastcl commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- total time: $(elapsed) s of a ${budget} s budget (exit status 124 = stopped by the time budget)"
  for step in $steps; do echo "- $step: exit status ${step_status[$step]}"; done
  for step in tests_cuda_and_gpu_paths tests_triton_bf16 tests_triton_other; do
    [ -f "$out/$step.log" ] && echo "- $step: $(grep -E '(passed|failed|error|skipped)' "$out/$step.log" | tail -1)"
    grep -E '^(FAILED|ERROR) ' "$out/$step.log" 2>/dev/null | head -10 | sed 's/^/  - /'
  done
  echo "- compile check (sm_$arch): $(grep -E 'compiles in' "$out/compile_check.log" 2>/dev/null | tail -1)"
  grep -E "OVER the|FAILED" "$out/compile_check.log" 2>/dev/null | head -10 | sed 's/^/  - /'
  echo
  if [ -f "$out/info_nce_gpu.md" ]; then sed 's/^# /## /' "$out/info_nce_gpu.md"; else echo "## InfoNCE / CLIP: no results"; fi
  for suite in latent_attention patches siglip; do
    csv="$out/bench/$suite.csv"
    if [ -f "$csv" ]; then
      echo; echo "## suite $suite"; echo; echo '```'; cat "$csv"; echo '```'
    fi
  done
} > "$summary_file"
log "done: $summary_file"
cat "$summary_file"
failed=0
for step in tests_cuda_and_gpu_paths info_nce_gpu compile_check; do [ "${step_status[$step]}" = 0 ] || failed=1; done
exit $failed
