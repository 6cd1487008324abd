"""Shared comparison for the GPU-backend tests (Triton, CUDA) against the naive reference."""


def assert_close(actual, expected, tolerance, what):
    """Max absolute error within ``tolerance`` times the largest reference magnitude."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-6)
    error = float((actual - expected).abs().max() / scale)
    assert error <= tolerance, f"{what}: max error {error:.3g} x max|ref| {float(scale):.3g} > {tolerance:g}"
