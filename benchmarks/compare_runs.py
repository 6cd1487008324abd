"""Row-by-row comparison of two ``python -m fastcl.bench`` result folders.

Each row of the new run is matched with the same (suite, provider, params) row of the old
folders (the last measurement of each wins) and its time and memory ratios against the suite's
baseline are printed side by side; a ratio that moved by more than ``--time-change`` (time) or
``--memory-change`` (memory) is marked. Baseline rows themselves are skipped.

    python benchmarks/compare_runs.py NEW_DIR OLD_DIR [OLD_DIR ...] > comparison.txt
"""
from __future__ import annotations

import argparse
import csv
import glob
import math

BASELINES = ("naive", "peer", "plain")


def load(folder: str) -> dict:
    rows = {}
    for path in sorted(glob.glob(f"{folder}/*.csv")):
        with open(path) as handle:
            reader = csv.DictReader(handle)
            if "suite" not in (reader.fieldnames or []):
                continue  # not a fastcl.bench table
            for row in reader:
                if row.get("status") == "ok":
                    rows[(row["suite"], row["provider"], row["params"])] = row
    return rows


def _number(text: str) -> float:
    return float(text) if text else float("nan")


def _moved(old: float, new: float, factor: float) -> bool:
    return old > 0 and new > 0 and abs(math.log(new / old)) > math.log(factor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new")
    parser.add_argument("old", nargs="+")
    parser.add_argument("--time-change", type=float, default=1.25)
    parser.add_argument("--memory-change", type=float, default=1.5)
    args = parser.parse_args()
    old = {}
    for folder in args.old:
        old.update(load(folder))
    new = load(args.new)
    matched = [(key, old[key], row) for key, row in sorted(new.items())
               if key in old and key[1] not in BASELINES and row["time_ratio_vs_baseline"]
               and old[key]["time_ratio_vs_baseline"]]
    print(f"{len(matched)} of {len(new)} rows of {args.new} matched in {', '.join(args.old)}; "
          f"ratios against each suite's baseline, old -> new; marked: time x{args.time_change} "
          f"or memory x{args.memory_change} apart")
    for (suite, provider, params), before, after in matched:
        time_old, time_new = _number(before["time_ratio_vs_baseline"]), _number(after["time_ratio_vs_baseline"])
        memory_old, memory_new = _number(before["memory_ratio_vs_baseline"]), _number(after["memory_ratio_vs_baseline"])
        marks = (" <- time" if _moved(time_old, time_new, args.time_change) else "") + \
                (" <- memory" if _moved(memory_old, memory_new, args.memory_change) else "")
        print(f"{suite:16s} {provider:12s} {params[:60]:60s} time {time_old:5.2f} -> {time_new:5.2f}  "
              f"memory {memory_old:.3f} -> {memory_new:.3f}{marks}")


if __name__ == "__main__":
    main()
