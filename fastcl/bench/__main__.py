"""``python -m fastcl.bench [--full] [--device cpu|cuda] [--suite NAME ...] [--out DIR]``

Benchmarks every op that exists on the current device: median fwd+bwd time, peak extra
memory, and the ratio against each suite's naive PyTorch baseline in the same run. Writes
``<out>/<suite>.csv`` (appended, with the device name) and ``<out>/<suite>.png``.
"""
import argparse
import importlib
import pkgutil

import torch

from . import suites as suites_package
from .harness import run_suites


def discover():
    found = []
    for info in sorted(pkgutil.iter_modules(suites_package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{suites_package.__name__}.{info.name}")
        if hasattr(module, "SUITE") and hasattr(module, "cases"):
            found.append(module)
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastcl.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also the large sizes (takes much longer)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--suite", action="append", help="only these suites (repeatable)")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    args = parser.parse_args(argv)
    suites = discover()
    if args.suite:
        unknown = set(args.suite) - {s.SUITE for s in suites}
        if unknown:
            parser.error(f"unknown suite(s) {sorted(unknown)}; known: {[s.SUITE for s in suites]}")
        suites = [s for s in suites if s.SUITE in args.suite]
    run_suites(suites, args.device, args.full, args.out, args.timeout)


if __name__ == "__main__":
    main()
