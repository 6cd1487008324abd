"""Pieces shared by the suites that pit fastcl backends against a materializing "naive" reference."""
from __future__ import annotations

from .info_nce import _available_bytes


def backend_providers(device: str) -> list[str]:
    """naive and torch, plus the device's own fastcl backend (cpu or triton) when it is available."""
    import fastcl

    available = fastcl.backends()
    providers = ["naive", "torch"]
    if device == "cpu" and available["cpu"].available:
        providers.append("cpu")
    if device == "cuda" and available["triton"].available:
        providers.append("triton")
    return providers


def naive_skip(provider: str, need: int, device: str, what: str) -> str | None:
    """Skip reason for the naive reference when its `need` bytes exceed 40% of the device's memory."""
    if provider == "naive" and need > 0.4 * _available_bytes(device):
        return f"needs ~{need / 2**30:.0f} GiB for the {what}"
    return None


def ratio_text(ours, base, baseline: str = "naive") -> str:
    """Time and peak-memory ratios of one measurement against the baseline's."""
    return (f"time {ours.time_ms / base.time_ms:.2f}x {baseline}, peak extra memory {ours.peak_mb / base.peak_mb:.3f}x {baseline} "
            f"({ours.peak_mb:.0f} MB vs {base.peak_mb:.0f} MB)")


def goal_summary(rows, baseline: str, goal: dict, label) -> str:
    """One line per provider comparing it with `baseline` at the `goal` params, where both ran;
    label(provider) starts each line."""
    keys = tuple(goal)
    ok = {(m.provider, tuple(m.params[k] for k in keys)): m for m in rows if m.status == "ok"}
    target = tuple(goal.values())
    base = ok.get((baseline, target))
    lines = []
    for provider in sorted({m.provider for m in rows} - {baseline}):
        ours = ok.get((provider, target))
        if ours and base:
            lines.append(f"{label(provider)}: {ratio_text(ours, base, baseline)}")
    return "\n".join(lines)
