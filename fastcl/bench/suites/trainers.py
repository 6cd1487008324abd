"""Trainers: each registered method's entry point with --loss naive, --loss fused (backend auto:
on the CPU the trainers' batches mostly take its materializing path), --loss kernels (the fused
kernels forced at every size), --loss fused --grad-cache 32, and its peer (sentence-transformers'
trainer) where the method defines one: time per step (median after the first), peak memory of the
training steps above what was allocated before them, the final goal metric, and the largest batch
whose steps fit in 2 GiB (doubling until it does not). Every run is a fresh process with the same
data, seed and steps (the method's ``BENCH_ARGS``).

Each method registers its rows from its own module (``BENCH_ARGS``, optional ``BENCH_BATCH_ARGS``;
no GradCache row where ``Config.grad_cache_supported`` is False; ``bench_peer`` for the
sentence-transformers trainer, ``BENCH_PEERS = {label: extra options}`` for other libraries run
inside this trainer, in ``$FASTCL_PEER_PYTHON``; ``bench_canvas_step(side, encoder)`` where the
memory axis is the canvas side, not the batch: PS3); nothing here names a method. Opt-in: it
trains models, so only ``python -m fastcl.bench trainers`` (or ``make bench-trainers``) runs it.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

SUITE = "trainers"
BASELINE = "naive"
DEFAULT = False  # not part of a plain `python -m fastcl.bench`
MEMORY_CAP_MB = 2048.0
VARIANTS = [("naive", ["--loss", "naive"]), ("fused", ["--loss", "fused"]), ("kernels", ["--loss", "kernels"]),
            ("fused+grad_cache32", ["--loss", "fused", "--grad-cache", "32"])]
CANVAS_SIDES = (448, 896, 1512)  # the canvas-side search (PS3), one canvas per step
CANVAS_TIME_LIMIT_S = 60.0
# The batch search: one step, no evaluation, no checkpoint, in one process per (method, provider).
# Quick mode uses the tiny encoder and 16 tokens, so that the loss (the B x N logits of the naive
# loss) rather than the encoder's activations decides what fits; --full uses the method's encoder.
BATCH_ARGS_QUICK = ["--steps", "1", "--skip-eval", "--skip-before", "--skip-save", "--model", "tiny", "--max-length", "16",
                    "--data", "synthetic", "--synthetic-size", "70000"]
BATCH_ARGS_FULL = ["--steps", "1", "--skip-eval", "--skip-before", "--skip-save"]
BATCH_START_QUICK, BATCH_CAP_QUICK = 1024, 16384
BATCH_START_FULL, BATCH_CAP_FULL = 32, 4096


def _known_options(argv: List[str], config_class) -> List[str]:
    """``argv`` without the options (and their values) that ``config_class`` does not define."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    kept, index = [], 0
    while index < len(argv):
        option = argv[index]
        value = [argv[index + 1]] if index + 1 < len(argv) and not argv[index + 1].startswith("--") else []
        if option[2:].replace("-", "_") in fields:
            kept += [option] + value
        index += 1 + len(value)
    return kept


def cases(device: str, full: bool):  # the harness's case-based interface: this suite runs itself
    return []


def peer_python() -> str:
    """The interpreter of the peers' rows: ``$FASTCL_PEER_PYTHON`` (e.g. a venv with lightly) or this one."""
    return os.environ.get("FASTCL_PEER_PYTHON", sys.executable)


def _run(command: List[str], out: str, timeout: float, env: Optional[Dict[str, str]] = None) -> Dict[str, object]:
    """One trainer run in a fresh process, ``--out out``: its metrics.json with ``status`` and ``wall_s``."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command + ["--out", out], capture_output=True, text=True, timeout=timeout,
                              env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout:.0f} s)"}
    path = os.path.join(out, "metrics.json")
    if done.returncode != 0 or not os.path.isfile(path):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        killed = "out of memory" in tail[0].lower() or done.returncode in (-9, 137)
        return {"status": "out of memory" if killed else tail[0][:160]}
    with open(path) as f:
        result = json.load(f)
    result["status"] = "ok"
    result["wall_s"] = time.perf_counter() - started
    return result


def _largest_batch(entry: str, argv: List[str], start: int, cap: int, work: str, timeout: float) -> str:
    """Largest batch (doubling from ``start``) whose training steps peak under MEMORY_CAP_MB; one
    process runs the whole search (``python -m fastcl.bench.suites.trainers search ...``)."""
    command = [sys.executable, "-m", __name__, "search", str(start), str(cap), work, entry, *argv]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timeout ({timeout:.0f} s)"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return ((done.stderr or "").strip().splitlines() or ["failed"])[-1][:80]
    return json.loads(lines[-1])["largest"]


def largest_canvas(step_of, encoder: str, sides=None, time_limit: Optional[float] = None) -> Dict[str, object]:
    """Grow the canvas side while one step (``step_of(side, encoder)()``, one canvas forward and
    backward) stays under the memory cap; stops at the first side over the cap or over ``time_limit``."""
    from ...trainers.vision_evaluation import peak_memory

    best, tried = None, []
    time_limit = CANVAS_TIME_LIMIT_S if time_limit is None else time_limit
    for side in CANVAS_SIDES if sides is None else sides:
        seconds, peak = peak_memory(step_of(side, encoder), "cpu")
        tried.append({"side": side, "seconds": round(seconds, 3), "peak_mb": round(peak / 2**20, 1)})
        if peak / 2**20 > MEMORY_CAP_MB:
            break
        best = side
        if seconds > time_limit:
            break
    return {"largest_side": best, "tried": tried}


def _canvas_search(module) -> str:
    found = {encoder: largest_canvas(module.bench_canvas_step, encoder)["largest_side"] for encoder in ("selective", "full")}
    return f"side {found['selective']} (full: {found['full']})"


def _search(start: int, cap: int, work: str, entry: str, argv: List[str]) -> str:
    import importlib

    main = importlib.import_module(entry).main
    best, batch, peaks = None, start, {}
    while batch <= cap:
        out = os.path.join(work, f"b{batch}")
        try:
            code = main([*argv, "--batch-size", str(batch), "--out", out])
        except (RuntimeError, MemoryError) as error:  # out of memory on the device
            print(f"batch {batch}: {type(error).__name__}: {str(error)[:120]}", file=sys.stderr)
            break
        try:
            with open(os.path.join(out, "metrics.json")) as f:
                peak = json.load(f)["train"]["peak_memory_mb"]
        except (OSError, KeyError, ValueError):
            peak = None
        peaks[batch] = peak
        if code != 0 or peak is None or peak > MEMORY_CAP_MB:
            break
        best, batch = batch, batch * 2
    largest = f"< {start}" if best is None else (f">= {best}" if batch > cap else str(best))
    print(json.dumps({"largest": largest, "peaks_mb": peaks}), flush=True)
    return largest


def run(device: str, full: bool, out_dir: str, timeout: float = 3600.0, methods: Optional[List[str]] = None,
        providers: Optional[List[str]] = None, batch_search: bool = True):
    """Run the suite; ``methods``/``providers`` restrict it, ``batch_search=False`` skips the 2 GiB search."""
    from ...trainers import METHODS, load_method

    os.makedirs(out_dir, exist_ok=True)
    rows: List[Dict[str, object]] = []
    work = tempfile.mkdtemp(prefix="fastcl-bench-trainers-")
    python = [sys.executable, "-m"]
    for name in methods or list(METHODS):
        module = load_method(name)
        args = list(getattr(module, "BENCH_ARGS_FULL" if full else "BENCH_ARGS", None) or getattr(module, "BENCH_ARGS", []))
        batch_args = list(getattr(module, "BENCH_BATCH_ARGS", [])) + (BATCH_ARGS_FULL if full else BATCH_ARGS_QUICK)
        batch_args = _known_options(batch_args, module.Config)  # e.g. cml, ccn: no encoder to shrink
        runs = [(label, python + ["fastcl.trainers", name], extra) for label, extra in VARIANTS
                if "--grad-cache" not in extra or module.Config.grad_cache_supported]
        if hasattr(module, "bench_peer"):  # the sentence-transformers trainer (text methods)
            runs += [("sentence-transformers", python + ["fastcl.trainers.st_peer", name], []),
                          ("sentence-transformers cached32", python + ["fastcl.trainers.st_peer", name], ["--grad-cache", "32"])]
        for label, command, extra in runs:
            if providers is not None and label not in providers:
                continue
            print(f"[trainers] {name} {label} ...", flush=True)
            # the untrained model's metrics and the baselines once per method, with the first row
            once = [] if label == VARIANTS[0][0] or label.startswith("sentence-transformers") else ["--skip-before"]
            result = _run(command + args + extra + once, os.path.join(work, name, label.replace(" ", "_")), timeout)
            row = _row(name, label, result, args + extra)
            if batch_search and hasattr(module, "bench_canvas_step"):  # PS3: the largest canvas side
                if label == VARIANTS[-1][0]:
                    row["largest_batch_2gb"] = _canvas_search(module)
            elif batch_search and (full or not label.startswith("sentence-transformers")):
                start, cap = (BATCH_START_FULL, BATCH_CAP_FULL) if full else (BATCH_START_QUICK, BATCH_CAP_QUICK)
                row["largest_batch_2gb"] = _largest_batch(command[-2], [name, *args, *extra, *batch_args], start, cap,
                                                          os.path.join(work, name, label.replace(" ", "_") + "-batch"), timeout)
            _add(rows, row)
        peers = getattr(module, "BENCH_PEERS", {})
        if peers and (providers is None or "peers" in providers):
            # other libraries' losses or encoders in this trainer (vision: PML, lightly, open_clip, full high-res)
            print(f"[trainers] {name} peers ...", flush=True)
            for label, extra in peers.items():
                result = _run([peer_python(), "-m", "fastcl.trainers", name, *args, *extra],
                              os.path.join(work, name, "peers", label.replace(" ", "_")), timeout,
                              env={"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
                _add(rows, _row(name, label, result, args + extra, peer=True))
    _report(rows, out_dir, device)
    return rows


def _row(method: str, provider: str, result: Dict[str, object], argv: List[str], peer: bool = False) -> Dict[str, object]:
    """One table row from a run's metrics.json (a peer's row has no "before" column nor data line)."""
    goal = result.get("goal_metric")
    train = result.get("train") or {}
    return {"method": method, "provider": provider, "status": result["status"],
            "time_per_step_s": train.get("time_per_step_s"), "peak_memory_mb": train.get("peak_memory_mb"),
            "goal_metric": goal, "final_metric": result.get(goal) if goal else None,
            "before_metric": None if peer or not goal else (result.get("before") or {}).get(goal),
            "data": "" if peer else (result.get("data") or "").split(";")[0], "args": " ".join(argv)}


def _add(rows: List[Dict[str, object]], row: Dict[str, object]) -> None:
    rows.append(row)
    print(f"  {row['status']}: {row['time_per_step_s']} s/step, {row['peak_memory_mb']} MB, {row['goal_metric']} "
          f"{row['final_metric']}", flush=True)


def format_table(rows: List[Dict[str, object]]) -> str:
    naive = {r["method"]: r for r in rows if r["provider"] == BASELINE and r["status"] == "ok"}

    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    header = (f"{'method':<9} {'provider':<31} {'s/step':>8} {'x naive':>8} {'peak MB':>9} {'x naive':>8} "
              f"{'metric':>10} {'before':>7} {'after':>7} {'batch<=2GB':>11}  status")
    lines = [header, "-" * len(header)]
    for r in rows:
        base = naive.get(r["method"])
        time_ratio = (r["time_per_step_s"] / base["time_per_step_s"]) if base and r["time_per_step_s"] and base["time_per_step_s"] else None
        memory_ratio = (r["peak_memory_mb"] / base["peak_memory_mb"]) if base and r["peak_memory_mb"] and base["peak_memory_mb"] else None
        lines.append(f"{r['method']:<9} {r['provider']:<31} {number(r['time_per_step_s']):>8} {number(time_ratio, 2):>8} "
                     f"{number(r['peak_memory_mb'], 0):>9} {number(memory_ratio, 2):>8} {str(r['goal_metric'] or '-'):>10} "
                     f"{number(r['before_metric']):>7} {number(r['final_metric']):>7} {str(r.get('largest_batch_2gb', '-')):>11}  {r['status']}")
    return "\n".join(lines)


def _report(rows, out_dir: str, device: str) -> None:
    from ..harness import device_name

    print()
    print(format_table(rows), flush=True)
    path = os.path.join(out_dir, "trainers.csv")
    fields = ["device", "method", "provider", "status", "time_per_step_s", "peak_memory_mb", "goal_metric", "before_metric",
              "final_metric", "largest_batch_2gb", "data", "args"]
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({"device": device_name(device), **row})
    with open(os.path.join(out_dir, "trainers.txt"), "w") as f:
        f.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} on {device_name(device)}\n{format_table(rows)}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: trainers.png skipped")
        return
    methods = list(dict.fromkeys(r["method"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / max(1, len(providers))
    for index, provider in enumerate(providers):
        for axis, key in zip(axes, ("time_per_step_s", "peak_memory_mb", "final_metric")):
            values = [next((r[key] or 0 for r in rows if r["method"] == m and r["provider"] == provider), 0) for m in methods]
            axis.bar([m + index * width for m in range(len(methods))], values, width, label=provider)
    for axis, title in zip(axes, ("time per step (s)", "peak memory of the steps (MB)", "final goal metric")):
        axis.set_xticks([m + 0.4 - width / 2 for m in range(len(methods))])
        axis.set_xticklabels(methods)
        axis.set_title(title, fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"trainers on {device_name(device)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "trainers.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # the batch search's worker process
    if len(sys.argv) < 6 or sys.argv[1] != "search":
        sys.exit("usage: python -m fastcl.bench.suites.trainers search START CAP WORKDIR ENTRY METHOD [options]")
    _search(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6:])
