"""The native loader (fastcl/_native.py): CPU variants, the C ABI binding, OpenMP, CUDA checks."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastcl import _native

module = _native.native_module()
needs_native = pytest.mark.skipif(module is None, reason="native kernels not built")


def _run(script: str, **env) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_native
def test_every_cpu_variant_exports_the_same_kernels():
    names = None
    for capability in module.cpu_capabilities:
        library = _native.NativeLibrary(_native._library_path(capability))
        assert library.capability == capability
        signature = {name: function.arguments for name, function in library.functions.items()}
        assert signature, capability
        if names is None:
            names = signature
        assert signature == names, f"{capability} exports other kernels than {module.cpu_capabilities[0]}"


@needs_native
@pytest.mark.parametrize("capability", _native.CPU_CAPABILITIES)
def test_fastcl_cpu_capability_caps_the_choice(capability):
    if module.cpu_capability == "native":
        pytest.skip("a FASTCL_NATIVE_ARCH build has one variant")
    out = _run("""
        import fastcl
        from fastcl._native import native_module
        print(native_module().cpu_capability, fastcl.backends()["cpu"].reason)
        """, FASTCL_CPU_CAPABILITY=capability)
    chosen, reason = out.split(" ", 1)
    supported = [c for c in module.cpu_supported if _native.CPU_CAPABILITIES.index(c)
                 <= _native.CPU_CAPABILITIES.index(capability)]
    assert chosen == supported[-1]
    assert f"FASTCL_CPU_CAPABILITY={capability}" in reason


@needs_native
def test_unknown_capability_is_named_and_ignored():
    out = _run("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastcl
        from fastcl._native import native_module
        print(native_module().cpu_capability)
        print([str(w.message) for w in caught if "FASTCL_CPU_CAPABILITY" in str(w.message)])
        """, FASTCL_CPU_CAPABILITY="sse9")
    chosen, messages = out.strip().splitlines()
    assert chosen == module.cpu_capability
    assert "'sse9' ignored: expected one of default, avx2, avx512" in messages


@needs_native
def test_kernel_arguments_bind_by_name_and_errors_are_exceptions():
    kernel = module.info_nce_symmetric_statistics_f32
    assert kernel.arguments[:3] == ("similarity", "ld", "rows")
    with pytest.raises(TypeError, match="missing arguments: num_threads"):
        kernel(*([0] * 12))
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        kernel(*([0] * 13), bogus=1)
    with pytest.raises(TypeError, match="multiple values for argument 'similarity'"):
        kernel(*([0] * 13), similarity=0)
    # a C++ std::invalid_argument reaches Python as ValueError, with the kernel's message
    with pytest.raises(ValueError, match="tracked > cols"):
        kernel(similarity=0, ld=0, rows=0, cols=0, row0=0, tracked=5, inv_temperature=1.0, row_max_out=0,
               row_sum_out=0, diagonal_out=0, column_max=0, column_sum=0, num_threads=1)


@needs_native
def test_one_openmp_runtime_in_the_process():
    # the kernels bind to the runtime torch loaded: no second libgomp / libomp appears
    out = _run("""
        import torch, fastcl
        q = torch.randn(512, 32)
        fastcl.info_nce(q, q.clone(), backend="cpu")
        runtimes = set()
        for line in open("/proc/self/maps"):
            path = line.split()[-1]
            name = path.rsplit("/", 1)[-1]
            if name.startswith(("libgomp", "libiomp5", "libomp")):
                runtimes.add(path)
        print(len(runtimes), sorted(runtimes))
        """)
    if not module.with_openmp:
        pytest.skip("built without OpenMP")
    assert out.startswith("1 "), out


def test_cuda_device_check_against_the_built_architectures(monkeypatch):
    class Fake:
        with_cuda = True
        cuda_architectures = "75-real 80-real 86-real 89-real 90-real 75-virtual"

    monkeypatch.setattr(_native, "_C", Fake())
    assert _native.cuda_architectures() == ([75, 80, 86, 89, 90], [75])
    for capability, expected in [((7, 5), True), ((8, 7), True), ((12, 0), True), ((7, 0), False), ((6, 1), False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        supported, detail = _native.cuda_device_supported()
        assert supported == expected, (capability, detail)
        if not supported:
            assert "built for sm_75 sm_80 sm_86 sm_89 sm_90 compute_75" in detail
    Fake.cuda_architectures = "90-real"  # cubins only: no PTX to JIT for a newer major version
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert not _native.cuda_device_supported()[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _native.cuda_device_supported()[0]
