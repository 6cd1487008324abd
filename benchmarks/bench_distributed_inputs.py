"""Ring and gather modes of fastcl.distributed.clip_loss on the inputs users pass, 2 gloo
processes (one per core, no oversubscription): unit and raw (randn) features, small and large
temperatures, a small and a mid-size local batch, with each mode's first call in a fresh process.

    python benchmarks/bench_distributed_inputs.py [--out benchmarks/results/cpu_distributed]

Each case is measured ``--rounds`` times, gather / ring / plain alternating; the summary gives
the median step time, the ratio to gather mode, the first call and the tensor memory per rank.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastcl.bench.harness import device_name  # noqa: E402
from fastcl.bench.suites.distributed import PROVIDERS, measure  # noqa: E402

INPUTS = [("unit features, tau 0.05", True, 20.0), ("raw features, tau 0.01", False, 100.0),
          ("raw features, tau 1", False, 1.0)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args(argv)
    lines = [f"clip_loss across 2 gloo processes, D = {args.dim}, fp32 fwd+bwd, {device_name('cpu')}; "
             f"median of {args.rounds} alternating rounds (7 timed steps each); per rank max over ranks"]
    print(lines[0], flush=True)
    for batch in (64, 1024):
        for name, normalized, scale in INPUTS:
            runs = {provider: [] for provider in PROVIDERS}
            for _ in range(args.rounds):
                for provider in PROVIDERS:
                    runs[provider].append(measure(provider, 2, batch, args.dim, repeats=7, normalized=normalized,
                                                  scale=scale))
            median = {p: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for p, rs in runs.items()}
            gather = median["gather"]["time_ms"]
            text = f"B = {batch}, {name}: " + "; ".join(
                f"{p} {m['time_ms']:.1f} ms ({m['time_ms'] / gather:.2f}x gather), first {m['first_ms']:.0f} ms, "
                f"tensors {m['tensor_mb']:.2f} MB" for p, m in median.items())
            print(text, flush=True)
            lines.append(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "inputs_summary.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
