"""``auto`` against the fastest of {naive, torch, cpu} at every batch size, in one process.

For B in {64, ..., 8192}, normalized and unnormalized inputs, tau in {0.01, 0.05, 1} and D in
{128, 768} (the goal grid), every provider runs fwd+bwd on the same inputs, rounds
interleaved (so machine noise hits all alike), and the median of each is compared:
``auto / naive`` and ``auto / fastest``. ``naive`` is the plain PyTorch loss users write
(``F.cross_entropy`` on the materialized logits). Also reports the crossover: the smallest B
where the native ``cpu`` kernels beat the plain loss, which ``auto``'s switch point should track.

    python benchmarks/bench_auto_crossover.py --out benchmarks/results/cpu_auto_crossover
    python benchmarks/bench_auto_crossover.py --quick            # a small grid, to check it runs
    python benchmarks/bench_auto_crossover.py --overhead --out benchmarks/results/cpu_auto_crossover

``--overhead`` times only B = 64, D = 128: fwd+bwd of ``auto`` against the plain loss, many short
rounds interleaved, and reports the difference per call in microseconds.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

import fastcl
from fastcl._native import cpu_capability
from fastcl.bench.harness import device_name, write_rows
from fastcl.ops.info_nce import resolve_backend

SIZES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def plain_loss(q, k, temperature, normalize):
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = (q @ k.T) / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def step(provider, q, k, temperature, normalize):
    a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
    if provider == "naive":
        loss = plain_loss(a, b, temperature, normalize)
    else:
        loss = fastcl.info_nce(a, b, temperature=temperature, normalize=normalize, backend=provider)
    loss.backward()


def interleaved_medians(providers, q, k, temperature, normalize, rounds: int, calls: int, warmup: int = 1) -> dict:
    """Median seconds per fwd+bwd call of each provider on the same inputs: ``warmup`` calls each
    (the first call of each path), then ``rounds`` rounds of ``calls`` calls, the providers'
    order reversed every other round so machine noise hits all alike."""
    times = {p: [] for p in providers}
    for provider in providers:
        for _ in range(warmup):
            step(provider, q, k, temperature, normalize)
    for round_index in range(rounds):
        for provider in (providers if round_index % 2 == 0 else providers[::-1]):
            start = time.perf_counter()
            for _ in range(calls):
                step(provider, q, k, temperature, normalize)
            times[provider].append((time.perf_counter() - start) / calls)
    return {p: statistics.median(v) for p, v in times.items()}


def overhead(args) -> None:
    """Per-call cost of ``auto`` over the plain loss at B = 64, D = 128 (fwd+bwd, tau = 0.05)."""
    batch, dim, temperature = 64, 128, 0.05
    lines = [f"auto's per-call overhead over the plain loss, B={batch} D={dim} tau={temperature}, fwd+bwd fp32, "
             f"{device_name('cpu')}, torch {torch.__version__}; median of {args.rounds} interleaved rounds of 300 calls"]
    rows = []
    for normalize in (False, True):
        generator = torch.Generator().manual_seed(0)
        q, k = torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)
        medians = interleaved_medians(["naive", "auto"], q, k, temperature, normalize, args.rounds, 300, warmup=100)
        plain_us, auto_us = medians["naive"] * 1e6, medians["auto"] * 1e6
        rows.append({"batch": batch, "dim": dim, "normalized": normalize, "temperature": temperature,
                     "plain_us": plain_us, "auto_us": auto_us, "overhead_us": auto_us - plain_us})
        lines.append(f"{'normalized' if normalize else 'raw dot products'}: plain {plain_us:.1f} us, auto {auto_us:.1f} us, "
                     f"overhead {auto_us - plain_us:+.1f} us per call ({auto_us / plain_us:.3f}x)")
        print(lines[-1], flush=True)
    if args.out:
        write_rows(args.out, "auto_overhead", rows, "\n".join(lines))


def repeats_for(batch: int, dim: int) -> int:
    work = batch * batch * dim
    return max(1, min(201, int(4e9 / max(work, 1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over all timed calls)")
    parser.add_argument("--sizes", type=int, nargs="*", help="batch sizes (default: 64 ... 8192)")
    parser.add_argument("--temperatures", type=float, nargs="*", help="default: 0.01 0.05 1")
    parser.add_argument("--dims", type=int, nargs="*", help="default: 128 768")
    parser.add_argument("--overhead", action="store_true", help="only the per-call overhead at B = 64, D = 128")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.overhead:
        return overhead(args)
    sizes = args.sizes or ((64, 256, 1024) if args.quick else SIZES)
    temperatures = args.temperatures or ((0.05,) if args.quick else (0.01, 0.05, 1.0))
    dims = args.dims or ((128,) if args.quick else (128, 768))
    providers = ["naive", "torch", "cpu", "auto"] if fastcl.backends()["cpu"].available else ["naive", "torch", "auto"]
    rows, lines = [], []
    header = (f"auto vs the fastest, fwd+bwd fp32, {device_name('cpu')}, torch {torch.__version__}, "
              f"CPU kernels: {cpu_capability()}; median of {args.rounds} "
              "interleaved rounds of n calls (n by size)")
    print(header)
    lines.append(header)
    for dim, normalize, temperature, batch in itertools.product(dims, (True, False), temperatures, sizes):
        generator = torch.Generator().manual_seed(batch + dim)
        q = torch.randn(batch, dim, generator=generator)
        k = (q + 0.5 * torch.randn(batch, dim, generator=generator)) if normalize else torch.randn(batch, dim, generator=generator)
        calls = repeats_for(batch, dim)
        medians = interleaved_medians(providers, q, k, temperature, normalize, args.rounds, calls)
        fastest = min((p for p in providers if p != "auto"), key=medians.get)
        ran = resolve_backend("auto", q.device, logits=batch * batch, normalized=normalize)
        row = {"batch": batch, "dim": dim, "normalized": normalize, "temperature": temperature, "calls": calls,
               "auto_ran": ran,
               **{f"{p}_ms": medians[p] * 1e3 for p in providers}, "fastest": fastest,
               "auto_over_naive": medians["auto"] / medians["naive"],
               "auto_over_fastest": medians["auto"] / medians[fastest]}
        rows.append(row)
        text = (f"B={batch:<5} D={dim:<4} {'norm' if normalize else 'raw '} tau={temperature:<5} " +
                " ".join(f"{p}={medians[p] * 1e3:8.3f}ms" for p in providers) +
                f"  auto ran {ran:<5} fastest={fastest:<5} auto/naive={row['auto_over_naive']:.2f} auto/fastest={row['auto_over_fastest']:.2f}")
        print(text, flush=True)
        lines.append(text)
    misses = [r for r in rows if r["auto_over_fastest"] > 1.05 or r["auto_over_naive"] > 1.0]
    summary = (f"goal auto <= 1.05x fastest and <= 1.0x naive: {len(rows) - len(misses)} of {len(rows)} cases met; "
               f"worst auto/fastest {max(r['auto_over_fastest'] for r in rows):.2f}, "
               f"worst auto/naive {max(r['auto_over_naive'] for r in rows):.2f}")
    print(summary)
    lines.append(summary)
    if "cpu" in providers:
        for dim, normalize in itertools.product(dims, (True, False)):
            wins = [r["batch"] for r in rows if r["dim"] == dim and r["normalized"] == normalize
                    and r["cpu_ms"] < r["naive_ms"]]
            text = f"crossover D={dim} {'normalized' if normalize else 'raw'}: cpu beats naive from B = {min(wins) if wins else 'never'}"
            print(text)
            lines.append(text)
    if args.out:
        write_rows(args.out, "auto_crossover", rows, "\n".join(lines))

if __name__ == "__main__":
    main()
