"""Smoke test of an installed fastcl (a wheel in a fresh venv, under qemu, or the no-compiler
fallback): run it from outside the source tree so the installed package is what imports.

Every op, on every backend that runs on this machine's CPU, against the naive reference: the
forward value and every input gradient, in float32 and float64. Small shapes, so it finishes in
about a minute under qemu.

    python tests/install/smoke.py --expect-capability avx2     # the native kernels, this variant
    python tests/install/smoke.py --expect-fallback            # no native kernels (pure Python)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


def _compare(name, run, inputs, backends, tolerance):
    import torch

    def evaluate(backend):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = run(leaves, backend)
        torch.manual_seed(0)
        weight = torch.randn_like(out)
        (out * weight).sum().backward()
        return out.detach(), [leaf.grad for leaf in leaves if leaf.requires_grad]

    expected, expected_grads = evaluate("naive")
    for backend in backends:
        value, grads = evaluate(backend)
        scale = expected.abs().max().clamp_min(1.0)
        error = (value - expected).abs().max() / scale
        assert error <= tolerance, f"{name} [{backend}]: forward error {error:.2e} > {tolerance:.0e}"
        for index, (grad, reference) in enumerate(zip(grads, expected_grads)):
            assert (grad is None) == (reference is None), f"{name} [{backend}]: gradient {index} is None on one side"
            if grad is None:
                continue
            error = (grad - reference).abs().max() / reference.abs().max().clamp_min(1e-12)
            assert error <= tolerance, f"{name} [{backend}]: gradient {index} error {error:.2e} > {tolerance:.0e}"
    print(f"  {name}: {', '.join(backends)} match naive")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-capability", help="the CPU kernels that must be loaded (default, avx2, avx512)")
    parser.add_argument("--expect-fallback", action="store_true", help="expect no native kernels (pure Python)")
    parser.add_argument("--allow-source-tree", action="store_true", help="accept an editable install (development)")
    args = parser.parse_args()
    start = time.time()
    import torch

    import fastcl
    from fastcl.ops.cml import naive as cml_naive  # noqa: F401  (the op modules import cleanly)

    here = os.path.dirname(os.path.abspath(fastcl.__file__))
    source_tree = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "fastcl"))
    assert args.allow_source_tree or here != source_tree, f"fastcl imported from the source tree ({here}), not the installed package"
    print(f"fastcl {fastcl.__version__} from {here} (torch {torch.__version__}, import {time.time() - start:.1f} s)")
    info = fastcl.backends()
    for backend in info.values():
        print(f"  {backend}")
    cpu = info["cpu"]
    if args.expect_fallback:
        assert not cpu.available, f"expected no native kernels, got {cpu}"
        assert "without a C++ compiler" in cpu.reason, cpu.reason
    else:
        assert cpu.available, f"native CPU kernels did not load: {cpu.reason}"
    if args.expect_capability:
        from fastcl._native import cpu_capability

        assert cpu_capability() == args.expect_capability, \
            f"expected the {args.expect_capability} kernels, loaded {cpu_capability()}: {cpu.reason}"
    backends = ["torch"] + (["cpu"] if cpu.available else [])
    called = set()
    if cpu.available:  # record which native kernels ran, so a silent fallback cannot pass
        from fastcl._native import NativeFunction

        original = NativeFunction.__call__

        def recording(self, *call_args, **call_kwargs):
            called.add(self.name)
            return original(self, *call_args, **call_kwargs)

        NativeFunction.__call__ = recording

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's one warning
        for dtype, tolerance in ((torch.float32, 2e-4), (torch.float64, 1e-10)):
            print(f"{dtype}:")
            q, k = torch.randn(24, 16, dtype=dtype), torch.randn(30, 16, dtype=dtype)
            raw = 7.0 * q, 7.0 * k  # unnormalized, large logits
            for symmetric in (False, True):
                _compare(f"info_nce normalized symmetric={symmetric}",
                         lambda x, b, s=symmetric: fastcl.info_nce(x[0], x[1], symmetric=s, backend=b, reduction="none"),
                         [q, k], backends, tolerance)
                _compare(f"info_nce raw dot symmetric={symmetric}",
                         lambda x, b, s=symmetric: fastcl.info_nce(x[0], x[1], normalize=False, temperature=0.5,
                                                                   symmetric=s, backend=b, reduction="none"),
                         list(raw), backends, tolerance)
            image, text = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k[:24], dim=-1)
            scale, bias = torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype)
            _compare("siglip_loss", lambda x, b: fastcl.siglip_loss(x[0], x[1], x[2], x[3], backend=b).reshape(1),
                     [image, text, scale, bias], backends, tolerance)
            users, positives = torch.randn(12, 8, dtype=dtype), torch.randn(12, 8, dtype=dtype)
            windows = torch.randn(12, 5, 8, dtype=dtype)
            _compare("cml_loss", lambda x, b: fastcl.cml_loss(x[0], x[1], x[2], num_items=50, backend=b,
                                                              reduction="none"),
                     [users, positives, windows], backends, tolerance)
            items = torch.randn(3, 6, 8, dtype=dtype)
            clicks = torch.randint(0, 3, (3, 6))
            _compare("collaborative_contrastive_loss",
                     lambda x, b: fastcl.collaborative_contrastive_loss(x[0], x[1], backend=b, reduction="none"),
                     [items, clicks], backends, tolerance)
            images = torch.randn(2, 3, 20, 24, dtype=dtype)
            index = torch.tensor([[0, 7, 11], [1, 2, 9]])
            _compare("gather_patches", lambda x, b: fastcl.gather_patches(x[0], x[1], 8, (30, 36), backend=b)[0],
                     [images, index], backends, tolerance)
        print("torch.float32:")
        pooling = fastcl.LatentAttentionPooling(32, num_latents=8, num_heads=4)
        hidden, mask = torch.randn(2, 7, 32), torch.ones(2, 7, dtype=torch.bool)
        mask[1, 5:] = False
        params = [hidden] + [p.detach() for p in pooling.parameters()]
        names = [n for n, _ in pooling.named_parameters()]

        _compare("latent_attention_pool",
                 lambda x, b: _with_backend(pooling, b, dict(zip(names, x[1:])), x[0], mask), params, backends, 2e-4)
    if cpu.available:
        families = ("info_nce_rows", "info_nce_symmetric", "siglip_rows", "cml_scan", "collaborative_pages",
                    "gather_patches_forward", "gather_patches_backward", "latent_softmax", "latent_geglu")
        missing = [family for family in families if not any(name.startswith(family) for name in called)]
        assert not missing, f"these native kernels never ran on backend='cpu': {missing}"
        print(f"  {len(called)} native kernels ran")
    print(f"smoke test passed in {time.time() - start:.1f} s")
    return 0


def _with_backend(module, backend, state, hidden, mask):
    import torch

    previous = module.backend
    module.backend = backend
    try:
        return torch.func.functional_call(module, state, (hidden, mask), {})
    finally:
        module.backend = previous


if __name__ == "__main__":
    sys.exit(main())
