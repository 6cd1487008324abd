"""GradCache on a real sentence encoder: plain backward vs fastcl.GradCache vs sentence-transformers.

    python benchmarks/bench_grad_cache.py [--batch 1024] [--seq-len 32] [--chunk 32] [--encoder auto|minilm|tiny] [--out benchmarks/results]

One training step (forward + backward, gradients allocated inside the step) of all-MiniLM-L6-v2
(or a tiny BERT when the MiniLM package is absent) on `batch` synthetic sentence pairs of
`seq-len` tokens, for three providers (see fastcl/bench/suites/grad_cache.py):
plain full-batch backward, fastcl GradCache (chunk_size=chunk) and sentence-transformers'
CachedMultipleNegativesRankingLoss (mini_batch_size=chunk).

Each provider runs in a fresh subprocess: load the model, warm up on a batch of `chunk` rows
(thread pools, lazy initialisation), then time `--steps` full steps and record the peak extra
resident memory (VmHWM after resetting it, minus VmRSS before the step, once malloc has
returned its free memory to the OS). Writes
`<out>/grad_cache.csv` (appended, one row per provider, with the machine and the load average)
and `<out>/grad_cache.md` (a readable table per run, appended).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROVIDERS = ("plain", "fastcl", "sentence-transformers")


def release_free_heap() -> None:
    """Hand memory that is free but kept by malloc back to the OS, so that the resident size
    before a step counts live memory only (else a warm-up's freed buffers hide part of the peak)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(provider: str, batch: int, seq_len: int, chunk: int, steps: int, encoder: str) -> dict:
    from fastcl.bench.harness import _reset_peak_rss, _rss_bytes
    from fastcl.bench.suites.grad_cache import make_step

    warm = make_step("cpu", provider, batch=chunk, seq_len=seq_len, chunk=max(1, chunk // 4), encoder=encoder)
    warm()
    del warm
    step = make_step("cpu", provider, batch=batch, seq_len=seq_len, chunk=chunk, encoder=encoder)
    times, peaks = [], []
    load_before = os.getloadavg()[0]
    for _ in range(steps):
        release_free_heap()
        before = _rss_bytes("VmRSS")
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): no memory measurement possible")
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        peaks.append((_rss_bytes("VmHWM") - before) / 2**20)
    return {"provider": provider, "time_s": statistics.median(times), "times_s": times, "peak_mb": max(peaks),
            "load_before": load_before, "load_after": os.getloadavg()[0], **step.extra}


def run_provider(provider: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", provider, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--chunk", str(args.chunk), "--steps", str(args.steps), "--encoder", args.encoder]
    if args.threads:
        command += ["--threads", str(args.threads)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"provider": provider, "status": f"timeout ({args.timeout:.0f} s)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"provider": provider, "status": tail[0][:160]}
    return {**json.loads(lines[-1]), "status": "ok"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per provider (median reported)")
    parser.add_argument("--encoder", default="auto", choices=("auto", "minilm", "tiny"),
                        help="auto: MiniLM when its package is installed, else a tiny BERT")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per provider")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice). On a CPU shared with other jobs, 1 thread "
                             "avoids the stalls of a 2-thread parallel region waiting for a descheduled thread, "
                             "which cost every op the same whatever its size and so penalise chunked providers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq_len, args.chunk, args.steps, args.encoder)), flush=True)
        return

    import torch

    from fastcl.bench.harness import device_name

    machine = device_name("cpu")
    print(f"GradCache benchmark on {machine}: batch {args.batch}, seq len {args.seq_len}, chunk {args.chunk}", flush=True)
    results = []
    for provider in args.providers:
        print(f"  {provider} ...", flush=True)
        results.append(run_provider(provider, args))
        print(f"    {results[-1]}", flush=True)
    base = next((r for r in results if r["provider"] == "plain" and r["status"] == "ok"), None)
    for r in results:
        ok = r["status"] == "ok" and base is not None
        r["time_ratio"] = r["time_s"] / base["time_s"] if ok else None
        r["memory_ratio"] = r["peak_mb"] / base["peak_mb"] if ok else None

    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    encoder = next((r.get("encoder") for r in results if r.get("encoder")), "?")
    csv_path = os.path.join(args.out, "grad_cache.csv")
    exists = os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.writer(f)
        if not exists:
            writer.writerow(["timestamp", "machine", "torch", "encoder", "provider", "batch", "seq_len", "chunk",
                             "time_s", "peak_mb", "time_ratio_vs_plain", "memory_ratio_vs_plain", "loss",
                             "load_before", "load_after", "status"])
        for r in results:
            writer.writerow([stamp, machine, torch.__version__, encoder, r["provider"], args.batch, args.seq_len,
                             args.chunk, r.get("time_s", ""), r.get("peak_mb", ""), r.get("time_ratio") or "",
                             r.get("memory_ratio") or "", r.get("loss", ""), r.get("load_before", ""),
                             r.get("load_after", ""), r["status"]])

    def fmt(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"## GradCache benchmark, {stamp}", "",
        f"- machine: {machine}; torch {torch.__version__}",
        f"- encoder: {encoder}",
        f"- one training step on {args.batch} sentence pairs of {args.seq_len} tokens; chunk / mini_batch_size {args.chunk}; "
        f"median of {args.steps} timed step(s) after a small warm-up, each provider in a fresh process",
        "- peak = peak extra resident memory during the step (activations, parameter gradients, caches)",
        "- load = 1-minute load average before / after the provider ran (other jobs share the machine)", "",
        "| provider | time / step (s) | peak extra memory (MB) | time vs plain | memory vs plain | load | status |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        load = f"{r['load_before']:.1f} / {r['load_after']:.1f}" if "load_before" in r else "-"
        lines.append(f"| {r['provider']} | {fmt(r.get('time_s'), 1)} | {fmt(r.get('peak_mb'), 0)} | "
                     f"{fmt(r.get('time_ratio'), 2)} | {fmt(r.get('memory_ratio'), 3)} | {load} | {r['status']} |")
    table = "\n".join(lines) + "\n"
    markdown = os.path.join(args.out, "grad_cache.md")
    with open(markdown, "a") as f:  # one section per run, newest last
        f.write(("\n" if os.path.exists(markdown) and os.path.getsize(markdown) else "") + table)
    print()
    print(table)


if __name__ == "__main__":
    main()
