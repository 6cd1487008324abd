"""Benchmark rows of the vision trainers, each run in a fresh process through the user's CLI.

``python -m fastcl.trainers.vision_bench [--methods simclr clip ps3] [--out DIR] [--no-search]``
runs, per method, its ``BENCH_ARGS`` with ``--loss naive``, ``--loss fused``, ``--loss fused
--grad-cache 32`` and the peers (``bench_peers(argv, out_dir) -> {name: row}``), then searches the largest
batch whose run stays under the memory cap (SimCLR, CLIP: the batch doubles from 256; PS3: the
canvas side grows, for the selective and the full high-res encoder). Time per step is the
engine's median over the steps after the first; peak memory is the engine's (RSS high-water
mark above the baseline on CPU, the allocator's peak on GPU). Writes ``trainers_vision.csv``,
``trainers_vision.md`` (the table) and ``trainers_vision.png`` under ``--out``.

The hook is ``bench_peers`` (not the ``bench_peer`` of the ``trainers`` suite, which runs the
sentence-transformers peer for whoever defines it); the suite can call it for these methods.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

GOALS = {"simclr": "linear_probe_accuracy", "clip": "zero_shot_accuracy", "ps3": "box_recall"}
CAP_MB = 2048.0


def peer_python() -> str:
    """The interpreter of the peer runs: ``$FASTCL_PEER_PYTHON`` (e.g. a venv with lightly) or this one."""
    return os.environ.get("FASTCL_PEER_PYTHON", sys.executable)


def run_trainer(method: str, argv: List[str], out_dir: str, timeout: float = 900.0,
                python: Optional[str] = None) -> Dict[str, object]:
    """Run ``python -m fastcl.trainers METHOD argv --out out_dir``; the row of its metrics.json."""
    os.makedirs(out_dir, exist_ok=True)
    command = [python or peer_python(), "-m", "fastcl.trainers", method, *argv, "--out", out_dir]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    began = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout:.0f} s)"}
    row: Dict[str, object] = {"wall_s": round(time.perf_counter() - began, 1)}
    path = os.path.join(out_dir, "metrics.json")
    if proc.returncode != 0 or not os.path.exists(path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        row["status"] = ("out of memory" if "out of memory" in tail[0].lower() or proc.returncode in (-9, 137)
                         else tail[0][:160])
        return row
    with open(path) as f:
        metrics = json.load(f)
    row.update(status="ok", time_per_step_s=metrics["train"]["time_per_step_s"],
               peak_memory_mb=metrics["train"]["peak_memory_mb"], metric=GOALS[method],
               value=metrics.get(GOALS[method]))
    for key in ("retrieval_accuracy", "knn_accuracy", "step_time_ms"):
        if key in metrics:
            row[key] = metrics[key]
    return row


def provider_rows(method: str, out: str) -> List[Dict[str, object]]:
    from . import load_method

    module = load_method(method)
    argv = list(module.BENCH_ARGS)
    variants = {"naive": ["--loss", "naive"], "fused": ["--loss", "fused"],
                "fused+gradcache": ["--loss", "fused", "--grad-cache", "32"]}
    rows = []
    for provider, extra in variants.items():
        rows.append({"method": method, "provider": provider,
                     **run_trainer(method, argv + extra, os.path.join(out, method, provider))})
    peers = module.bench_peers(argv, os.path.join(out, method, "peer")) if hasattr(module, "bench_peers") else {}
    for provider, row in peers.items():
        rows.append({"method": method, "provider": provider, **row})
    return rows


def largest_batch(method: str, out: str, extra: List[str], start: int = 256, stop: int = 8192) -> Dict[str, object]:
    """Double ``--batch-size`` from ``start`` while the run's peak stays under the cap."""
    from . import load_method

    argv = list(load_method(method).BENCH_BATCH_ARGS) + extra
    best, batch, tried = None, start, []
    while batch <= stop:
        row = run_trainer(method, argv + ["--batch-size", str(batch)], os.path.join(out, method, f"batch{batch}"))
        tried.append((batch, row.get("peak_memory_mb"), row.get("status")))
        if row.get("status") != "ok" or row["peak_memory_mb"] is None or row["peak_memory_mb"] > CAP_MB:
            break
        best, batch = batch, batch * 2
    return {"largest_batch": best, "tried": tried}


def largest_canvas(encoder: str, sides=(448, 896, 1512), time_limit: float = 60.0) -> Dict[str, object]:
    """Grow the canvas side while one forward+backward of one canvas (PS3's selective encoder or
    the full high-res one, the trainer's default ViT) stays under the cap; stops at the first
    side over the cap or over ``time_limit`` seconds."""
    import torch

    from .data.captions import all_region_captions
    from .ps3 import Config, PS3Model
    from .vision_evaluation import peak_memory

    best, tried = None, []
    for side in sides:
        low_res = max(14, (side // 4) // 14 * 14)
        config = Config(data="synthetic", canvas_side=side, low_res=low_res, encoder=encoder)
        model = PS3Model(config, all_region_captions([str(i) for i in range(10)]), "bow", 1)
        images = torch.rand(1, 1, side, side)
        boxes = torch.tensor([[side // 4, side // 4, side // 2, side // 2]])
        ids = torch.tensor([0])
        seconds, peak = peak_memory(lambda: model(images=images, caption_ids=ids, boxes=boxes).sum().backward(), "cpu")
        tried.append({"side": side, "seconds": round(seconds, 3), "peak_mb": round(peak / 2**20, 1)})
        if peak / 2**20 > CAP_MB:
            break
        best = side
        if seconds > time_limit:
            break
    return {"largest_side": best, "tried": tried}


def write_outputs(rows: List[Dict[str, object]], search: Dict[str, object], out: str) -> None:
    import torch

    from ..bench.harness import device_name

    device = device_name("cuda" if torch.cuda.is_available() else "cpu")
    with open(os.path.join(out, "trainers_vision.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["device", "method", "provider", "time_per_step_s", "peak_memory_mb", "metric", "value", "status"])
        for r in rows:
            writer.writerow([device, r["method"], r["provider"], r.get("time_per_step_s"), r.get("peak_memory_mb"),
                             r.get("metric"), r.get("value"), r.get("status")])
    lines = [f"Device: {device}", "", "| method | provider | time/step (s) | peak MB | metric | value | status |",
             "|---|---|---|---|---|---|---|"]

    def fmt(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    for r in rows:
        lines.append(f"| {r['method']} | {r['provider']} | {fmt(r.get('time_per_step_s'), 3)} | "
                     f"{fmt(r.get('peak_memory_mb'), 0)} | {r.get('metric', '-')} | {fmt(r.get('value'), 3)} | "
                     f"{r.get('status')} |")
    lines += ["", "Largest batch / canvas side under 2 GB:", "", "```", json.dumps(search, indent=1), "```"]
    with open(os.path.join(out, "trainers_vision.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.4), squeeze=False)
    for axis, method in zip(axes[0], methods):
        mine = [r for r in rows if r["method"] == method and r.get("time_per_step_s")]
        axis.bar([r["provider"] for r in mine], [r["time_per_step_s"] for r in mine], color="tab:blue")
        axis.set_title(method)
        axis.set_ylabel("time per step (s)")
        axis.tick_params(axis="x", rotation=30, labelsize=7)
        twin = axis.twinx()
        twin.plot([r["provider"] for r in mine], [r["peak_memory_mb"] or 0 for r in mine], "o-", color="tab:red")
        twin.set_ylabel("peak MB", color="tab:red")
    fig.suptitle(f"vision trainers, {device}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "trainers_vision.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcl.trainers.vision_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["simclr", "clip", "ps3"], choices=sorted(GOALS))
    parser.add_argument("--out", default="benchmarks/results/cpu_trainers_vision")
    parser.add_argument("--no-search", action="store_true", help="skip the largest-batch / canvas searches")
    parser.add_argument("--batch-from", type=int, default=256, help="first batch of the doubling search")
    parser.add_argument("--batch-to", type=int, default=8192, help="last batch of the doubling search")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs = os.path.join(args.out, "runs")
    rows, search = [], {}
    for method in args.methods:
        rows += provider_rows(method, runs)
        for row in rows[-5:]:
            print(json.dumps(row), flush=True)
        if args.no_search:
            continue
        if method == "ps3":
            search["ps3"] = {encoder: largest_canvas(encoder) for encoder in ("selective", "full")}
        else:
            search[method] = {"fused+gradcache": largest_batch(method, runs, ["--grad-cache", "128"], args.batch_from,
                                                               args.batch_to),
                              "naive": largest_batch(method, runs, ["--loss", "naive"], args.batch_from, args.batch_to)}
        print(json.dumps(search[method]), flush=True)
    write_outputs(rows, search, args.out)
    print(open(os.path.join(args.out, "trainers_vision.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
