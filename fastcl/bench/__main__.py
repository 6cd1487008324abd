"""``python -m fastcl.bench [SUITE ...] [--full] [--device cpu|cuda] [--suite NAME ...] [--out DIR]``

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
    parser.add_argument("suites", nargs="*", metavar="SUITE", help="only these suites (same as --suite); opt-in suites such as trainers run only when named")
    parser.add_argument("--full", action="store_true", help="also the large sizes (takes much longer)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--suite", action="append", help="only these suites (repeatable)")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    args = parser.parse_args(argv)
    suites = discover()
    named = list(args.suites or []) + list(args.suite or [])
    if named:
        unknown = set(named) - {s.SUITE for s in suites}
        if unknown:
            parser.error(f"unknown suite(s) {sorted(unknown)}; known: {[s.SUITE for s in suites]}")
        suites = [s for s in suites if s.SUITE in named]
    else:
        suites = [s for s in suites if getattr(s, "DEFAULT", True)]
    # a suite with its own run() (e.g. trainers: whole training runs, not op cases) runs itself
    runners = [s for s in suites if hasattr(s, "run")]
    case_suites = [s for s in suites if not hasattr(s, "run")]
    if case_suites or not runners:
        run_suites(case_suites, args.device, args.full, args.out, args.timeout)
    for suite in runners:
        suite.run(args.device, args.full, args.out, max(args.timeout, 3600.0))


if __name__ == "__main__":
    main()
