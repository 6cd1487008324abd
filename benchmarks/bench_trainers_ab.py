"""A/B of the trainers' engine: each method's benchmark row (its ``BENCH_ARGS``) run by two source
trees of fastcl, interleaved round by round in fresh processes, so a change of the engine is
measured as a same-run ratio (B / A) of the median time per step and the peak memory of the steps.

    git worktree add /tmp/fastcl-a <commit>        # the code before
    python benchmarks/bench_trainers_ab.py --a /tmp/fastcl-a --b . --rounds 3 [--methods simcse,cml]

Both trees must have their native library built (``make install`` in each, or the same
``fastcl/_kernels_*.so`` copied). Writes ``benchmarks/results/trainers/engine_ab.{csv,txt}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


# the tree's own fastcl, not an editable install's (its finder comes before PYTHONPATH)
LAUNCH = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Redirecting' not in type(f).__name__]; "
          "sys.argv[0] = 'fastcl.trainers'; runpy.run_module('fastcl.trainers', run_name='__main__')")


def run_once(tree: str, method: str, argv, out: str, timeout: float):
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    command = [sys.executable, "-c", LAUNCH, method, *argv, "--out", out]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=tree)
    path = os.path.join(out, "metrics.json")
    if done.returncode != 0 or not os.path.isfile(path):
        return None, (done.stderr or done.stdout).strip().splitlines()[-1:]
    with open(path) as f:
        train = json.load(f)["train"]
    return (train["time_per_step_s"], train["peak_memory_mb"]), None


def main():
    from fastcl.bench.harness import device_name, write_rows
    from fastcl.trainers import METHODS, load_method

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="source tree A (before)")
    parser.add_argument("--b", default=ROOT, help="source tree B (after; default this checkout)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--losses", default="naive,fused")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "trainers"))
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="fastcl-trainers-ab-")
    rows = []
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load = os.getloadavg()[0]
    for method in args.methods.split(","):
        bench_args = list(load_method(method).BENCH_ARGS) + ["--data", "synthetic", "--skip-before", "--skip-save", "--skip-eval"]
        for loss in args.losses.split(","):
            argv = bench_args + ["--loss", loss]
            samples = {"A": [], "B": []}
            for round_ in range(args.rounds):
                for label, tree in (("A", args.a), ("B", args.b)) if round_ % 2 == 0 else (("B", args.b), ("A", args.a)):
                    result, error = run_once(tree, method, argv, os.path.join(work, f"{method}-{loss}-{label}-{round_}"),
                                             args.timeout)
                    if result is None:
                        print(f"{method} {loss} {label}: failed: {error}", flush=True)
                        continue
                    samples[label].append(result)
            if not samples["A"] or not samples["B"]:
                continue
            a_time = statistics.median(t for t, _ in samples["A"])
            b_time = statistics.median(t for t, _ in samples["B"])
            a_peak = statistics.median(p for _, p in samples["A"] if p is not None) if samples["A"] else None
            b_peak = statistics.median(p for _, p in samples["B"] if p is not None) if samples["B"] else None
            row = {"method": method, "loss": loss, "rounds": args.rounds, "a_s_per_step": round(a_time, 5),
                   "b_s_per_step": round(b_time, 5), "time_b_over_a": round(b_time / a_time, 3),
                   "a_peak_mb": a_peak, "b_peak_mb": b_peak,
                   "peak_b_over_a": round(b_peak / a_peak, 3) if a_peak and b_peak else None,
                   "a_times": [round(t, 4) for t, _ in samples["A"]], "b_times": [round(t, 4) for t, _ in samples["B"]]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (f"# trainers engine A/B, {started}, {device_name('cpu')}, load {load:.2f} at start; "
              f"A = {os.path.abspath(args.a)}, B = {os.path.abspath(args.b)}; each method's BENCH_ARGS "
              f"--data synthetic --skip-before --skip-save --skip-eval, {args.rounds} interleaved rounds, medians")
    lines = [header, f"{'method':<9} {'loss':<6} {'A s/step':>9} {'B s/step':>9} {'B/A':>6} {'A peak MB':>10} "
                     f"{'B peak MB':>10} {'B/A':>6}"]
    for r in rows:
        lines.append(f"{r['method']:<9} {r['loss']:<6} {r['a_s_per_step']:>9.4f} {r['b_s_per_step']:>9.4f} "
                     f"{r['time_b_over_a']:>6.3f} {r['a_peak_mb'] or float('nan'):>10.1f} {r['b_peak_mb'] or float('nan'):>10.1f} "
                     f"{r['peak_b_over_a'] or float('nan'):>6.3f}")
    print("\n".join(lines))
    if rows:
        write_rows(args.out, "engine_ab", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
