"""Negatives across processes: per-rank peak memory and step time against the world size.

CLIP's loss with every rank's images and texts as negatives, at a fixed local batch, on gloo
processes of this machine (``python -m fastcl.bench distributed``; opt-in: it starts up to
``world`` processes per case). Providers:

- ``plain``: what open_clip does (``local_loss=True, gather_with_grad=True``): all-gather the
  features with gradients, materialize the local x global logits both ways, cross-entropy;
- ``gather``: :func:`fastcl.distributed.clip_loss` (the same all-gather, the fused kernels: the
  logits are never materialized; the gathered rows' backward is a reduce-scatter);
- ``ring``: :func:`fastcl.distributed.clip_loss` with ``mode="ring"`` (feature blocks passed
  around the ranks, one local x block tile at a time).

Each rank measures its first step in the fresh process, its median step time and peak RSS over
the timed steps as every suite's case does (:func:`fastcl.bench.harness.measure_in_process`,
``first_call``), and the peak bytes of tensors one step allocates
(:func:`fastcl.bench.harness.tensor_peak_bytes`: the loss's own memory, without gloo's buffers
or the C library's page reuse); the row reports the largest over ranks. Each rank runs
``cores // world`` threads (at least one), so with more ranks than cores the times include
oversubscription: read the time columns at world <= cores, the memory columns at every size.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

SUITE = "distributed"
BASELINE = "plain"
DEFAULT = False  # starts several processes per case: run it by name
PROVIDERS = ("plain", "gather", "ring")


def cases(device: str, full: bool):  # the harness's case-based interface: this suite runs itself
    return []


def _clip_plain(images, texts, scale):
    import torch.nn.functional as F

    import fastcl.distributed as distributed

    rank, batch = torch.distributed.get_rank(), images.shape[0]
    all_images = distributed.all_gather_rows(images)
    all_texts = distributed.all_gather_rows(texts)
    target = torch.arange(batch) + rank * batch
    return 0.5 * (F.cross_entropy(scale * images @ all_texts.T, target) +
                  F.cross_entropy(scale * texts @ all_images.T, target))


def make_step(device: str, provider: str, batch: int, dim: int, normalized: bool = True, scale: float = 20.0):
    """One rank's fwd+bwd step (the process group is already initialized): unit features (as a
    CLIP model returns them) or raw ``randn`` ones, and a learnable logit ``scale`` (1 / tau)."""
    import torch.nn.functional as F

    import fastcl

    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    unit = (lambda x: F.normalize(x, dim=-1)) if normalized else (lambda x: x)
    images = unit(torch.randn(batch, dim, generator=generator)).requires_grad_()
    texts = unit(torch.randn(batch, dim, generator=generator)).requires_grad_()
    scale = torch.tensor(float(scale), requires_grad=True)

    def step():
        images.grad = texts.grad = scale.grad = None
        if provider == "plain":
            loss = _clip_plain(images, texts, scale)
        else:
            loss = fastcl.distributed.clip_loss(images, texts, scale, mode=provider)
        loss.backward()

    return step


def _rank_main(rank, world, port, provider, params, repeats, out_dir):
    import torch.distributed as dist

    from ..harness import Case, measure_in_process, tensor_peak_bytes

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    case = Case(SUITE, provider, __name__, "make_step", params, x=world, repeats=repeats,
                first_call=True)
    result = measure_in_process(case, "cpu")  # the row is the first call, the steady state in extra
    step = make_step("cpu", provider, **params)
    step()
    tensor_mb = tensor_peak_bytes(step) / 2**20
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"time_ms": result.extra["steady_ms"], "peak_mb": result.extra["steady_peak_mb"],
                   "tensor_mb": tensor_mb, "first_ms": result.time_ms}, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(provider: str, world: int, batch: int, dim: int, repeats: int = 3, normalized: bool = True,
            scale: float = 20.0) -> dict:
    """Largest over the ranks of one ``world``-process run: steady step time, first call, peak
    extra RSS and tensor memory (``normalized`` / ``scale``: the inputs, :func:`make_step`)."""
    params = {"batch": batch, "dim": dim, "normalized": normalized, "scale": scale}
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world, port, provider, params, repeats, out_dir), nprocs=world, join=True)
        ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]
    return {key: max(r[key] for r in ranks) for key in ("time_ms", "peak_mb", "tensor_mb", "first_ms")}


def run(device: str, full: bool, out_dir: str, timeout: float) -> None:
    from ..harness import device_name, write_rows

    if device != "cpu":
        print("distributed suite: gloo processes on the CPU only; skipped on", device)
        return
    batch, dim = 1024, 256
    worlds = (1, 2, 4, 8) if full else (1, 2, 4)
    rows = []
    header = (f"clip loss across W gloo processes, local batch {batch}, D = {dim}, fp32 fwd+bwd, "
              f"{device_name('cpu')}; per rank max over ranks; threads per rank = cores // W; "
              "tensors = peak tensor bytes a step allocates (the allocator's records), RSS = peak extra resident memory")
    lines = [header]
    print(header, flush=True)
    for world in worlds:
        measured = {provider: measure(provider, world, batch, dim, repeats=7) for provider in PROVIDERS}
        for provider, result in measured.items():
            rows.append({"world": world, "local_batch": batch, "dim": dim, "provider": provider, **result,
                         "time_ratio_vs_plain": result["time_ms"] / measured["plain"]["time_ms"],
                         "memory_ratio_vs_plain": result["peak_mb"] / max(measured["plain"]["peak_mb"], 1e-9),
                         "tensor_ratio_vs_plain": result["tensor_mb"] / max(measured["plain"]["tensor_mb"], 1e-9)})
        plain = measured["plain"]
        text = (f"W={world}: plain {plain['time_ms']:.0f} ms, tensors {plain['tensor_mb']:.1f} MB, "
                f"RSS {plain['peak_mb']:.0f} MB per rank") + "".join(
            f"; {name} {result['time_ms']:.0f} ms ({result['time_ms'] / plain['time_ms']:.2f}x), "
            f"tensors {result['tensor_mb']:.1f} MB ({result['tensor_mb'] / max(plain['tensor_mb'], 1e-9):.3f}x), "
            f"RSS {result['peak_mb']:.0f} MB"
            for name, result in measured.items() if name != "plain") + (
            "; first call " + ", ".join(f"{name} {result['first_ms']:.0f} ms" for name, result in measured.items()))
        print(text, flush=True)
        lines.append(text)
    write_rows(out_dir, SUITE, rows, "\n".join(lines))
