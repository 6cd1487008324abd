"""The issue's shapes once: gather at 3780 x 3780 RGB, P = 14, K = 2560 (forward) and the
selective encoder vs every high-res patch at 1512 px (forward + backward, budget 2560).

    python benchmarks/bench_patches.py [--device cpu|cuda] [--out bench_results]

Same cases as ``python -m fastcl.bench --full --suite patches`` (each in a fresh process:
median time, peak extra RSS / CUDA memory); prints the table and appends to
``<out>/patches.csv``. The full-resolution encoder baseline takes minutes on a small CPU.
"""
import argparse

import torch

from fastcl.bench.harness import run_suites
from fastcl.bench.suites import patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    args = parser.parse_args()
    run_suites([patches], args.device, full=True, out_dir=args.out, timeout=args.timeout)


if __name__ == "__main__":
    main()
