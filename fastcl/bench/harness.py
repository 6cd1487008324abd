"""Subprocess-isolated timing and peak-memory measurement, tables, CSV and plots."""
from __future__ import annotations

import csv
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Case:
    """One benchmark point: ``module.factory(**params)`` returns a zero-argument ``step``
    that runs forward + backward once (inputs are created by the factory, before the
    memory baseline)."""

    suite: str
    provider: str
    module: str
    factory: str
    params: Dict[str, object]
    x: int  # the swept size (plotted on the x axis)
    skip: Optional[str] = None  # reason not to run (e.g. needs more memory than the machine has)
    repeats: int = 3
    # time and peak memory of the *first* step in this fresh process (lazy imports, thread
    # pools, allocator growth included), reported against the steady state in ``extra``
    first_call: bool = False


@dataclass
class Measurement:
    suite: str
    provider: str
    params: Dict[str, object]
    x: int
    time_ms: Optional[float] = None
    peak_mb: Optional[float] = None
    status: str = "ok"
    extra: Dict[str, object] = field(default_factory=dict)


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    processor = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{processor} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them after the warm-up; without this,
    the timed runs would reuse them and the peak would read low)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tensor_peak_bytes(step: Callable[[], object]) -> int:
    """Peak bytes of tensors that ``step()`` allocates on the CPU beyond what was allocated before
    it (gradients of the inputs included), from the allocator's own records (the profiler's
    memory events): the CPU's analogue of ``torch.cuda.max_memory_allocated``. Unlike the
    process's peak RSS it leaves out what libraries allocate outside torch (e.g. gloo's buffers)
    and does not depend on when the C library returns freed pages."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    allocations = sorted((event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
                         key=lambda event: event.start_ns())
    current = peak = 0
    for event in allocations:
        if event.device_type() == torch._C._autograd.DeviceType.CPU:
            current += event.nbytes()
            peak = max(peak, current)
    return peak


def measure_in_process(case: Case, device: str) -> Measurement:
    """Run one case here (called in the worker subprocess)."""
    module = importlib.import_module(case.module)
    step: Callable[[], object] = getattr(module, case.factory)(device=device, provider=case.provider, **case.params)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    first = _measure_first_step(step, device, sync) if case.first_call else None
    step()  # warm-up: one-time allocations, thread pools, autotuning
    sync()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _release_freed_memory()
        before = _rss_bytes("VmRSS")
        if not _reset_peak_rss():
            before = None
    times = []
    for _ in range(case.repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _rss_bytes("VmHWM") - before if before is not None else float("nan")
    extra = getattr(step, "extra", {}) or {}
    time_ms, peak_mb = statistics.median(times) * 1e3, max(0.0, peak) / 2**20
    if first is not None:  # the row is the first call; the steady state goes to extra
        extra = dict(extra, steady_ms=time_ms, steady_peak_mb=peak_mb, first_minus_steady_ms=first[0] - time_ms,
                     first_minus_steady_mb=first[1] - peak_mb)
        time_ms, peak_mb = first
    return Measurement(case.suite, case.provider, case.params, case.x, time_ms=time_ms, peak_mb=peak_mb, extra=extra)


def _measure_first_step(step, device: str, sync):
    """(ms, peak extra MB) of the first call of ``step`` in this process."""
    gc.collect()
    if device == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _release_freed_memory()
        before = _rss_bytes("VmRSS") if _reset_peak_rss() else None
    start = time.perf_counter()
    step()
    sync()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _rss_bytes("VmHWM") - before if before is not None else float("nan")
    return elapsed * 1e3, max(0.0, peak) / 2**20


def _run_worker(case: Case, device: str, timeout: float) -> Measurement:
    payload = json.dumps({"case": asdict(case), "device": device})
    env = dict(os.environ)
    try:
        proc = subprocess.run([sys.executable, "-m", "fastcl.bench.worker"], input=payload, capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return Measurement(case.suite, case.provider, case.params, case.x, status=f"timeout ({timeout:.0f} s)")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        status = "out of memory" if ("out of memory" in tail[0].lower() or proc.returncode in (-9, 137)) else tail[0]
        return Measurement(case.suite, case.provider, case.params, case.x, status=status[:120])
    return Measurement(**json.loads(lines[-1]))


def _progress(total: int):
    try:
        from tqdm import tqdm

        if sys.stderr.isatty():
            return tqdm(total=total, unit="case", dynamic_ncols=True)
        raise ImportError
    except ImportError:
        class _Plain:
            def __init__(self):
                self.done = 0

            def set_description(self, text):
                print(f"[{self.done + 1}/{total}] {text}", flush=True)

            def update(self, n=1):
                self.done += n

            def close(self):
                pass

        return _Plain()


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(rows: List[Measurement], baselines: Dict[str, str]) -> str:
    """Readable table with time/memory ratios against each suite's baseline at the same params."""
    base = {}
    for m in rows:
        if m.provider == baselines.get(m.suite) and m.status == "ok":
            base[(m.suite, json.dumps(m.params, sort_keys=True))] = m
    header = f"{'suite':<22} {'provider':<18} {'params':<34} {'time ms':>10} {'peak MB':>10} {'t/base':>7} {'m/base':>7}  status"
    out = [header, "-" * len(header)]
    for m in rows:
        ref = base.get((m.suite, json.dumps(m.params, sort_keys=True)))
        t_ratio = m.time_ms / ref.time_ms if ref and m.time_ms and ref.time_ms else None
        m_ratio = m.peak_mb / ref.peak_mb if ref and m.peak_mb is not None and ref.peak_mb else None
        params = ",".join(f"{k}={v}" for k, v in m.params.items() if k != "dtype")
        out.append(f"{m.suite:<22} {m.provider:<18} {params:<34} {_fmt(m.time_ms):>10} {_fmt(m.peak_mb):>10} "
                   f"{_fmt(t_ratio, 2):>7} {_fmt(m_ratio, 3):>7}  {m.status}")
    return "\n".join(out)


def write_csv(rows: List[Measurement], path: str, device: str, baselines: Dict[str, str]) -> None:
    exists = os.path.exists(path)
    name = device_name(device)
    base = {(m.suite, json.dumps(m.params, sort_keys=True)): m for m in rows
            if m.provider == baselines.get(m.suite) and m.status == "ok"}
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if not exists:
            writer.writerow(["timestamp", "device", "suite", "provider", "params", "x", "time_ms", "peak_mb",
                             "time_ratio_vs_baseline", "memory_ratio_vs_baseline", "status", "extra"])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        for m in rows:
            ref = base.get((m.suite, json.dumps(m.params, sort_keys=True)))
            t_ratio = m.time_ms / ref.time_ms if ref and m.time_ms and ref.time_ms else ""
            m_ratio = m.peak_mb / ref.peak_mb if ref and m.peak_mb is not None and ref.peak_mb else ""
            writer.writerow([stamp, name, m.suite, m.provider, json.dumps(m.params, sort_keys=True), m.x,
                             m.time_ms if m.time_ms is not None else "", m.peak_mb if m.peak_mb is not None else "",
                             t_ratio, m_ratio, m.status, json.dumps(m.extra, sort_keys=True)])


def write_rows(out_dir: str, name: str, rows: List[dict], summary: str) -> None:
    """``<out_dir>/<name>.csv`` (one dict a row) and ``<out_dir>/<name>_summary.txt``: what the
    one-process comparison scripts in benchmarks/ write."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, f"{name}_summary.txt"), "w") as handle:
        handle.write(summary + "\n")


def read_csv(path: str) -> List[Measurement]:
    """Measurements back from a CSV written by :func:`write_csv` (e.g. to plot them again)."""
    with open(path, newline="") as f:
        return [Measurement(row["suite"], row["provider"], json.loads(row["params"]), int(row["x"]),
                            float(row["time_ms"]) if row["time_ms"] else None,
                            float(row["peak_mb"]) if row["peak_mb"] else None, row["status"])
                for row in csv.DictReader(f)]


def plot(rows: List[Measurement], path: str, title: str) -> Optional[str]:
    """Time and memory against the swept size, log-log. Returns a reason when it cannot plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: plot skipped (pip install 'fastcl[bench]')"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: Dict[str, List[Measurement]] = {}
    for m in rows:
        if m.status == "ok":
            other = ",".join(k if v is True else f"{k}={v}" for k, v in m.params.items()
                             if k not in ("batch", "dtype") and v is not False)
            groups.setdefault(f"{m.provider} {other}".strip(), []).append(m)
    for label, ms in sorted(groups.items()):
        ms = sorted(ms, key=lambda m: m.x)
        xs = [m.x for m in ms]
        axes[0].plot(xs, [m.time_ms for m in ms], marker="o", label=label)
        axes[1].plot(xs, [max(m.peak_mb, 1e-3) for m in ms], marker="o", label=label)
    for ax, ylabel in zip(axes, ("median fwd+bwd time (ms)", "peak extra memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run_suites(suites, device: str, full: bool, out_dir: str, timeout: float = 600.0) -> List[Measurement]:
    """Run every case of every suite (each in a fresh subprocess); each suite's table, CSV,
    plot and summary are written as soon as that suite finishes."""
    os.makedirs(out_dir, exist_ok=True)
    plan = [(suite, suite.cases(device, full)) for suite in suites]
    baselines = {suite.SUITE: suite.BASELINE for suite in suites}
    total = sum(len(cases) for _, cases in plan)
    print(f"fastcl bench on {device_name(device)}: {total} cases -> {out_dir}/", flush=True)
    bar = _progress(total)
    results: List[Measurement] = []
    for suite, cases in plan:
        rows = []
        for case in cases:
            bar.set_description(f"{case.suite} {case.provider} {case.params}")
            if case.skip:
                rows.append(Measurement(case.suite, case.provider, case.params, case.x, status=f"skipped: {case.skip}"))
            else:
                rows.append(_run_worker(case, device, timeout))
            bar.update(1)
        results.extend(rows)
        if rows:
            _report(suite, rows, baselines, device, out_dir)
    bar.close()
    return results


def _report(suite, rows: List[Measurement], baselines: Dict[str, str], device: str, out_dir: str) -> None:
    print()
    print(format_table(rows, baselines), flush=True)
    write_csv(rows, os.path.join(out_dir, f"{suite.SUITE}.csv"), device, baselines)
    note = plot(rows, os.path.join(out_dir, f"{suite.SUITE}.png"), f"{suite.SUITE} on {device_name(device)}")
    if note:
        print(note)
    if hasattr(suite, "summarize"):
        summary = suite.summarize(rows, device)
        if summary:
            print(summary, flush=True)
            with open(os.path.join(out_dir, f"{suite.SUITE}_summary.txt"), "a") as f:
                f.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} on {device_name(device)}\n{summary}\n")
