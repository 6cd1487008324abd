"""Benchmark suites: one module per op (SUITE, BASELINE, cases(device, full))."""
