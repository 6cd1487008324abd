"""Benchmark harness behind ``python -m fastcl.bench`` (what ``make bench`` runs).

A *suite* is a module in ``fastcl.bench.suites`` with ``SUITE`` (its name), ``BASELINE`` (the
provider every other is compared with) and ``cases(device, full) -> list[Case]``. Each case
runs in a fresh subprocess: on CPU its peak extra memory is the peak RSS during the timed runs
minus the RSS just before them (Linux ``/proc/self/clear_refs``), on CUDA the allocator's peak
minus what was allocated before the call. Inputs exist before the baseline is taken; the
gradients of the inputs count as extra memory.
"""
from .harness import Case, Measurement, run_suites

__all__ = ["Case", "Measurement", "run_suites"]
