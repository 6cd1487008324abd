"""The dispatched CPU kernels against a ``-march=native`` build of the same sources, in one run.

Each CPU variant of the installed package (default, avx2, avx512, as far as this CPU runs them)
and, with ``--native-lib``, a library built with ``FASTCL_NATIVE_ARCH=ON`` are swapped into the
same process in turn, so every op is timed on every variant back to back, rounds interleaved
(machine noise hits all variants alike). Reports the median forward+backward time of each, its
ratio to the native build, and the first call in this process.

    cmake -S . -B build/native -G Ninja -DFASTCL_NATIVE_ARCH=ON -DFASTCL_CUDA=OFF
    cmake --build build/native
    python benchmarks/bench_cpu_dispatch.py --native-lib build/native/_kernels_native.so \\
        --out benchmarks/results/cpu_dispatch
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fastcl
from fastcl import _native
from fastcl.bench.harness import device_name, write_rows


def _cases(quick: bool):
    torch.manual_seed(0)
    batch = 2048 if quick else 8192
    dim = 128 if quick else 256
    q = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
    k = torch.nn.functional.normalize(q + 0.3 * torch.randn(batch, dim), dim=-1)
    raw_q, raw_k = 6.0 * torch.randn(batch, dim), 6.0 * torch.randn(batch, dim)
    siglip_batch = batch // 2
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    pooling = fastcl.LatentAttentionPooling(384, num_latents=256, num_heads=8, backend="cpu")
    hidden = torch.randn(16 if quick else 64, 128, 384)
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool)

    def info_nce(a, b, **options):
        def run():
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            fastcl.info_nce(x, y, backend="cpu", **options).backward()
        return run

    def siglip():
        x, y = q[:siglip_batch].clone().requires_grad_(), k[:siglip_batch].clone().requires_grad_()
        fastcl.siglip_loss(x, y, scale, bias, backend="cpu").backward()

    def latent():
        h = hidden.clone().requires_grad_()
        pooling(h, mask).sum().backward()

    return [
        (f"info_nce normalized B={batch} D={dim}", info_nce(q, k)),
        (f"info_nce unnormalized (raw dot, tau=0.05) B={batch} D={dim}",
         info_nce(raw_q, raw_k, normalize=False, temperature=0.05)),
        (f"clip_loss (symmetric) normalized B={batch} D={dim}", info_nce(q, k, symmetric=True)),
        (f"siglip_loss B={siglip_batch} D={dim}", siglip),
        (f"latent_attention_pool B={hidden.shape[0]} L=128 H=384 latents=256", latent),
    ]


def _swap(module, library) -> None:
    for name, function in library.functions.items():
        setattr(module, name, function)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native-lib", help="a _kernels_native.so built with FASTCL_NATIVE_ARCH=ON")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes (a check that the script runs)")
    parser.add_argument("--out", help="folder for dispatch.csv and dispatch_summary.txt")
    args = parser.parse_args()
    module = _native.native_module()
    if module is None:
        raise SystemExit(f"no native kernels: {fastcl.backends()['cpu'].reason}")
    variants = {}
    for capability in module.cpu_supported:
        variants[capability] = _native.NativeLibrary(_native._library_path(capability))
    if args.native_lib:
        variants["native"] = _native.NativeLibrary(os.path.abspath(args.native_lib))
    reference = "native" if "native" in variants else module.cpu_capability
    cases = _cases(args.quick)
    first_call = {}
    times = {(name, variant): [] for name, _ in cases for variant in variants}
    for name, run in cases:  # first call in this process, on the variant the loader chose
        start = time.perf_counter()
        run()
        first_call[name] = time.perf_counter() - start
    for round_index in range(args.rounds + 1):  # round 0 warms each variant up
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name, run in cases:
            for variant in order:
                _swap(module, variants[variant])
                start = time.perf_counter()
                run()
                elapsed = time.perf_counter() - start
                if round_index:
                    times[(name, variant)].append(elapsed)
    _swap(module, variants[module.cpu_capability])
    machine = f"{device_name('cpu')}, torch {torch.__version__}"
    lines = [f"CPU dispatch vs -march=native, {machine}; median of {args.rounds} interleaved rounds, "
             f"fwd+bwd, ms; ratio = variant / {reference} (< 1 is faster)"]
    rows = []
    width = max(len(name) for name, _ in cases)
    lines.append(f"{'case':<{width}}  " + "  ".join(f"{v:>16}" for v in variants) + "  first call (chosen)")
    for name, _ in cases:
        base = statistics.median(times[(name, reference)])
        cells = []
        for variant in variants:
            median = statistics.median(times[(name, variant)])
            spread = (max(times[(name, variant)]) - min(times[(name, variant)])) / median
            cells.append(f"{median * 1e3:8.1f} ({median / base:4.2f}x)")
            rows.append({"case": name, "variant": variant, "median_ms": median * 1e3, "ratio_to_" + reference:
                         median / base, "spread": spread, "rounds": args.rounds, "machine": machine})
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>16}" for c in cells) +
                     f"  {first_call[name] * 1e3:.1f} ms ({module.cpu_capability})")
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_rows(args.out, "dispatch", rows, text)

if __name__ == "__main__":
    main()
