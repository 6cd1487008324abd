"""``auto`` against the plain loss with the machine oversubscribed 2x, per OpenMP wait policy.

A second process runs float32 matmuls on every core (as another training job or a data loader
would) while this one times fwd+bwd InfoNCE of the plain loss (``naive``), ``auto`` and the
native ``cpu`` kernels, rounds interleaved, median. Each wait policy runs in a fresh process,
since OpenMP reads ``OMP_WAIT_POLICY`` once at start: unset (the runtime's default spin-then-
sleep), ``PASSIVE`` and ``ACTIVE``. The quiet machine is measured too, for the same cases.

    python benchmarks/bench_oversubscribed.py --out benchmarks/results/cpu_oversubscribed
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

CASES = ((64, 128, True), (256, 256, False), (1024, 256, False), (1024, 256, True), (4096, 256, False))
POLICIES = ("default", "PASSIVE", "ACTIVE")


def load_loop(seconds: float) -> None:
    """The competing job: matmuls on torch's threads (one per core) until the time is up."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    end = time.time() + seconds
    while time.time() < end:
        a @ b


def measure(rounds: int) -> list:
    import fastcl
    from bench_auto_crossover import interleaved_medians, repeats_for

    providers = ["naive", "auto", "cpu"] if fastcl.backends()["cpu"].available else ["naive", "auto"]
    rows = []
    for batch, dim, normalize in CASES:
        generator = torch.Generator().manual_seed(batch)
        q, k = torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)
        calls = max(1, repeats_for(batch, dim) // 8)
        medians = {p: seconds * 1e3 for p, seconds in
                   interleaved_medians(providers, q, k, 0.05, normalize, rounds, calls).items()}
        rows.append({"batch": batch, "dim": dim, "normalized": normalize,
                     **{f"{p}_ms": medians[p] for p in providers},
                     **{f"{p}_over_naive": medians[p] / medians["naive"] for p in providers if p != "naive"}})
    return rows


def run_child(policy: str, loaded: bool, rounds: int) -> list:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    load = None
    if loaded:
        load = subprocess.Popen([sys.executable, __file__, "--load", "3600"], env=dict(os.environ))
        time.sleep(2)  # its threads are running
    try:
        output = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(rounds)], env=env,
                                check=True, capture_output=True, text=True).stdout
    finally:
        if load is not None:
            load.kill()
            load.wait()
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--out")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load is not None:
        return load_loop(args.load)
    if args.child:
        print(json.dumps(measure(args.rounds)))
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from fastcl.bench.harness import device_name, write_rows

    header = (f"auto vs the plain loss, fwd+bwd fp32 tau=0.05, {device_name('cpu')}, torch {torch.__version__}; "
              f"median of {args.rounds} interleaved rounds; 'loaded': a second process runs matmuls on every core")
    lines, rows = [header], []
    print(header, flush=True)
    for loaded in (False, True):
        for policy in POLICIES:
            for row in run_child(policy, loaded, args.rounds):
                row = {"load": "2x oversubscribed" if loaded else "quiet", "omp_wait_policy": policy, **row}
                rows.append(row)
                text = (f"{row['load']:<18} OMP_WAIT_POLICY={policy:<8} B={row['batch']:<5} D={row['dim']:<4} "
                        f"{'norm' if row['normalized'] else 'raw '} naive={row['naive_ms']:8.3f}ms "
                        f"auto={row['auto_ms']:8.3f}ms ({row['auto_over_naive']:.2f}x)" +
                        (f" cpu={row['cpu_ms']:8.3f}ms ({row['cpu_over_naive']:.2f}x)" if "cpu_ms" in row else ""))
                print(text, flush=True)
                lines.append(text)
    if args.out:
        write_rows(args.out, "oversubscribed", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
