"""Compile fastcl's Triton kernels for NVIDIA GPUs on a machine without one (ahead of time).

    python benchmarks/triton_compile_check.py [--arch 80 --arch 90] [--quick] [--all-configs]
                                              [--only TEXT] [--dtype DTYPE] [--unaligned]

The interpreter tests check the kernels' maths but not that they compile: this runs Triton's
real pipeline (Triton IR -> GPU IR -> PTX -> cubin with the bundled ptxas) for every
``@triton.jit`` kernel in fastcl (InfoNCE, SigLIP, latent attention, patch gather; the helpers
of fastcl/ops/common/triton_runtime.py are compiled inside the kernels that call them), for a sample of
option sets and dtypes that together reach every branch, and prints shared memory, registers
per thread and spilled bytes (ptxas's own report) for each. A kernel found in those modules
but missing from the plan fails the run, so a new kernel cannot go unchecked.

Launches are assumed typical: pointers 16-byte aligned and the sizes named in ``ALIGNED_SIZES``
multiples of 16, so the kernels specialize as they would at run time (``--unaligned`` drops
that). ``CAST_DOT=True`` is the interpreter's path for CPU tensors and is not compiled. Tiled
kernels use their first autotuning configuration; ``--all-configs`` compiles every configuration
of the tiled kernels and flags those whose shared memory exceeds the GPU's (the autotuner skips
those on the device). Each run compiles into a fresh Triton cache, so nothing is skipped.

About two minutes on two cores (``--quick``: every kernel once, under half a minute). Exit status
1 if anything fails to compile or a kernel is missing from the plan.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional, Tuple

# Compile for real, into a cache of our own: a cache hit would skip the compile (and ptxas's
# report) and say nothing about this triton.
os.environ.pop("TRITON_INTERPRET", None)
_CACHE = tempfile.mkdtemp(prefix="fastcl-triton-compile-check-")
os.environ["TRITON_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# this checkout's fastcl before any installed one
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastcl.ops.common import triton_runtime as triton_common  # noqa: E402
from fastcl.ops.info_nce import ring_triton as ring_kernels  # noqa: E402
from fastcl.ops.info_nce import triton as info_nce_kernels  # noqa: E402
from fastcl.ops.latent_attention import triton as latent_attention_kernels  # noqa: E402
from fastcl.ops.patches import triton as patches_kernels  # noqa: E402
from fastcl.ops.siglip import triton as siglip_kernels  # noqa: E402

KERNEL_MODULES = [info_nce_kernels, ring_kernels, siglip_kernels, latent_attention_kernels, patches_kernels,
                  triton_common]

# Argument types by name (every kernel names its arguments consistently): pointers to the input
# dtype, to int64 indices, to float32 (any other ``*_ptr``), float32 scalars, and int32 sizes.
DATA_POINTERS = {
    "anchor_ptr", "candidate_ptr", "private_ptr", "image_ptr", "text_ptr", "a_ptr", "b_ptr",  # InfoNCE, SigLIP
    "scores_ptr", "probs_ptr", "grad_ptr", "u_ptr", "gated_ptr", "grad_gated_ptr", "grad_u_ptr",  # latent attention
    "images", "out", "grad_out",  # patches
}
INDEX_POINTERS = {"positive_ptr", "anchor_label_ptr", "candidate_label_ptr", "num_positive_ptr", "index_ptr",
                  "index", "row_index0", "row_index1", "col_index0", "col_index1"}
FLOAT_POINTERS = {"row_lambda1", "col_lambda1", "grad_images"}
BYTE_POINTERS = {"row_filter_ptr"}  # int8 flags
# temperature, logit scale / bias and the gradient scale are read from device memory (*_ptr, fp32)
FLOAT_SCALARS = {"margin", "label_smoothing"}
ALIGNED_SIZES = {"dim", "cols", "width"}  # embedding size, latents per row, GEGLU width
TYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}

# Largest shared memory one block may use (opt-in), bytes: the table the tile checks use.
SHARED_MEMORY_LIMIT = triton_common.SHARED_MEMORY_LIMIT


def signature(fn, dtype: str, constexprs: dict) -> dict:
    out = {}
    for name in fn.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in DATA_POINTERS:
            out[name] = "*" + TYPE_NAMES[dtype]
        elif name in INDEX_POINTERS:
            out[name] = "*i64"
        elif name in BYTE_POINTERS:
            out[name] = "*i8"
        elif name in FLOAT_POINTERS or name.endswith("_ptr"):
            out[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            out[name] = "fp32"
        else:
            out[name] = "i32"
    return out


def alignment(fn, types: dict) -> dict:
    """What a launch with aligned pointers and sizes divisible by 16 tells the compiler."""
    return {(index,): [["tt.divisibility", 16]] for index, name in enumerate(fn.arg_names)
            if types[name].startswith("*") or name in ALIGNED_SIZES}


@dataclass
class Job:
    name: str
    fn: JITFunction
    dtype: str
    constexprs: dict
    tiles: Optional[Tuple[int, ...]] = None  # BLOCK_M, BLOCK_N, BLOCK_D[, ACC_D], num_warps, num_stages
    quick: bool = False  # part of --quick (every kernel once)
    options: dict = field(default_factory=dict)


def jit_function(obj) -> Optional[JITFunction]:
    """The JITFunction behind a kernel object (autotuned kernels wrap it), else None."""
    while obj is not None and not isinstance(obj, JITFunction):
        obj = getattr(obj, "fn", None)
    return obj


def all_jit_functions():
    found = {}
    for module in KERNEL_MODULES:
        for value in vars(module).values():
            fn = jit_function(value)
            if fn is not None and fn.fn.__module__ == module.__name__:
                found[fn.__name__] = fn
    return found


def kernels_and_helpers():
    """Split the jit functions into kernels (called by no other) and helpers (called by some)."""
    functions = all_jit_functions()
    called = set()
    for name, fn in functions.items():
        for other in functions:
            if other != name and re.search(rf"\b{other}\s*\(", fn.src):
                called.add(other)
    kernels = {name: fn for name, fn in functions.items() if name not in called}
    return kernels, sorted(called)


def rows_flags(**overrides):
    flags = dict(MODE=0, STAGE=1, HAS_PRIVATE=False, NORMALIZE=False, EXCLUDE_SELF=False, HAS_LABELS=False,
                 HAS_MARGIN=False, SMOOTHING=False, FUSED_COLUMNS=False, HAS_FILTER=False, CAST_DOT=False,
                 DOT_PRECISION="tf32")
    flags.update(overrides)
    return flags


def tile_flags(**overrides):
    """Flags of the backward tile kernels (hard negatives have a kernel of their own)."""
    flags = rows_flags(**overrides)
    del flags["HAS_PRIVATE"], flags["HAS_FILTER"]
    return flags


def private_flags(**overrides):
    flags = dict(MODE=0, NORMALIZE=False, HAS_LABELS=False, HAS_MARGIN=False, SMOOTHING=False, BLOCK_M=32,
                 BLOCK_D=64)
    flags.update(overrides)
    return flags


# the host launches the hard-negative kernel with 8 warps
PRIVATE_OPTIONS = dict(num_warps=8)


def info_nce_jobs():
    forward = jit_function(info_nce_kernels.info_nce_fwd_kernel_rows)
    rows = jit_function(info_nce_kernels.info_nce_bwd_kernel_rows)
    columns = jit_function(info_nce_kernels.info_nce_bwd_kernel_columns)
    private = jit_function(info_nce_kernels.info_nce_bwd_kernel_private)
    pair_dot = jit_function(info_nce_kernels.info_nce_fwd_kernel_pair_dot)
    everything = dict(NORMALIZE=True, HAS_LABELS=True, HAS_MARGIN=True, SMOOTHING=True, FUSED_COLUMNS=True)
    supcon = dict(MODE=1, HAS_LABELS=True, EXCLUDE_SELF=True)
    fwd_tiles = triton_common.FORWARD_CONFIGS[0]
    rows_tiles, columns_tiles = triton_common.BACKWARD_ROWS_CONFIGS[0], triton_common.BACKWARD_COLUMNS_CONFIGS[0]
    # float32 tiles take twice the shared memory: configurations that fit an A100; --all-configs
    # compiles the others
    fwd_fp32 = triton_common.FORWARD_CONFIGS[2]
    rows_fp32, columns_fp32 = triton_common.BACKWARD_ROWS_CONFIGS[-1], triton_common.BACKWARD_COLUMNS_CONFIGS[-1]
    return [
        Job("fwd clip", forward, "bfloat16", rows_flags(FUSED_COLUMNS=True), fwd_tiles, quick=True),
        Job("bwd rows clip", rows, "bfloat16", tile_flags(FUSED_COLUMNS=True), rows_tiles, quick=True),
        Job("bwd columns clip", columns, "bfloat16", tile_flags(FUSED_COLUMNS=True), columns_tiles, quick=True),
        Job("fwd column recompute", forward, "bfloat16", rows_flags(HAS_FILTER=True), fwd_tiles, quick=True),
        Job("fwd column recompute all", forward, "bfloat16",
            rows_flags(HAS_FILTER=True, NORMALIZE=True, HAS_LABELS=True, HAS_MARGIN=True, SMOOTHING=True), fwd_tiles),
        Job("fwd deterministic clip rows", forward, "bfloat16", rows_flags(NORMALIZE=True), fwd_tiles),
        Job("fwd mask all options", forward, "bfloat16", rows_flags(HAS_PRIVATE=True, **everything), fwd_tiles,
            quick=True),
        Job("bwd rows all options", rows, "bfloat16", tile_flags(**everything), rows_tiles, quick=True),
        Job("bwd columns all options", columns, "bfloat16", tile_flags(**everything), columns_tiles, quick=True),
        Job("bwd hard negatives all", private, "bfloat16",
            private_flags(NORMALIZE=True, HAS_LABELS=True, HAS_MARGIN=True, SMOOTHING=True), quick=True,
            options=PRIVATE_OPTIONS),
        Job("fwd supcon", forward, "float16", rows_flags(HAS_PRIVATE=True, **supcon), fwd_tiles),
        Job("bwd rows supcon", rows, "float16", tile_flags(**supcon), rows_tiles),
        Job("bwd columns supcon", columns, "float16", tile_flags(**supcon), columns_tiles),
        Job("bwd hard negatives supcon", private, "float16", private_flags(MODE=1, HAS_LABELS=True),
            options=PRIVATE_OPTIONS),
        Job("fwd pairwise 1", forward, "bfloat16", rows_flags(MODE=2, HAS_LABELS=True, HAS_PRIVATE=True), fwd_tiles),
        Job("fwd pairwise 2", forward, "bfloat16", rows_flags(MODE=2, STAGE=2, HAS_LABELS=True), fwd_tiles),
        Job("bwd rows pairwise", rows, "bfloat16", tile_flags(MODE=2, STAGE=2, HAS_LABELS=True), rows_tiles),
        Job("bwd columns pairwise", columns, "bfloat16", tile_flags(MODE=2, STAGE=2, HAS_LABELS=True), columns_tiles),
        Job("bwd hard negatives pairwise", private, "bfloat16", private_flags(MODE=2, HAS_LABELS=True),
            options=PRIVATE_OPTIONS),
        Job("fwd fp32 ieee", forward, "float32", rows_flags(DOT_PRECISION="ieee", FUSED_COLUMNS=True), fwd_fp32),
        Job("bwd rows fp32 ieee", rows, "float32", tile_flags(DOT_PRECISION="ieee", FUSED_COLUMNS=True), rows_fp32),
        Job("bwd columns fp32 ieee", columns, "float32", tile_flags(DOT_PRECISION="ieee", FUSED_COLUMNS=True),
            columns_fp32),
        Job("bwd hard negatives fp32", private, "float32", private_flags(NORMALIZE=True), options=PRIVATE_OPTIONS),
        Job("fwd fp32 tf32", forward, "float32", rows_flags(FUSED_COLUMNS=True), fwd_fp32),
        Job("bwd rows fp32 tf32", rows, "float32", tile_flags(FUSED_COLUMNS=True), rows_fp32),
        Job("bwd columns fp32 tf32", columns, "float32", tile_flags(FUSED_COLUMNS=True), columns_fp32),
        Job("pair dot index", pair_dot, "bfloat16", dict(HAS_INDEX=True, BLOCK_R=32, BLOCK_D=64), quick=True),
        Job("pair dot", pair_dot, "float16", dict(HAS_INDEX=False, BLOCK_R=32, BLOCK_D=64)),
        Job("pair dot", pair_dot, "float32", dict(HAS_INDEX=False, BLOCK_R=32, BLOCK_D=64)),
    ]


def siglip_jobs():
    rows = jit_function(siglip_kernels.siglip_kernel_rows)
    columns = jit_function(siglip_kernels.siglip_kernel_columns)
    rows_tiles, columns_tiles = triton_common.BACKWARD_ROWS_CONFIGS[0], triton_common.BACKWARD_COLUMNS_CONFIGS[0]
    rows_fp32, columns_fp32 = triton_common.BACKWARD_ROWS_CONFIGS[-1], triton_common.BACKWARD_COLUMNS_CONFIGS[-1]
    common = dict(CAST_DOT=False, DOT_PRECISION="tf32")
    ieee = dict(CAST_DOT=False, DOT_PRECISION="ieee")
    return [
        Job("siglip rows grad", rows, "bfloat16", dict(WITH_GRAD=True, **common), rows_tiles, quick=True),
        Job("siglip columns", columns, "bfloat16", common, columns_tiles, quick=True),
        Job("siglip loss only", rows, "float16", dict(WITH_GRAD=False, **common), rows_tiles),
        Job("siglip rows grad fp16", rows, "float16", dict(WITH_GRAD=True, **common), rows_tiles),
        Job("siglip columns fp16", columns, "float16", common, columns_tiles),
        Job("siglip rows grad fp32 ieee", rows, "float32", dict(WITH_GRAD=True, **ieee), rows_fp32),
        Job("siglip columns fp32 ieee", columns, "float32", ieee, columns_fp32),
    ]


def ring_jobs():
    """The ring exchange's tile kernels as fastcl._ring launches them (fp32 rows, fixed tiles)."""
    k = ring_kernels
    blocks = dict(CAST_DOT=False, DOT_PRECISION="ieee", BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N, BLOCK_D=k.BLOCK_D)
    jobs = []
    for name, flags, dtype in (("clip own", dict(OWN=True, EXCLUDE_SELF=False, COLUMNS=True), "float32"),
                               ("clip own bf16", dict(OWN=True, EXCLUDE_SELF=False, COLUMNS=True), "bfloat16"),
                               ("nt-xent own", dict(OWN=True, EXCLUDE_SELF=True, COLUMNS=False), "float32"),
                               ("other block", dict(OWN=False, EXCLUDE_SELF=False, COLUMNS=True), "float32")):
        quick = name.startswith("clip own")
        settings = dict(blocks, DOT_PRECISION="tf32") if dtype == "bfloat16" else blocks
        jobs.append(Job(f"ring fwd {name}", jit_function(k.ring_fwd_kernel_tile), dtype, dict(flags, **settings),
                        quick=quick))
        for kind, kernel in (("rows", k.ring_bwd_kernel_rows), ("columns", k.ring_bwd_kernel_columns)):
            jobs.append(Job(f"ring bwd {kind} {name}", jit_function(kernel), dtype,
                            dict(flags, ACC_D=k.ACC_D_MAX, **settings), quick=quick,
                            options=dict(num_warps=k.BACKWARD_WARPS)))
    return jobs


def latent_attention_jobs():
    k = latent_attention_kernels
    # one row of r = 512 latents per program (NV-Embed's r), GEGLU blocks as the host launches them
    row = dict(BLOCK=512)
    geglu = dict(SQRT_HALF=k._SQRT_HALF, BLOCK=k._GEGLU_BLOCK)
    kernels = [
        ("latent softmax fwd", k.latent_attention_fwd_kernel_softmax, row),
        ("latent softmax recompute", k.latent_attention_bwd_kernel_recompute, row),
        ("latent softmax bwd", k.latent_attention_bwd_kernel_softmax, row),
        ("latent geglu fwd", k.latent_attention_fwd_kernel_geglu, geglu),
        ("latent geglu bwd", k.latent_attention_bwd_kernel_geglu, dict(geglu, INV_SQRT_2PI=k._INV_SQRT_2PI)),
    ]
    return [Job(name, jit_function(kernel), dtype, constexprs, quick=dtype == "bfloat16")
            for dtype in ("bfloat16", "float16", "float32") for name, kernel, constexprs in kernels]


def patches_jobs():
    k = patches_kernels
    constexprs = dict(PATCH=14, BLOCK=k.BLOCK_PIXELS)
    return [Job(name, jit_function(kernel), dtype, constexprs, quick=dtype == "bfloat16")
            for dtype in ("bfloat16", "float16", "float32", "float64")
            for name, kernel in (("patches fwd", k.gather_patches_fwd_kernel), ("patches bwd", k.gather_patches_bwd_kernel))]


def all_configs_jobs():
    """Every autotuning configuration of the tiled kernels (CLIP flags; bf16 and fp32)."""
    forward = jit_function(info_nce_kernels.info_nce_fwd_kernel_rows)
    rows = jit_function(info_nce_kernels.info_nce_bwd_kernel_rows)
    columns = jit_function(info_nce_kernels.info_nce_bwd_kernel_columns)
    siglip_rows = jit_function(siglip_kernels.siglip_kernel_rows)
    siglip_columns = jit_function(siglip_kernels.siglip_kernel_columns)
    jobs = []
    for dtype, precision in (("bfloat16", "tf32"), ("float32", "ieee")):
        clip = rows_flags(FUSED_COLUMNS=True, DOT_PRECISION=precision)
        tiles_clip = tile_flags(FUSED_COLUMNS=True, DOT_PRECISION=precision)
        siglip = dict(CAST_DOT=False, DOT_PRECISION=precision)
        for tiles in triton_common.FORWARD_CONFIGS:
            jobs.append(Job("fwd clip config", forward, dtype, clip, tiles))
        for tiles in triton_common.BACKWARD_ROWS_CONFIGS:
            jobs.append(Job("bwd rows clip config", rows, dtype, tiles_clip, tiles))
            jobs.append(Job("siglip rows grad config", siglip_rows, dtype, dict(WITH_GRAD=True, **siglip), tiles))
        for tiles in triton_common.BACKWARD_COLUMNS_CONFIGS:
            jobs.append(Job("bwd columns clip config", columns, dtype, tiles_clip, tiles))
            jobs.append(Job("siglip columns config", siglip_columns, dtype, siglip, tiles))
    return jobs


def plan(quick: bool = False, all_configs: bool = False):
    jobs = info_nce_jobs() + ring_jobs() + siglip_jobs() + latent_attention_jobs() + patches_jobs()
    if quick:
        jobs = [job for job in jobs if job.quick]
    if all_configs:
        jobs += all_configs_jobs()
    return jobs


def ptxas_report(log: str) -> str:
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    text = f"  registers {registers.group(1)}" if registers else ""
    if spills:
        text += f"  spills {spills.group(1)}/{spills.group(2)} B (store/load)"
    return text


def compile_job(job: Job, arch: int, aligned: bool):
    """(compiled kernel, ptxas's log) for one job."""
    constexprs = dict(job.constexprs)
    options = dict(job.options)
    if job.tiles is not None:  # (BLOCK_M, BLOCK_N, BLOCK_D[, ACC_D], num_warps, num_stages)
        block_m, block_n, block_d, *width, warps, stages = job.tiles
        constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
        if width:
            constexprs["ACC_D"] = width[0]
        options.update(num_warps=warps, num_stages=stages)
    types = signature(job.fn, job.dtype, constexprs)
    attrs = alignment(job.fn, types) if aligned else None
    source = ASTSource(job.fn, types, constexprs, attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # triton prints ptxas's -v report there when asked
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled, log.getvalue()


def ask_for_ptxas_report() -> None:
    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nvidia is not None and hasattr(nvidia, "dump_ptxas_log"):
        nvidia.dump_ptxas_log = True
    else:
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def check_plan_complete() -> int:
    kernels, helpers = kernels_and_helpers()
    planned = {job.fn.__name__ for job in plan()}
    missing = sorted(set(kernels) - planned)
    print(f"triton {triton.__version__}: {len(kernels)} kernels, helpers compiled inside them: {', '.join(helpers)}")
    for name in missing:
        print(f"kernel {name} is not in this check's plan: add it", flush=True)
    return len(missing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 80 and 90)")
    parser.add_argument("--quick", action="store_true", help="every kernel once (bf16 and the main option sets)")
    parser.add_argument("--all-configs", action="store_true",
                        help="also every autotuning configuration of the tiled kernels")
    parser.add_argument("--only", action="append", default=[],
                        help="only jobs whose name or kernel name contains this text (repeatable)")
    parser.add_argument("--dtype", action="append", choices=sorted(TYPE_NAMES), help="only these input dtypes")
    parser.add_argument("--unaligned", action="store_true",
                        help="no alignment / divisibility-by-16 hints (a launch with odd sizes)")
    args = parser.parse_args(argv)
    ask_for_ptxas_report()
    failures = check_plan_complete()
    over_limit = []
    jobs = [job for job in plan(args.quick, args.all_configs)
            if (not args.only or any(text in job.name or text in job.fn.__name__ for text in args.only))
            and (not args.dtype or job.dtype in args.dtype)]
    started = time.time()
    for arch in args.arch or [80, 90]:
        limit = SHARED_MEMORY_LIMIT.get(arch)
        for job in jobs:
            label = f"sm_{arch} {job.name:24s} {job.dtype:9s}"
            tiles = "" if job.tiles is None else "  tiles " + ",".join(map(str, job.tiles))
            start = time.time()
            try:
                compiled, log = compile_job(job, arch, not args.unaligned)
            except Exception:
                failures += 1
                print(f"{label} FAILED{tiles}", flush=True)
                traceback.print_exc()
                continue
            shared = compiled.metadata.shared
            note = ""
            if limit is not None and shared > limit:
                over_limit.append(f"sm_{arch} {job.name} {job.dtype}{tiles}")
                note = f"  OVER the sm_{arch} limit of {limit} B"
            print(f"{label} ok  {time.time() - start:5.1f} s  shared {shared:6d} B{ptxas_report(log)}{tiles}{note}",
                  flush=True)
    for line in over_limit:
        print(f"shared memory over the GPU's limit (the autotuner skips it there): {line}")
    print(f"{len(jobs) * len(args.arch or [80, 90])} compiles in {time.time() - started:.0f} s: "
          + ("all compiled" if not failures else f"{failures} failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
