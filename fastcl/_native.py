"""Loading of fastcl's native kernels and the list of available backends.

The kernels are plain shared libraries with a C ABI (``csrc/exports.cpp``), bound here with
ctypes, so one build serves every Python and torch version and ctypes releases the GIL around
each call. The CPU kernels come once per instruction set, as PyTorch builds ATen's
(``ATEN_CPU_CAPABILITY``), and the best one this CPU runs is loaded:

==========  ===================================================  ==============================
capability  instructions                                         CPUs
==========  ===================================================  ==============================
default     the x86-64 baseline (SSE2) / the aarch64 baseline      any
avx2        AVX2, FMA, BMI1/2, F16C, POPCNT (x86-64-v3)          Haswell, Zen and later
avx512      that plus AVX-512 F/BW/CD/DQ/VL (x86-64-v4)          Skylake-X, Ice Lake, Zen 4
native      ``-march=native`` (``FASTCL_NATIVE_ARCH=ON`` builds)   the build machine only
==========  ===================================================  ==============================

``FASTCL_CPU_CAPABILITY=default|avx2|avx512`` caps the choice (to compare variants, or to work
around a CPU that misreports its features). :func:`fastcl.backends` names what was loaded.

The libraries link no OpenMP runtime: before loading them, the runtime torch already uses is
made global, so the process runs one OpenMP runtime, torch's.

Importing fastcl never fails because of the native code: if no library is there (an install
without a compiler, see the README) or one does not load, the reason is recorded,
:func:`fastcl.backends` reports it, and ops fall back to the PyTorch path with a single warning.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

CPU_CAPABILITIES = ("default", "avx2", "avx512")  # lowest first
CAPABILITY_ENV = "FASTCL_CPU_CAPABILITY"
_CAPABILITY_NAMES = {"default": "baseline", "avx2": "AVX2/FMA, x86-64-v3", "avx512": "AVX-512, x86-64-v4",
                     "native": "-march=native build"}
_ABI_VERSION = 1
_CTYPES = {"p": ctypes.c_size_t, "q": ctypes.c_int64, "i": ctypes.c_int, "d": ctypes.c_double, "b": ctypes.c_bool}


class _ExportedFunction(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("arguments", ctypes.c_char_p), ("types", ctypes.c_char_p),
                ("doc", ctypes.c_char_p), ("address", ctypes.c_void_p)]


class NativeFunction:
    """One exported kernel, callable with positional or keyword arguments like a Python function.

    A C++ exception inside the kernel becomes ``ValueError`` (``std::invalid_argument``) or
    ``RuntimeError``, with the kernel's name and message."""

    def __init__(self, library: "NativeLibrary", entry: _ExportedFunction):
        self.name = entry.name.decode()
        self.arguments: Tuple[str, ...] = tuple(entry.arguments.decode().split())
        types = entry.types.decode()
        if len(types) != len(self.arguments):
            raise RuntimeError(f"{self.name}: {len(self.arguments)} argument names for {len(types)} arguments")
        prototype = ctypes.CFUNCTYPE(ctypes.c_int, *(_CTYPES[code] for code in types))
        self._function = prototype(entry.address)
        self._library = library
        self.__doc__ = entry.doc.decode()
        self._positions = {name: index for index, name in enumerate(self.arguments)}

    def _bind(self, args: tuple, kwargs: dict) -> list:
        values = list(args) + [None] * (len(self.arguments) - len(args))
        if len(args) > len(self.arguments):
            raise TypeError(f"{self.name}() takes {len(self.arguments)} arguments, got {len(args)}")
        for key, value in kwargs.items():
            position = self._positions.get(key)
            if position is None:
                raise TypeError(f"{self.name}() got an unexpected keyword argument {key!r}")
            if position < len(args):
                raise TypeError(f"{self.name}() got multiple values for argument {key!r}")
            values[position] = value
        missing = [name for name, value in zip(self.arguments, values) if value is None]
        if missing:
            raise TypeError(f"{self.name}() missing arguments: {', '.join(missing)}")
        return values

    def __call__(self, *args, **kwargs) -> None:
        if kwargs or len(args) != len(self.arguments):
            args = self._bind(args, kwargs)
        status = self._function(*args)
        if status:
            error = ValueError if status == 2 else RuntimeError
            raise error(f"{self.name}: {self._library.last_error()}")

    def __repr__(self) -> str:
        return f"<native {self.name}({', '.join(self.arguments)})>"


class NativeLibrary:
    """A loaded fastcl library: its build facts and its kernels by name."""

    def __init__(self, path: str):
        self.path = path
        self._dll = ctypes.CDLL(path)
        dll = self._dll
        dll.fastcl_abi_version.restype = ctypes.c_int
        if dll.fastcl_abi_version() != _ABI_VERSION:
            raise RuntimeError(f"{os.path.basename(path)} has native ABI {dll.fastcl_abi_version()}, this fastcl "
                               f"expects {_ABI_VERSION}: rebuild it (pip install --force-reinstall fastcl)")
        for name in ("fastcl_last_error", "fastcl_capability", "fastcl_cuda_architectures"):
            getattr(dll, name).restype = ctypes.c_char_p
        dll.fastcl_function_count.restype = ctypes.c_int64
        dll.fastcl_function.restype = ctypes.POINTER(_ExportedFunction)
        dll.fastcl_function.argtypes = [ctypes.c_int64]
        dll.fastcl_cpu_supports.restype = ctypes.c_int
        dll.fastcl_cpu_supports.argtypes = [ctypes.c_char_p]
        self.capability = dll.fastcl_capability().decode()
        self.with_openmp = bool(dll.fastcl_with_openmp())
        self.with_cuda = bool(dll.fastcl_with_cuda())
        self.cuda_architectures = dll.fastcl_cuda_architectures().decode()
        self.functions: Dict[str, NativeFunction] = {}
        for index in range(dll.fastcl_function_count()):
            function = NativeFunction(self, dll.fastcl_function(index).contents)
            self.functions[function.name] = function

    def last_error(self) -> str:
        return self._dll.fastcl_last_error().decode(errors="replace")

    def cpu_supports(self, capability: str) -> bool:
        return bool(self._dll.fastcl_cpu_supports(capability.encode()))


class NativeModule:
    """Every loaded kernel as an attribute (``module.info_nce_rows_f32(...)``), with what was
    loaded: ``cpu_capability``, ``cpu_capabilities`` (built), ``cpu_supported`` (built and run
    by this CPU), ``with_openmp``, ``with_cuda``, ``cuda_architectures`` and ``openmp_runtime``."""

    def __init__(self, cpu: NativeLibrary, built: List[str], supported: List[str], openmp_runtime: Optional[str],
                 cuda: Optional[NativeLibrary], cuda_error: Optional[str]):
        self.cpu_capability = cpu.capability
        self.cpu_capabilities = built
        self.cpu_supported = supported
        self.with_openmp = cpu.with_openmp
        self.openmp_runtime = openmp_runtime
        self.with_cuda = cuda is not None
        self.cuda_architectures = cuda.cuda_architectures if cuda is not None else ""
        self.cuda_error = cuda_error
        self.libraries = [library for library in (cpu, cuda) if library is not None]
        for library in self.libraries:
            for name, function in library.functions.items():
                setattr(self, name, function)


def _library_path(name: str) -> Optional[str]:
    """Where ``fastcl/_kernels_<name>.so`` is (the files are named like extension modules, so the
    import system finds them in a regular install, a source tree and an editable install alike)."""
    try:
        spec = importlib.util.find_spec(f"fastcl._kernels_{name}")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    return spec.origin


def _openmp_candidates():
    """(path, dlopen mode) of OpenMP runtimes, most likely first, each looked for only when the
    ones before it did not load: the runtime already in this process (torch's), the one beside
    torch, then the system's (``find_library`` runs ``ldconfig``: only as a last resort)."""
    prefixes = ("libgomp", "libiomp5", "libomp")
    loaded = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(None, 5)[-1].strip() if line.count(" ") >= 5 else ""
                if os.path.basename(path).startswith(prefixes) and path not in loaded:
                    loaded.append(path)
    except OSError:
        pass
    no_load = getattr(os, "RTLD_NOLOAD", 0)
    yield from ((path, no_load) for path in loaded)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for prefix in prefixes:
        yield from ((path, 0) for path in sorted(glob.glob(os.path.join(torch_lib, prefix + "*"))))
    for name in ("gomp", "omp"):
        found = ctypes.util.find_library(name)
        if found:
            yield found, 0


def _openmp_runtime() -> Optional[str]:
    """Make the OpenMP runtime torch uses global, so the kernels' GOMP_* / omp_* symbols bind to
    it; return its path (None: no runtime found, and the libraries will not load)."""
    for path, mode in _openmp_candidates():
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL | mode)
            return path
        except OSError:
            continue
    return None


def _requested_capability() -> Tuple[Optional[str], Optional[str]]:
    """(cap, problem): the highest capability FASTCL_CPU_CAPABILITY allows (None: no cap)."""
    value = os.environ.get(CAPABILITY_ENV, "").strip().lower()
    if not value:
        return None, None
    if value not in CPU_CAPABILITIES:
        return None, (f"{CAPABILITY_ENV}={value!r} ignored: expected one of {', '.join(CPU_CAPABILITIES)}")
    return value, None


def _load() -> Tuple[Optional[NativeModule], Optional[str], List[str]]:
    """(module, why it did not load, notes)."""
    notes: List[str] = []
    paths = {name: _library_path(name) for name in (*CPU_CAPABILITIES, "native", "cuda")}
    native_path = paths["native"]
    built = [name for name in CPU_CAPABILITIES if paths[name]]
    if native_path is None and not built:
        return None, ("no native libraries in this install (fastcl/_kernels_*.so): it was installed without a "
                      "C++ compiler; see the README to rebuild"), notes
    openmp = _openmp_runtime()
    try:
        if native_path is not None:
            cpu = NativeLibrary(native_path)
            built = supported = ["native"]
        else:
            default = NativeLibrary(paths["default"]) if "default" in built else None
            if default is None:
                return None, "fastcl/_kernels_default.so is missing from this install", notes
            supported = [name for name in built if name == "default" or default.cpu_supports(name)]
            cap, problem = _requested_capability()
            if problem:
                notes.append(problem)
                warnings.warn(f"fastcl: {problem}", RuntimeWarning, stacklevel=2)
            allowed = CPU_CAPABILITIES if cap is None else CPU_CAPABILITIES[:CPU_CAPABILITIES.index(cap) + 1]
            cpu = default
            for capability in reversed(allowed):
                if capability == "default":
                    break
                if capability in supported:
                    try:
                        cpu = NativeLibrary(paths[capability])
                        break
                    except OSError as error:
                        notes.append(f"{capability} kernels did not load ({error})")
            if cap is not None:
                notes.append(f"{CAPABILITY_ENV}={cap}")
    except OSError as error:
        hint = "" if openmp else " (no OpenMP runtime found in this process or beside torch)"
        return None, f"OSError: {error}{hint}", notes
    except Exception as error:  # a broken or foreign library: fall back, never break import
        return None, f"{type(error).__name__}: {error}", notes
    cuda, cuda_error = None, None
    if paths["cuda"] is not None:
        try:
            cuda = NativeLibrary(paths["cuda"])
        except Exception as error:
            cuda_error = f"{type(error).__name__}: {error}"
    return NativeModule(cpu, built, supported, openmp, cuda, cuda_error), None, notes


_C, _C_ERROR, _C_NOTES = _load()

_WARNED: set = set()


class Backend(NamedTuple):
    """Whether a backend can run here, and why not when it cannot."""

    name: str
    available: bool
    reason: str

    def __repr__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"Backend({self.name!r}, {state}: {self.reason})"


def native_module() -> Optional[NativeModule]:
    """The loaded native kernels (:class:`NativeModule`), or None."""
    return _C


def cpu_capability() -> Optional[str]:
    """The CPU kernels loaded: ``"default"``, ``"avx2"``, ``"avx512"``, ``"native"``, or None."""
    return _C.cpu_capability if _C is not None else None


def typed_kernel(name: str, dtype: torch.dtype):
    """The native CPU kernel ``<name>_f32`` or ``<name>_f64`` for float32 / float64 data."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"native CPU kernel {name} takes float32/float64 data, got {dtype}")
    return getattr(_C, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _cpu_backend() -> Backend:
    if _C is None:
        return Backend("cpu", False, f"native kernels did not load ({_C_ERROR})")
    if _C.with_openmp:
        runtime = os.path.basename(_C.openmp_runtime) if _C.openmp_runtime else "no runtime found"
        threads = f"OpenMP ({runtime})"
    else:
        threads = "single-threaded (built without OpenMP)"
    capability = _C.cpu_capability
    detail = f"{capability} ({_CAPABILITY_NAMES.get(capability, capability)}; built: {', '.join(_C.cpu_capabilities)})"
    notes = "; ".join(_C_NOTES)
    return Backend("cpu", True, f"native C++ kernels, {detail}, {threads}" + (f"; {notes}" if notes else ""))


# The native CUDA InfoNCE kernels (csrc/cuda/info_nce.cu) run on CUDA cores in fp32 and add
# d(key) with atomics: a portable fallback, seconds per step at B = 65536, not deterministic.
CUDA_INFO_NCE_NOTE = ("InfoNCE's native CUDA kernels are a portable fallback (CUDA cores, fp32, atomics): "
                      "auto never picks them (triton, else the chunked torch path); name backend='cuda' to use them")


def cuda_architectures() -> Tuple[List[int], List[int]]:
    """(cubin architectures, PTX architectures) the CUDA kernels were built for, as 10*major+minor."""
    real, virtual = [], []
    if _C is None or not _C.with_cuda:
        return real, virtual
    for item in _C.cuda_architectures.split():
        number, _, kind = item.partition("-")
        if number.isdigit():
            (virtual if kind == "virtual" else real).append(int(number))
            if not kind:  # "80" alone means both
                virtual.append(int(number))
    return real, virtual


def cuda_device_supported(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """Whether the native CUDA kernels can run on ``device``: a cubin of its major version at or
    below its compute capability, or PTX at or below it (which the driver compiles)."""
    major, minor = torch.cuda.get_device_capability(device)
    capability = 10 * major + minor
    real, virtual = cuda_architectures()
    if any(arch // 10 == major and arch <= capability for arch in real) or any(arch <= capability for arch in virtual):
        return True, f"sm_{capability}"
    built = " ".join(f"sm_{arch}" for arch in real) + "".join(f" compute_{arch}" for arch in virtual)
    return False, f"the GPU is sm_{capability}; the CUDA kernels were built for {built.strip() or 'nothing'}"


def _cuda_backend() -> Backend:
    if _C is None:
        return Backend("cuda", False, f"native kernels did not load ({_C_ERROR})")
    if not _C.with_cuda:
        why = f"fastcl/_kernels_cuda.so did not load ({_C.cuda_error})" if _C.cuda_error else (
            "fastcl was built without CUDA kernels (FASTCL_CUDA=OFF, or AUTO without nvcc or a GPU driver at build time)")
        return Backend("cuda", False, why)
    if not torch.cuda.is_available():
        return Backend("cuda", False, "CUDA kernels are built but torch sees no CUDA device")
    supported, detail = cuda_device_supported()
    if not supported:
        return Backend("cuda", False, detail)
    return Backend("cuda", True, f"native CUDA kernels ({_C.cuda_architectures}); {CUDA_INFO_NCE_NOTE}")


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_status() -> Backend:
    interpret = triton_interpreting()
    if not (torch.cuda.is_available() or interpret):
        return Backend("triton", False, "needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)")
    try:
        import triton  # noqa: F401
    except Exception as error:
        return Backend("triton", False, f"triton does not import ({type(error).__name__}: {error})")
    mode = "interpreter (TRITON_INTERPRET=1)" if interpret else "GPU"
    return Backend("triton", True, f"Triton {triton.__version__} kernels, {mode}")


def backends() -> Dict[str, Backend]:
    """Every backend fastcl knows, whether it is available here, and why (not).

    >>> import fastcl
    >>> fastcl.backends()["cpu"].available  # doctest: +SKIP
    True
    """
    return {
        "naive": Backend("naive", True, "reference: materializes the full logits (tests and baselines)"),
        "torch": Backend("torch", True, "chunked pure-PyTorch path, any device, never materializes B x N"),
        "cpu": _cpu_backend(),
        "triton": triton_status(),
        "cuda": _cuda_backend(),
    }


def requested_backend(backend: str, device: torch.device, what: str = "tensors") -> str:
    """A backend named explicitly (not ``auto``), checked: available here, and ``cpu`` only for
    CPU tensors (``what`` names the tensors in the error). Each op adds its own checks."""
    if backend in ("naive", "torch"):
        return backend
    available = backends()[backend]
    if not available.available:
        raise RuntimeError(f"backend={backend!r} is not available here: {available.reason}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors, got {what} on {device}")
    return backend


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a RuntimeWarning the first time ``key`` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
