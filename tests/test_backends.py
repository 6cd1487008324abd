"""Importing fastcl never fails because of the native module; backends() explains why."""
import subprocess
import sys
import textwrap

import fastcl


def test_backends_lists_every_backend_with_a_reason():
    info = fastcl.backends()
    assert set(info) == {"naive", "torch", "cpu", "triton", "cuda"}
    assert info["naive"].available and info["torch"].available
    for backend in info.values():
        assert backend.reason


def test_missing_native_module_falls_back_with_one_warning():
    # Hide the native libraries in a fresh interpreter (as an install without a compiler has
    # none): import works, "cpu" is unavailable with the reason, "auto" runs the PyTorch path and
    # warns once.
    script = textwrap.dedent(
        """
        import sys, warnings
        for name in ("default", "avx2", "avx512", "native", "cuda"):
            sys.modules["fastcl._kernels_" + name] = None  # find_spec then finds no library
        import torch, fastcl
        from fastcl.ops.info_nce import naive
        info = fastcl.backends()["cpu"]
        assert not info.available and "did not load" in info.reason, info
        q, k = torch.randn(5, 4), torch.randn(5, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = fastcl.info_nce(q, k)
            second = fastcl.info_nce(q, k)
        messages = [str(w.message) for w in caught if "native CPU kernels unavailable" in str(w.message)]
        assert len(messages) == 1, messages
        torch.testing.assert_close(first, naive.info_nce(q, k))
        try:
            fastcl.info_nce(q, k, backend="cpu")
        except RuntimeError as error:
            assert "backend='cpu' is not available here" in str(error)
        else:
            raise AssertionError("explicit backend='cpu' should raise")
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
