"""Compile fastcl's Triton kernels for NVIDIA GPUs on a machine without one (ahead of time).

    python benchmarks/triton_compile_check.py [--arch 80 --arch 90] [--quick]

The interpreter tests check the kernels' maths but not that they compile: this runs Triton's
real pipeline (Triton IR -> GPU IR -> PTX -> cubin with the bundled ptxas) for a sample of
option sets and dtypes that together reach every branch of the kernels, and prints shared
memory and register use. Takes a few minutes on two cores. Exit status 1 if anything fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastcl.ops.info_nce import triton as info_nce_kernels  # noqa: E402
from fastcl.ops.siglip import triton as siglip_kernels  # noqa: E402

FLOAT_SCALARS = {"inv_temperature", "margin", "label_smoothing", "grad_scale", "logit_scale", "logit_bias",
                 "grad_factor"}
INDEX_POINTERS = {"positive_ptr", "anchor_label_ptr", "candidate_label_ptr", "num_positive_ptr", "index_ptr"}
EMBEDDING_POINTERS = {"anchor_ptr", "candidate_ptr", "private_ptr", "image_ptr", "text_ptr", "a_ptr", "b_ptr"}
TYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def signature(fn, dtype: str, constexprs: dict) -> dict:
    out = {}
    for name in fn.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in EMBEDDING_POINTERS:
            out[name] = "*" + TYPE_NAMES[dtype]
        elif name in INDEX_POINTERS:
            out[name] = "*i64"
        elif name.endswith("_ptr"):
            out[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            out[name] = "fp32"
        else:
            out[name] = "i32"
    return out


def rows_flags(**overrides):
    flags = dict(MODE=0, STAGE=1, HAS_PRIVATE=False, NORMALIZE=False, EXCLUDE_SELF=False, HAS_LABELS=False,
                 HAS_MARGIN=False, SMOOTHING=False, FUSED_COLUMNS=False, CAST_DOT=False, DOT_PRECISION="tf32")
    flags.update(overrides)
    return flags


def backward_flags(**overrides):
    flags = rows_flags(**overrides)
    flags.pop("HAS_PRIVATE")
    return flags


def plan(quick: bool):
    forward = info_nce_kernels.info_nce_fwd_kernel_rows.fn
    backward = info_nce_kernels.info_nce_bwd_kernel_rows.fn
    columns = info_nce_kernels.info_nce_bwd_kernel_columns.fn
    private = info_nce_kernels.info_nce_bwd_kernel_private
    siglip = siglip_kernels.siglip_kernel_rows.fn
    siglip_columns = siglip_kernels.siglip_kernel_columns.fn
    pair_dot = info_nce_kernels.info_nce_fwd_kernel_pair_dot
    everything = dict(NORMALIZE=True, HAS_LABELS=True, HAS_MARGIN=True, SMOOTHING=True, FUSED_COLUMNS=True)
    fwd_tiles = info_nce_kernels.FORWARD_CONFIGS[0]
    rows_tiles, columns_tiles = info_nce_kernels.BACKWARD_ROWS_CONFIGS[0], info_nce_kernels.BACKWARD_COLUMNS_CONFIGS[0]
    private_flags = dict(MODE=0, NORMALIZE=True, HAS_LABELS=True, HAS_MARGIN=True, SMOOTHING=True, BLOCK_M=32, BLOCK_D=64)
    items = [
        ("fwd clip", forward, "bfloat16", rows_flags(FUSED_COLUMNS=True), fwd_tiles),
        ("bwd rows clip", backward, "bfloat16", backward_flags(FUSED_COLUMNS=True), rows_tiles),
        ("bwd columns clip", columns, "bfloat16", backward_flags(FUSED_COLUMNS=True), columns_tiles),
        ("fwd mask all options", forward, "bfloat16", rows_flags(HAS_PRIVATE=True, **everything), fwd_tiles),
        ("bwd rows all options", backward, "bfloat16", backward_flags(**everything), rows_tiles),
        ("bwd columns all options", columns, "bfloat16", backward_flags(**everything), columns_tiles),
        ("bwd hard negatives", private, "bfloat16", private_flags, None),
        ("fwd supcon", forward, "float16", rows_flags(MODE=1, HAS_LABELS=True, EXCLUDE_SELF=True, HAS_PRIVATE=True), fwd_tiles),
        ("bwd rows supcon", backward, "float16", backward_flags(MODE=1, HAS_LABELS=True, EXCLUDE_SELF=True), rows_tiles),
        ("fwd pairwise 1", forward, "bfloat16", rows_flags(MODE=2, HAS_LABELS=True, HAS_PRIVATE=True), fwd_tiles),
        ("fwd pairwise 2", forward, "bfloat16", rows_flags(MODE=2, STAGE=2, HAS_LABELS=True), fwd_tiles),
        ("bwd columns pairwise", columns, "bfloat16", backward_flags(MODE=2, STAGE=2, HAS_LABELS=True), columns_tiles),
        ("fwd fp32 ieee", forward, "float32", rows_flags(DOT_PRECISION="ieee", FUSED_COLUMNS=True), (64, 64, 32, 4, 2)),
        ("bwd rows fp32 ieee", backward, "float32", backward_flags(DOT_PRECISION="ieee", FUSED_COLUMNS=True), (32, 64, 32, 128, 4, 2)),
        ("siglip grad", siglip, "bfloat16", dict(WITH_GRAD=True, CAST_DOT=False, DOT_PRECISION="tf32"), rows_tiles),
        ("siglip columns", siglip_columns, "bfloat16", dict(CAST_DOT=False, DOT_PRECISION="tf32"), columns_tiles),
        ("pair dot", pair_dot, "bfloat16", dict(HAS_INDEX=True, BLOCK_R=32, BLOCK_D=64), None),
    ]
    if quick:
        items = items[:4]
    return items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 80 and 90)")
    parser.add_argument("--quick", action="store_true", help="only the CLIP and all-options mask kernels")
    args = parser.parse_args(argv)
    failures = 0
    for arch in args.arch or [80, 90]:
        for name, fn, dtype, flags, tiles in plan(args.quick):
            constexprs = dict(flags)
            options = {}
            if tiles is not None:  # (BLOCK_M, BLOCK_N, BLOCK_D[, ACC_D], num_warps, num_stages)
                block_m, block_n, block_d, *width, warps, stages = tiles
                constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
                if width:
                    constexprs["ACC_D"] = width[0]
                options = dict(num_warps=warps, num_stages=stages)
            start = time.time()
            try:
                source = ASTSource(fn, signature(fn, dtype, constexprs), constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
                registers = getattr(compiled, "n_regs", None)
                print(f"sm_{arch} {name:22s} {dtype:9s} ok  {time.time() - start:5.1f} s  shared {compiled.metadata.shared} B"
                      + (f"  registers {registers}" if registers is not None else ""), flush=True)
            except Exception:
                failures += 1
                print(f"sm_{arch} {name:22s} {dtype:9s} FAILED", flush=True)
                traceback.print_exc()
    print("all compiled" if not failures else f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
