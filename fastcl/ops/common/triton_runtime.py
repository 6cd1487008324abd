"""What every fastcl Triton kernel shares: tile selection (:class:`TileKernel`: pinned
configurations checked against each kernel's on-chip budget, or timed candidates cached per key,
in a file and across ranks), the device guard of every launch, device-resident scalars, the
interpreter switches, and the small similarity helpers.

Imported lazily (only when a Triton backend runs), so ``import fastcl`` never imports triton.

``FASTCL_TRITON_CONFIG`` pins tiles (one ``BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages`` for
every kernel, or ``forward=...;rows=...;columns=...``); under ``TRITON_INTERPRET=1`` a small tile
is used unless the variable says otherwise (the interpreter would "benchmark" every candidate).
``FASTCL_TUNE_ROWS`` caps the size tuning runs at, ``FASTCL_TUNE_CACHE`` names the file of
tuned choices (see :class:`TileKernel`).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable, List, Optional

import torch
import triton
import triton.language as tl

from ..._native import triton_interpreting

CONFIG_ENV = "FASTCL_TRITON_CONFIG"
INTERPRETER_CONFIG = (32, 32, 32, 4, 1)

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages). Forward tiles keep one fp32 BLOCK_M x
# BLOCK_N similarity block live. ptxas (sm_90, bf16, CLIP flags): no spills for the 2nd and 3rd,
# under 300 bytes for the others; 4-warp variants spilled 700-900 bytes and were dropped.
FORWARD_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 8, 3),
]
# Backward kernels: (BLOCK_M, BLOCK_N, BLOCK_D, ACC_D, num_warps, num_stages). The rows kernel
# keeps a BLOCK_M x ACC_D fp32 gradient accumulator on chip, the columns kernel a BLOCK_N x
# ACC_D one, for the embedding slice [g * ACC_D, (g + 1) * ACC_D) of program group g; each
# slice recomputes the similarity tiles, so ACC_D >= D (one slice) costs the least arithmetic
# but the most registers. The lists mix both ends; ptxas reports (sm_90, bf16) no or small
# spills for each, and the autotuner picks on the device. ACC_D is clamped to D's power of two.
# The last entry of each list is small enough for float32 inputs on an A100 (40 KB of shared
# memory); the others need up to 192 KB in float32 (the autotuner skips what does not fit).
BACKWARD_ROWS_CONFIGS = [
    (64, 64, 64, 256, 8, 2),
    (64, 64, 64, 256, 8, 3),
    (32, 64, 64, 512, 8, 2),
    (64, 128, 64, 256, 16, 2),
    (32, 64, 32, 128, 4, 2),
]
BACKWARD_COLUMNS_CONFIGS = [
    (64, 64, 64, 256, 8, 2),
    (64, 64, 64, 256, 8, 3),
    (64, 32, 64, 512, 8, 2),
    (128, 64, 64, 256, 16, 2),
    (64, 32, 32, 128, 4, 2),
]
ACC_D_MAX = 512
# In the interpreter a small slice, so the tests' D (24, 40) cover one slice and several.
INTERPRETER_ACC_D = 32

# On-chip budget a pinned or candidate tile must fit. Registers: the fp32 values each thread keeps
# live across the main loop (the backward's BLOCK x ACC_D gradient accumulator plus the BLOCK_M x
# BLOCK_N similarity tile; the forward's tile), at most 128 of a thread's 255 registers (the
# shipped lists stay at or below 80). Shared memory: the pipelined operand tiles
# (num_stages x (BLOCK_M + BLOCK_N) x BLOCK_D) plus, in the backward, the gradient product's
# operands (BLOCK x ACC_D and the BLOCK_M x BLOCK_N tile), against each architecture's opt-in
# limit per block.
REGISTER_VALUES_LIMIT = 128
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
KINDS = ("forward", "rows", "columns")


def tile_budget(kind: str, tile: dict, num_warps: int, num_stages: int, element_bytes: int):
    """(fp32 values per thread kept on chip, estimated shared-memory bytes) of a tile configuration."""
    m, n, d = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_D"]
    threads = 32 * num_warps
    values = m * n
    shared = num_stages * (m + n) * d * element_bytes
    if kind != "forward":
        owned = m if kind == "rows" else n
        values += owned * tile["ACC_D"]
        shared += (owned * tile["ACC_D"] + m * n) * element_bytes
    return values // threads, shared


def check_tile(kind: str, tile: dict, num_warps: int, num_stages: int, element_bytes: int, arch: Optional[int],
               source: str = CONFIG_ENV) -> None:
    """ValueError naming ``source`` when a tile configuration cannot fit ``kind``'s kernel on ``arch``."""
    values, shared = tile_budget(kind, tile, num_warps, num_stages, element_bytes)
    spelled = ", ".join(f"{k}={v}" for k, v in tile.items()) + f", num_warps={num_warps}, num_stages={num_stages}"
    if values > REGISTER_VALUES_LIMIT:
        raise ValueError(
            f"{source}: the {kind} kernel's tile ({spelled}) keeps {values} fp32 values per thread on chip "
            f"(limit {REGISTER_VALUES_LIMIT}: it would spill or fail to compile); use smaller blocks, ACC_D or more warps")
    limit = SHARED_MEMORY_LIMIT.get(arch) if arch is not None else None
    if limit is not None and shared > limit:
        raise ValueError(
            f"{source}: the {kind} kernel's tile ({spelled}) needs about {shared} bytes of shared memory, "
            f"over sm_{arch}'s {limit}; use smaller blocks or fewer stages")


def parse_pinned(text: str) -> dict:
    """FASTCL_TRITON_CONFIG: either one 'BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages' for every
    kernel (the backward kernels then take the widest ACC_D that fits), or per kernel
    'forward=M,N,D,W,S;rows=M,N,D,ACC_D,W,S;columns=M,N,D,ACC_D,W,S' (kernels left out autotune)."""
    if "=" not in text:
        return {kind: parse_config(text) for kind in KINDS}
    pinned = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, _, values = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise ValueError(f"{CONFIG_ENV}: unknown kernel {kind!r} in {text!r}; expected one of {KINDS}")
        pinned[kind] = parse_config(values, with_width=kind != "forward")
    return pinned


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def _width_limit(dim: int) -> int:
    return max(16, min(_next_power_of_2(dim), ACC_D_MAX))


def tile_candidates(kind: str, dim: int, dtype: torch.dtype, arch: Optional[int]) -> List[triton.Config]:
    """The tile configurations the tuner considers for ``kind`` ("forward", "rows", "columns") at
    embedding size ``dim``: the pinned one (checked against the budget), the interpreter's, or the
    autotuning list with ACC_D clamped to D's power of two and what cannot fit dropped."""
    element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    pinned = os.environ.get(CONFIG_ENV)
    pinned = parse_pinned(pinned).get(kind) if pinned else None
    if pinned is not None:
        if kind == "forward":
            m, n, d, warps, stages = pinned[:3] + pinned[-2:]
            tile = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}
        elif len(pinned) == 6:
            m, n, d, width, warps, stages = pinned
            tile = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d, "ACC_D": min(width, _width_limit(dim))}
        else:  # one configuration for every kernel: the widest slice that fits this kernel
            m, n, d, warps, stages = pinned
            width = _width_limit(dim)
            tile = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d, "ACC_D": width}
            while width > 16:
                try:
                    check_tile(kind, tile, warps, stages, element, arch)
                    break
                except ValueError:
                    width //= 2
                    tile["ACC_D"] = width
        check_tile(kind, tile, warps, stages, element, arch)
        return [triton.Config(tile, num_warps=warps, num_stages=stages)]
    if interpreting():
        m, n, d, warps, stages = INTERPRETER_CONFIG
        tile = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}
        if kind != "forward":
            tile["ACC_D"] = min(INTERPRETER_ACC_D, _width_limit(dim))
        return [triton.Config(tile, num_warps=warps, num_stages=stages)]
    listing = {"forward": FORWARD_CONFIGS, "rows": BACKWARD_ROWS_CONFIGS, "columns": BACKWARD_COLUMNS_CONFIGS}[kind]
    kept, seen = [], set()
    for entry in listing:
        if kind == "forward":
            (m, n, d, warps, stages), tile = entry, None
            tile = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d}
        else:
            m, n, d, width, warps, stages = entry
            tile = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": d, "ACC_D": min(width, _width_limit(dim))}
        signature = (tuple(sorted(tile.items())), warps, stages)
        if signature in seen:
            continue
        try:
            check_tile(kind, tile, warps, stages, element, arch, source="autotuning list")
        except ValueError:
            continue
        seen.add(signature)
        kept.append(triton.Config(tile, num_warps=warps, num_stages=stages))
    return kept or [triton.Config(dict(tile), num_warps=warps, num_stages=stages)]


def accumulator_width(dim: int) -> int:
    """The embedding slice a backward program accumulates in the interpreter / with the pinned default."""
    limit = INTERPRETER_ACC_D if interpreting() else ACC_D_MAX
    return max(16, min(triton.next_power_of_2(dim), limit))


interpreting = triton_interpreting


def _triton_version():
    return tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2])


def _fix_interpreter_scalar_index() -> None:
    """Let triton < 3.7's interpreter use scalar kernel arguments as loop bounds with numpy >= 2.4.

    That interpreter turns a scalar argument into a Python int with ``int(array([x]))``, which
    numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every
    ``range(0, n, BLOCK)`` over a runtime size fails (triton-lang/triton#9171). Triton 3.7.1 and
    later squeeze the array first; this applies the same one-line change to the older interpreter.
    """
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_fastcl_squeezes", False):
        return

    def patch_tensor_squeezing(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_tensor_squeezing._fastcl_squeezes = True
    interpreter._patch_lang_tensor = patch_tensor_squeezing


if interpreting() and _triton_version() < (3, 7):
    _fix_interpreter_scalar_index()


def parse_config(text: str, with_width: bool = False):
    """'BLOCK_M,BLOCK_N,BLOCK_D[,ACC_D],num_warps,num_stages' as a tuple of ints (checked)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    blocks = 4 if with_width else 3
    if (len(values) != blocks + 2 or any(v <= 0 for v in values)
            or any(v < 16 or v & (v - 1) for v in values[:blocks])):
        spelled = "BLOCK_M,BLOCK_N,BLOCK_D" + (",ACC_D" if with_width else "") + ",num_warps,num_stages"
        raise ValueError(f"{CONFIG_ENV} must be '{spelled}' with block sizes powers of two >= 16, got {text!r}")
    return values


def dot_settings(tensor: torch.Tensor):
    """(CAST_DOT, DOT_PRECISION) for kernels reading ``tensor``.

    CAST_DOT: the interpreter's ``tl.dot`` returns garbage for bfloat16 operands (loads are
    fine), so on CPU tensors operands are widened to float32 before each product. On the GPU
    the product stays on the tensor cores in the input dtype. DOT_PRECISION follows torch's own
    switch for float32 matrix products (TF32 only when the user allowed it); the interpreter
    always multiplies exactly.
    """
    cast = tensor.device.type == "cpu"
    if cast or (tensor.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return cast, "ieee"
    # fp16 / bf16 operands: "tf32" is Triton's default on NVIDIA and only affects fp32 operands
    return cast, "tf32"


@triton.jit
def tile_similarity(anchor_ptr, candidate_ptr, rows, cols, row_valid, col_valid, dim,
                    CAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) block of anchor_rows . candidate_cols over any dim (masked tail)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_valid = d < dim
        a = tl.load(anchor_ptr + rows[:, None] * dim + d[None, :], mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        # the candidate block is loaded transposed (BLOCK_D, BLOCK_N), ready for the product
        c = tl.load(candidate_ptr + cols[None, :] * dim + d[:, None], mask=col_valid[None, :] & d_valid[:, None], other=0.0)
        if CAST_DOT:
            a = a.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(a, c, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def dot_operand(x, element, CAST_DOT: tl.constexpr):
    """``x`` rounded to the input dtype for a tensor-core product (widened back to fp32 under
    the interpreter, whose bfloat16 products are wrong)."""
    x = x.to(element)
    if CAST_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def load_operand(ptr, index, index_valid, columns, columns_valid, dim, scale, element, SCALE: tl.constexpr,
                 CAST_DOT: tl.constexpr):
    """Rows ``index``, columns ``columns`` of a row-major (*, dim) matrix as a product operand;
    each row times ``scale`` (fp32) when SCALE."""
    x = tl.load(ptr + index[:, None] * dim + columns[None, :], mask=index_valid[:, None] & columns_valid[None, :],
                other=0.0)
    if SCALE:
        x = x.to(tl.float32) * scale[:, None]
    return dot_operand(x, element, CAST_DOT)


def device_guard(device):
    """The context every Triton launch runs in: the tensors' GPU made current (Triton launches
    on the current device, so tensors on cuda:1 under a current cuda:0 would fault); nothing
    for CPU tensors (the interpreter)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def device_scalars(device, *values: torch.Tensor) -> torch.Tensor:
    """(n,) fp32 on ``device`` holding scalar tensors for a kernel to read: CPU ones (Python
    floats) are read on the host, device ones are copied on the device, so no host sync."""
    out = torch.empty(len(values), dtype=torch.float32, device=device)
    for slot, value in enumerate(values):
        value = value.detach().reshape(())
        if value.device.type == "cpu":
            out[slot].fill_(float(value))
        else:
            out[slot].copy_(value)
    return out


@triton.jit
def log1p_small(t):
    """log(1 + t) for t in [0, 1] to a few ulps without a log1p instruction: where 1 + t rounds
    to 1 it is t, else log(u) * t / (u - 1) with u = 1 + t (the rounding of u cancels)."""
    u = 1.0 + t
    ratio = tl.where(u == 1.0, 1.0, t / (u - 1.0))
    return tl.where(u == 1.0, t, tl.log(u) * ratio)


@triton.jit
def softplus(x):
    """log(1 + exp(x)) without overflow, tail kept: softplus(-20) = 2.06e-9 (not 0, which
    log(1 + exp(-20)) gives in fp32 past |x| > 16.6); softplus(-inf) = 0."""
    return tl.maximum(x, 0.0) + log1p_small(tl.exp(-tl.abs(x)))


# --------------------------------------------------------------------------------------------
# Tile selection: a configuration per kernel and key, chosen once, shared across processes and ranks

TUNE_ROWS_ENV = "FASTCL_TUNE_ROWS"
TUNE_CACHE_ENV = "FASTCL_TUNE_CACHE"
DEFAULT_TUNE_ROWS = 16384
# size arguments capped while tuning (the kernels' loops are over rows / candidates only)
SIZE_ARGUMENTS = ("num_rows", "num_candidates", "num_column_anchors", "batch")


def tune_rows() -> int:
    return int(os.environ.get(TUNE_ROWS_ENV, DEFAULT_TUNE_ROWS))


def tune_cache_path() -> str:
    return os.environ.get(TUNE_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fastcl",
                                                          "triton_tiles.json")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"


def _arch(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _tuning_enabled(device: torch.device) -> bool:
    """Time the candidates: on a GPU, unless a configuration is pinned (the interpreter has one)."""
    return device.type == "cuda" and not interpreting()


def _benchmark(launch: Callable[[], None]) -> float:
    """Milliseconds per launch (the median of Triton's timing loop)."""
    from triton.testing import do_bench

    return float(do_bench(launch, warmup=5, rep=25))


def _read_cache(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, key: str, choice: list) -> None:
    """Merge one choice into the file (write to a temporary name, then rename: never a torn file)."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        entries = _read_cache(path)
        entries[key] = choice
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".triton_tiles.")
        with os.fdopen(handle, "w") as out:
            json.dump(entries, out, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError:  # a read-only home must not break training
        pass


def _distributed_world():
    """(rank, world size) when torch.distributed runs with more than one rank, else None."""
    if os.environ.get("FASTCL_TUNE_BROADCAST", "1") == "0":
        return None
    distributed = getattr(torch, "distributed", None)
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return None
    world = distributed.get_world_size()
    return (distributed.get_rank(), world) if world > 1 else None


def _as_config(choice) -> triton.Config:
    tile, warps, stages = choice
    return triton.Config(dict(tile), num_warps=warps, num_stages=stages)


def _as_choice(config: triton.Config) -> list:
    return [dict(config.kwargs), config.num_warps, config.num_stages]


class TileKernel:
    """A ``@triton.jit`` kernel launched as ``kernel[grid](*args, **constexprs)`` with a tile
    configuration (BLOCK_M, BLOCK_N, BLOCK_D[, ACC_D], num_warps, num_stages) chosen once per key.

    The key holds every constexpr of the call (so a configuration tuned for one option set never
    serves another), the input dtype, D, the GPU's name and the triton version. On a first call
    the candidates of :func:`tile_candidates` are timed on a capped representative size
    (``FASTCL_TUNE_ROWS`` rows and candidates, default 16384: tuning at B = 1M costs what it
    costs at 16384); the choice is kept in memory and in a file (``FASTCL_TUNE_CACHE``, default
    ~/.cache/fastcl/triton_tiles.json), so later processes skip tuning. Under torch.distributed
    rank 0 decides (its file, or its timing) and broadcasts the choice, so every rank runs the
    same configuration and computes the same numerics (``FASTCL_TUNE_BROADCAST=0`` turns that off).
    """

    def __init__(self, fn, kind: str, grid_size: str, grid_block: str, reset=()):
        self.fn = fn
        self.kind = kind
        self.grid_size = grid_size
        self.grid_block = grid_block
        self.reset = tuple(reset)
        self.chosen = {}
        self.last_config = None

    @property
    def arg_names(self):
        return self.fn.arg_names

    def key(self, named: dict, constexprs: dict, device: torch.device, dtype: torch.dtype) -> str:
        flags = ",".join(f"{name}={constexprs[name]}" for name in sorted(constexprs))
        return (f"{_device_name(device)}|triton {triton.__version__}|{self.fn.__name__}|{dtype}|dim={named['dim']}"
                f"|{flags}|tune_rows={tune_rows()}")

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            named = dict(zip(self.fn.arg_names, args))
            data = next(value for value in args if isinstance(value, torch.Tensor))
            config = self.choose(grid, args, named, constexprs, data.device, data.dtype)
            self.last_config = config
            self._run(grid, args, constexprs, config)

        return launch

    def _run(self, grid, args, constexprs, config, resolved_grid=None):
        meta = dict(constexprs, **config.kwargs)
        shape = resolved_grid or (grid(meta) if callable(grid) else grid)
        self.fn[shape](*args, **constexprs, **config.kwargs, num_warps=config.num_warps,
                       num_stages=config.num_stages)

    def choose(self, grid, args, named, constexprs, device, dtype) -> triton.Config:
        candidates = tile_candidates(self.kind, named["dim"], dtype, _arch(device))
        if len(candidates) == 1 or not _tuning_enabled(device):
            return candidates[0]
        key = self.key(named, constexprs, device, dtype)
        if key in self.chosen:
            return self.chosen[key]
        world = _distributed_world()
        choice = None
        if world is None or world[0] == 0:
            choice = _read_cache(tune_cache_path()).get(key)
            if choice is None or _as_choice(_as_config(choice)) not in [_as_choice(c) for c in candidates]:
                choice = _as_choice(self.tune(grid, args, named, constexprs, candidates))
                _write_cache(tune_cache_path(), key, choice)
        if world is not None:
            box = [choice]
            torch.distributed.broadcast_object_list(box, src=0)
            choice = box[0]
        config = _as_config(choice)
        self.chosen[key] = config
        return config

    def tune(self, grid, args, named, constexprs, candidates) -> triton.Config:
        """Time each candidate on the first ``tune_rows()`` rows / candidates (the same pointers,
        the size arguments capped); outputs written meanwhile are rewritten by the real launch,
        those accumulated into (``reset``) are zeroed."""
        cap = tune_rows()
        capped = list(args)
        for index, name in enumerate(self.fn.arg_names[:len(args)]):
            if name in SIZE_ARGUMENTS:
                capped[index] = min(int(args[index]), cap)
        size = min(int(named[self.grid_size]), cap)
        resets = [named[name] for name in self.reset if isinstance(named.get(name), torch.Tensor)]
        timings = []
        for config in candidates:
            meta = dict(constexprs, **config.kwargs)
            full = grid(meta) if callable(grid) else grid
            full = full if isinstance(full, tuple) else (full,)
            shape = (triton.cdiv(size, config.kwargs[self.grid_block]),) + tuple(full[1:])

            def launch(config=config, shape=shape):
                self._run(grid, capped, constexprs, config, resolved_grid=shape)

            try:
                timings.append((_benchmark(launch), len(timings), config))
            except Exception as error:  # out of resources on this GPU: not a candidate
                if "OutOfResources" not in type(error).__name__ and "out of resource" not in str(error):
                    raise
            for tensor in resets:
                tensor.zero_()
        if not timings:
            raise RuntimeError(f"no tile configuration of {self.fn.__name__} fits this GPU")
        return min(timings, key=lambda entry: entry[:2])[2]


def tile_kernel(kind: str, grid_size: str, grid_block: str, reset=()):
    """Decorator: ``@tile_kernel(...)`` over ``@triton.jit`` makes a :class:`TileKernel`."""
    def wrap(fn):
        return TileKernel(fn, kind, grid_size, grid_block, reset)

    return wrap
