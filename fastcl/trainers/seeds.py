"""``--seeds 0,1,2``: one run per seed, then every metric's mean and spread.

Each seed is a run of its own, in a fresh process, in ``OUT/seed-N`` (exactly what
``--seed N --out OUT/seed-N`` gives); ``OUT/metrics.json`` then holds, for every number of the
runs' ``metrics.json`` (the trained model's metrics, each baseline's section, the timings), its
``mean``, ``std`` (sample standard deviation), ``min`` and ``max`` over the seeds, in the runs'
own nesting, and the runs themselves under ``per_seed``. A claim is a difference beyond the
spread: ``mean.recall@1 - std.recall@1`` against a baseline's ``mean + std``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any, Dict, List, Sequence

from .runs import default_out, write_json

# per-run settings rather than results: the same in every run but the seed, never averaged
SETTINGS = ("seed",)


def parse_seeds(text: str) -> List[int]:
    """``"0,1,2"`` -> [0, 1, 2]; a clear error for anything else (at least two distinct seeds)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs at least two distinct seeds (e.g. 0,1,2), got {text!r}")
    return seeds


def _without(argv: Sequence[str], names: Sequence[str]) -> List[str]:
    """``argv`` less the options ``names`` (``--name value`` or ``--name=value``)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in names:
            skip = "=" not in token
            continue
        kept.append(token)
    return kept


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate(runs: Sequence[Dict[str, Any]], seeds: Sequence[int]) -> Dict[str, Any]:
    """``{"seeds", "mean", "std", "min", "max", "per_seed"}`` of the runs' metrics (see the
    module docstring); a value that is not a number everywhere is kept where all runs agree."""
    def reduce(values: List[Any], statistic: str):
        if all(isinstance(value, dict) for value in values):
            keys = [key for key in values[0] if key not in SETTINGS and all(key in value for value in values)]
            reduced = {key: reduce([value[key] for value in values], statistic) for key in keys}
            return {key: value for key, value in reduced.items() if value is not None}
        if all(_number(value) for value in values):
            if statistic == "mean":
                return sum(values) / len(values)
            if statistic == "std":
                mean = sum(values) / len(values)
                return math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
            return (min if statistic == "min" else max)(values)
        return values[0] if all(value == values[0] for value in values) else None

    summary: Dict[str, Any] = {"seeds": list(seeds)}
    for statistic in ("mean", "std", "min", "max"):
        summary[statistic] = reduce(list(runs), statistic)
    summary["per_seed"] = {str(seed): run for seed, run in zip(seeds, runs)}
    return summary


def run_seeds(method: str, argv: Sequence[str], config) -> int:
    """Runs ``method`` once per seed of ``config.seeds`` (fresh processes), writes the summary;
    returns the first failing run's exit status, else 0."""
    seeds = parse_seeds(config.seeds)
    if config.resume:
        raise ValueError("--seeds starts fresh runs: continue one seed's run with --resume OUT/seed-N instead")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--seeds runs its seeds one after another in this process's place: under torchrun, "
                         "launch one --seed per run")
    out = config.out or default_out(method)
    summary_path = os.path.join(out, "metrics.json")
    if os.path.exists(summary_path) and not config.overwrite:
        raise ValueError(f"--out {out!r} already holds a summary of seeds ({summary_path}): replace it with "
                         "--overwrite, or choose another --out")
    # the children get an empty --seeds: a config file that sets seeds must not start them again
    common = _without(argv, ("--seeds", "--seed", "--out")) + ["--seeds", ""]
    for seed in seeds:
        run_dir = os.path.join(out, f"seed-{seed}")
        print(f"--seeds: seed {seed} -> {run_dir}", flush=True)
        status = subprocess.call([sys.executable, "-m", "fastcl.trainers", method, *common, "--seed", str(seed),
                                  "--out", run_dir])
        if status != 0:
            return status
    runs = []
    for seed in seeds:
        with open(os.path.join(out, f"seed-{seed}", "metrics.json")) as f:
            runs.append(json.load(f))
    summary = aggregate(runs, seeds)
    write_json(summary_path, summary)
    goal = summary["mean"].get("goal_metric")
    lines = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± std"]
    for section, values in [("trained", summary["mean"])] + [
            (key, value) for key, value in summary["mean"].items() if isinstance(value, dict) and key not in ("train", "extra")]:
        spread = summary["std"] if section == "trained" else summary["std"].get(section, {})
        shown = [f"{key} {value:.4f} ± {spread.get(key, 0.0):.4f}" for key, value in values.items()
                 if _number(value) and (section != "trained" or key == goal)]
        if shown:
            lines.append(f"  {section}: " + ", ".join(shown))
    print("\n".join(lines) + f"\nwrote {summary_path}", flush=True)
    return 0
