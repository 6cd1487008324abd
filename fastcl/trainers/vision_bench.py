"""Helpers of the vision trainers' benchmark rows in ``python -m fastcl.bench trainers``: one run
of the user's CLI in a fresh process (``run_trainer``, for the peers' rows of ``bench_peers``)
and PS3's largest-canvas search (``largest_canvas``, for ``ps3.bench_search``). Time per step is
the engine's median over the steps after the first; peak memory is the engine's (RSS high-water
mark above the baseline on CPU, the allocator's peak on GPU).
"""
from __future__ import annotations

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
