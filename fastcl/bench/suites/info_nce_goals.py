"""The goal grid of InfoNCE on every input kind (``--full`` only): fwd+bwd time and peak extra memory of ``auto``
and ``cpu`` against the plain PyTorch loss in the same run, each case in a fresh process, for
B in {256, 1024, 4096, 8192}, normalized and unnormalized (randn) inputs, tau in {0.01, 0.05, 1},
D in {256, 768}, float32.

Goals: auto <= 1.0x naive everywhere; cpu <= 1.0x naive for B >= 1024; peak extra memory of both
<= 1/20 of naive's at B >= 8192.
"""
from __future__ import annotations

from ..harness import Case
from .info_nce_robust import _providers

SUITE = "info_nce_goals"
BASELINE = "naive"
MODULE = "fastcl.bench.suites.info_nce_robust"  # the same step factory


# median of this many timed steps: a step of a few milliseconds needs many on a shared machine
_REPEATS = {256: 25, 1024: 7, 4096: 2, 8192: 1}


def cases(device: str, full: bool):
    if not full:
        return []
    out = []
    for batch in (8192, 4096, 1024, 256):  # largest first: a cut-short run still has the memory goal
        for normalized in (True, False):
            for temperature in (0.01, 0.05, 1.0):
                for dim in (256, 768):
                    for provider in _providers(device):
                        params = {"batch": batch, "dim": dim, "normalized": normalized, "temperature": temperature,
                                  "dtype": "float32", "group": "goal"}
                        out.append(Case(SUITE, provider, MODULE, "make_step", params, x=batch,
                                        repeats=_REPEATS[batch]))
    return out


def summarize(rows, device):
    def key(m):
        p = m.params
        return p["batch"], p["normalized"], p["temperature"], p["dim"]

    base = {key(m): m for m in rows if m.provider == BASELINE and m.status == "ok"}
    lines, misses = [], []
    for m in rows:
        if m.provider == BASELINE:
            continue
        ref = base.get(key(m))
        if m.status != "ok" or ref is None:
            misses.append(f"{m.provider} {key(m)}: {m.status}")
            continue
        ratio = m.time_ms / ref.time_ms
        memory = m.peak_mb / ref.peak_mb if ref.peak_mb else float("nan")
        batch = m.params["batch"]
        time_goal = m.provider == "auto" or batch >= 1024
        memory_goal = batch >= 8192
        ok = (not time_goal or ratio <= 1.0) and (not memory_goal or memory <= 0.05)
        text = (f"{m.provider:<5} B={batch:<5} {'norm ' if m.params['normalized'] else 'raw  '} "
                f"tau={m.params['temperature']:<5} D={m.params['dim']}: time {ratio:.2f}x"
                + (f", memory {memory:.3f}x" if memory_goal else "") + ("" if ok else "  <- misses the goal"))
        lines.append(text)
        if not ok:
            misses.append(text)
    lines.append(f"{len(lines) - len(misses)} of {len(lines)} rows meet their goal" if lines else "no rows")
    return "\n".join(lines + misses[:0])
