"""The one training loop every method shares, on Hugging Face Accelerate.

A method (``fastcl/trainers/<name>.py``) builds a :class:`Method`: its model, its data, its loss
and its evaluation. This module does everything else: devices and mixed precision (Accelerate),
DDP under ``torchrun`` / ``accelerate launch`` (each process takes its slice of the global
batch; the losses gather every rank's negatives through ``fastcl.distributed``), GradCache as an
option of the loop, checkpoints (Accelerate's ``save_state`` / ``load_state``, weights in
safetensors, written under a temporary name and renamed), exact resume, the progress bar, the
per-step log, the final metrics and the curves.

Determinism: the data order is a pure function of (seed, step) and the torch generator is
re-seeded from (seed, step, rank) before every step, so ``--loss fused`` and ``--loss naive``
draw the same random numbers (dropout, sampling), and a run resumed at step k continues exactly
as the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..grad_cache import call_encoder
from .config import TrainConfig, config_to_dict

__all__ = ["Method", "Stage", "train", "DataUnavailable", "CheckpointError", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "fastcl-trainer-checkpoint"
CHECKPOINT_VERSION = 1
STATE_FILE = "trainer_state.json"


class DataUnavailable(FileNotFoundError):
    """``--data real`` but the data set is not installed (the message says how to get it)."""


class CheckpointError(RuntimeError):
    """``--resume`` of something that is not a readable checkpoint of this method and run."""


@dataclass
class Stage:
    """A phase of training with its own data (NV-Embed's two stages); ``fraction`` of the steps."""

    name: str
    data: Sequence[Any]  # map-style: len() and [index]
    collate: Callable[[List[Any]], Any]
    fraction: float = 1.0


@dataclass
class Method:
    """What a method gives the engine (see docs/trainers.md, "Adding a method").

    Either ``loss(batch, model) -> scalar`` or, for GradCache support, ``encode_inputs(batch) ->
    (inputs, loss_kwargs)`` plus ``representation_loss(*representations, **loss_kwargs)``, where
    ``model(**input)`` (or ``model(input)`` for a tensor) returns the (rows, D) representation of
    one input; the default ``loss`` composes the two. ``evaluate(model) -> {metric: value}`` runs
    on the unwrapped model in eval mode, before training (section ``before``) and after.
    """

    model: nn.Module
    train_data: Any  # a map-style dataset (with ``collate``) or a list of Stage
    evaluate: Callable[[nn.Module], Dict[str, float]]
    collate: Optional[Callable[[List[Any]], Any]] = None
    loss: Optional[Callable[[Any, nn.Module], torch.Tensor]] = None
    encode_inputs: Optional[Callable[[Any], Tuple[Sequence[Any], Dict[str, Any]]]] = None
    representation_loss: Optional[Callable[..., torch.Tensor]] = None
    baselines: Optional[Callable[[], Dict[str, Dict[str, float]]]] = None  # e.g. {"bm25": {...}}
    data_source: str = ""  # one line: which data the run uses
    goal_metric: Optional[str] = None  # the headline metric (curves, benchmark)
    parameters: Optional[Iterable] = None  # optimizer parameter groups; default model.parameters()
    after_step: Optional[Callable[[nn.Module], None]] = None  # e.g. clamp a logit scale, clip norms
    extra: Dict[str, Any] = field(default_factory=dict)  # anything worth recording in metrics.json

    def stages(self) -> List[Stage]:
        if isinstance(self.train_data, (list, tuple)) and self.train_data and all(isinstance(s, Stage) for s in self.train_data):
            return list(self.train_data)
        if self.collate is None:
            raise TypeError("Method.collate is required when train_data is a dataset (not a list of Stage)")
        return [Stage("train", self.train_data, self.collate, 1.0)]

    def compute_loss(self, batch, model: nn.Module) -> torch.Tensor:
        if self.loss is not None:
            return self.loss(batch, model)
        if self.encode_inputs is None or self.representation_loss is None:
            raise TypeError("a Method needs loss=, or encode_inputs= and representation_loss=")
        inputs, loss_kwargs = self.encode_inputs(batch)
        representations = [call_encoder(model, value) for value in inputs]
        return self.representation_loss(*representations, **loss_kwargs)

    @property
    def supports_grad_cache(self) -> bool:
        return self.encode_inputs is not None and self.representation_loss is not None


def to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return type(value)({k: to_device(v, device) for k, v in value.items()}) if isinstance(value, dict) else \
            {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


# -- data order ------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


class BatchOrder:
    """Indices of the global batch at each step: epochs are seeded permutations, concatenated."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._permutations: Dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 7_777 + epoch)
            self._permutations = {epoch: torch.randperm(self.size, generator=generator)}
        return self._permutations[epoch]

    def indices(self, step: int) -> List[int]:
        start = step * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.size)
            out.append(int(self._permutation(epoch)[offset]))
        return out


def stage_plan(stages: List[Stage], total_steps: int) -> List[Tuple[Stage, int, int]]:
    """(stage, first step, steps) for each stage: fractions of the total, the last takes the rest."""
    plan, start = [], 0
    weights = sum(s.fraction for s in stages)
    for number, stage in enumerate(stages):
        steps = total_steps - start if number == len(stages) - 1 else int(round(total_steps * stage.fraction / weights))
        plan.append((stage, start, steps))
        start += steps
    return plan


# -- memory ----------------------------------------------------------------------------------------
def _rss(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory above what was allocated when it was created (CUDA allocator peak on GPU;
    resident-set high-water mark on CPU, Linux). The engine starts one after the first step, so
    the figure is a steady-state step's peak (the first step's when only one runs)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            try:
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            self.base = _rss("VmRSS")
            try:  # reset the high-water mark to the current RSS
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.base = None  # VmHWM would be the whole process's peak: no figure

    def peak_mb(self) -> Optional[float]:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        peak = _rss("VmHWM")
        return None if peak is None or self.base is None else max(0, peak - self.base) / 2**20


# -- checkpoints -----------------------------------------------------------------------------------
def _write_json(path: str, value) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(temporary, path)


_CHECKPOINT_NAME = re.compile(r"step-\d{8}")


def _latest_name(root: str) -> Optional[str]:
    """The checkpoint name ``root/latest`` holds, if it is one this writer makes (``step-NNNNNNNN``):
    never a path, so a crafted file cannot point a resume or a deletion outside ``root``."""
    latest = os.path.join(root, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        name = f.read().strip()
    return name if _CHECKPOINT_NAME.fullmatch(name) else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory's latest checkpoint."""
    if not os.path.exists(path):
        raise CheckpointError(f"--resume {path!r}: no such file or directory")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    name = _latest_name(os.path.join(path, "checkpoints"))
    if name is not None:
        candidate = os.path.join(path, "checkpoints", name)
        if os.path.isfile(os.path.join(candidate, STATE_FILE)):
            return candidate
    raise CheckpointError(f"--resume {path!r}: not a fastcl trainer checkpoint (no {STATE_FILE}) "
                          "nor a run directory with checkpoints/latest")


def read_checkpoint_state(directory: str, method_name: str, config: TrainConfig) -> Dict[str, Any]:
    try:
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"--resume {directory!r}: unreadable {STATE_FILE} ({error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"--resume {directory!r}: not a fastcl trainer checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"--resume {directory!r}: checkpoint version {state.get('version')!r}, this fastcl reads {CHECKPOINT_VERSION}")
    if state.get("method") != method_name:
        raise CheckpointError(f"--resume {directory!r}: a checkpoint of method {state.get('method')!r}, not {method_name!r}")
    for name in ("batch_size", "seed"):
        if state.get(name) != getattr(config, name):
            raise CheckpointError(f"--resume {directory!r}: saved with --{name.replace('_', '-')} {state.get(name)!r}, "
                                  f"this run has {getattr(config, name)!r} (an exact resume needs the same)")
    if not os.path.isfile(os.path.join(directory, "model.safetensors")):
        raise CheckpointError(f"--resume {directory!r}: model.safetensors is missing")
    return state


def save_checkpoint(accelerator, run_dir: str, state: Dict[str, Any]) -> str:
    """``accelerator.save_state`` into a temporary directory, then rename: a crash mid-save
    leaves the previous checkpoint intact. Keeps the newest checkpoint only."""
    root = os.path.join(run_dir, "checkpoints")
    name = f"step-{state['step']:08d}"
    final = os.path.join(root, name)
    temporary = os.path.join(root, f".{name}.tmp")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(os.path.join(temporary, STATE_FILE), state)
        latest = os.path.join(root, "latest")
        previous = _latest_name(root)  # only a name of this writer's pattern is ever deleted
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(temporary, final)
        temporary_latest = f"{latest}.tmp-{os.getpid()}"
        with open(temporary_latest, "w") as f:
            f.write(name)
        os.replace(temporary_latest, latest)
        if previous and previous != name:
            shutil.rmtree(os.path.join(root, previous), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, directory: str) -> None:
    try:
        accelerator.load_state(directory)
    except Exception as error:  # a foreign or corrupt file: say which, never continue half-loaded
        raise CheckpointError(f"--resume {directory!r}: could not load the checkpoint "
                              f"({type(error).__name__}: {str(error)[:300]})") from error


# -- reporting -------------------------------------------------------------------------------------
def _floats(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Metric values as floats; a nested mapping is a section (e.g. an ablation's metrics)."""
    return {k: _floats(v) if isinstance(v, Mapping) else float(v) for k, v in metrics.items()}


def _split_sections(metrics: Dict[str, Any]) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]]]:
    flat = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    return flat, {k: v for k, v in metrics.items() if isinstance(v, Mapping)}


def format_metrics_table(final: Dict[str, float], sections: Dict[str, Dict[str, float]]) -> str:
    columns = ["trained"] + list(sections)
    names = list(final) + [n for s in sections.values() for n in s if n not in final]
    names = list(dict.fromkeys(names))
    width = max([len(n) for n in names] + [6])

    def cell(value):
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    lines = [f"{'metric':<{width}}  " + "  ".join(f"{c:>11}" for c in columns)]
    for name in names:
        values = [final.get(name)] + [sections[c].get(name) for c in sections]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{cell(v):>11}" for v in values))
    return "\n".join(lines)


def plot_curves(path: str, losses: List[Tuple[int, float]], evals: List[Dict[str, Any]], metric: Optional[str],
                title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: curves.png skipped (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        axes[0].plot([s for s, _ in losses], [v for _, v in losses], lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].grid(alpha=0.3)
    points = [(e["step"], e["metrics"].get(metric)) for e in evals if metric and e["metrics"].get(metric) is not None]
    if points:
        axes[1].plot([s for s, _ in points], [v for _, v in points], marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(metric or "metric")
    axes[1].grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")
    except ImportError:
        return None


# -- the loop --------------------------------------------------------------------------------------
def total_steps_of(config: TrainConfig, stages: List[Stage], default_steps: int) -> int:
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        size = sum(len(s.data) for s in stages)
        return max(1, math.ceil(config.epochs * size / config.batch_size))
    return default_steps


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def train(method_name: str, build: Callable[[TrainConfig], Method], config: TrainConfig,
          default_steps: int = 100) -> Dict[str, Any]:
    """Build the method, train it, evaluate it; returns what metrics.json holds."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    AcceleratorState._reset_state()  # each run its own precision (repeated in-process runs, tests)
    accelerator = Accelerator(mixed_precision="bf16" if config.precision == "bf16" else "no",
                              step_scheduler_with_optimizer=False,
                              cpu=not torch.cuda.is_available())  # Accelerate needs cpu=True to run gloo DDP
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    say = (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)
    out = config.out or os.path.join("runs", method_name)
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the number of processes ({world})")
    set_seed(config.seed)
    torch.manual_seed(step_seed(config.seed, -1, 0))  # the model's initialization: the same on every rank

    method = build(config)
    if config.grad_cache is not None and not method.supports_grad_cache:
        raise ValueError(f"--grad-cache: method {method_name!r} does not give encoders and a representation loss")
    stages = method.stages()
    for stage in stages:
        if len(stage.data) < config.batch_size:
            raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(stage.data)} training "
                             f"examples of stage {stage.name!r} (in-batch negatives would repeat)")
    total = total_steps_of(config, stages, default_steps)
    plan = stage_plan(stages, total)
    orders = [BatchOrder(len(stage.data), config.batch_size, config.seed + number) for number, (stage, _, _) in enumerate(plan)]

    # the resume state is checked before anything is written: a refused resume leaves no trace
    directory, state = None, None
    if config.resume:
        directory = resolve_checkpoint(config.resume)
        state = read_checkpoint_state(directory, method_name, config)
        if state.get("total_steps") != total:
            raise CheckpointError(f"--resume {directory!r}: the run had {state.get('total_steps')} steps, this one {total} "
                                  "(the learning-rate schedule would differ); pass the same --steps")

    if main:
        os.makedirs(out, exist_ok=True)
        _write_json(os.path.join(out, "config.json"), {"method": method_name, **config_to_dict(config)})
    say(f"fastcl.trainers {method_name}: data {method.data_source or '?'}")
    say(f"  seed {config.seed}, {total} steps, global batch {config.batch_size} on {world} process(es), "
        f"device {accelerator.device}, precision {config.precision}, loss {config.loss}"
        + (f", GradCache chunk {config.grad_cache}" if config.grad_cache else "") + f", output {out}/")

    model = method.model
    optimizer = torch.optim.AdamW(method.parameters if method.parameters is not None else model.parameters(),
                                  lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps, total))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    start = 0
    if state is not None:
        load_checkpoint(accelerator, directory)
        start = int(state["step"])
        say(f"  resumed from {directory} at step {start}")

    def evaluate() -> Dict[str, float]:
        metrics = {}
        if main and not config.skip_eval:
            unwrapped.eval()
            with torch.no_grad(), accelerator.autocast():
                metrics = _floats(method.evaluate(unwrapped))
            unwrapped.train()
        accelerator.wait_for_everyone()
        return metrics

    if state is not None:
        before, baselines, evals = state.get("before", {}), state.get("baselines", {}), state.get("evals", [])
    elif config.skip_before:
        before, baselines, evals = {}, {}, []
    else:
        before = evaluate()
        baselines = (method.baselines() if method.baselines is not None and not config.skip_eval else {}) if main else {}
        evals = [{"step": 0, "metrics": before}]

    log_path = os.path.join(out, "log.jsonl")
    losses: List[Tuple[int, float]] = []
    if main:
        kept = []
        if start and os.path.isfile(log_path):
            with open(log_path) as f:
                for line in f:
                    record = json.loads(line)
                    if record.get("step", 0) <= start:
                        kept.append(line)
                        losses.append((record["step"], record["loss"]))
        with open(log_path, "w") as f:
            f.writelines(kept)

    cache = None
    if config.grad_cache is not None:
        from fastcl import GradCache

        cache = GradCache(model, chunk_size=config.grad_cache, loss_fn=method.representation_loss)

    def snapshot(step: int) -> Dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "method": method_name, "step": step,
                "total_steps": total, "batch_size": config.batch_size, "seed": config.seed,
                "before": before, "baselines": baselines, "evals": evals}

    local = config.batch_size // world
    end = min(total, config.stop_after) if config.stop_after else total
    bar = _progress(total, start, main)
    step_times: List[float] = []
    memory = PeakMemory(accelerator.device)
    model.train()
    log_file = open(log_path, "a") if main else None
    try:
        for step in range(start, end):
            stage_index = max(i for i, (_, first, _) in enumerate(plan) if step >= first or i == 0)
            stage, first, _ = plan[stage_index]
            indices = orders[stage_index].indices(step - first)[rank * local:(rank + 1) * local]
            batch = to_device(stage.collate([stage.data[i] for i in indices]), accelerator.device)
            torch.manual_seed(step_seed(config.seed, step, rank))
            began = time.perf_counter()
            if cache is not None:
                inputs, loss_kwargs = method.encode_inputs(batch)
                with accelerator.autocast():
                    loss = cache.step(*inputs, **loss_kwargs)
            else:
                with accelerator.autocast():
                    loss = method.compute_loss(batch, model)
                accelerator.backward(loss)
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step trains at (read before the scheduler moves)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if method.after_step is not None:
                method.after_step(unwrapped)
            loss_value = float(accelerator.reduce(loss.detach().float().reshape(1), reduction="mean").item())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {step + 1}: the loss is {loss_value}")
            elapsed = time.perf_counter() - began
            step_times.append(elapsed)
            if len(step_times) == 1 and end - start > 1:
                # steady state: the peak of the later steps above what the first one left allocated
                # (optimizer state, lazy initialization, warmed-up caches)
                memory = PeakMemory(accelerator.device)
            done = step + 1
            record = {"step": done, "loss": loss_value, "lr": learning_rate, "stage": stage.name,
                      "time_s": round(elapsed, 5), "samples_per_s": round(config.batch_size / elapsed, 2)}
            if config.eval_every and done % config.eval_every == 0 and done < total:
                metrics = evaluate()
                evals.append({"step": done, "metrics": metrics})
                record["eval"] = metrics
            if main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                losses.append((done, loss_value))
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{record['samples_per_s']:.1f}",
                                **({"stage": stage.name} if len(plan) > 1 else {}))
                bar.update(1)
            if (config.save_every and done % config.save_every == 0) or (done == end and not (config.skip_save and end == total)):
                save_checkpoint(accelerator, out, snapshot(done))
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    peak = memory.peak_mb()
    timing = {"time_per_step_s": statistics.median(step_times[1:] if len(step_times) > 1 else step_times) if step_times else None,
              "peak_memory_mb": peak, "steps_run": len(step_times)}
    if end < total:
        say(f"stopped after step {end} of {total} (--stop-after); continue with --resume {out}")
        return {"stopped_at": end, "train": timing}

    final = evaluate()
    evals.append({"step": total, "metrics": final})
    result = {"method": method_name, "data": method.data_source, "seed": config.seed, "steps": total,
              "batch_size": config.batch_size, "loss": config.loss, "grad_cache": config.grad_cache,
              "precision": config.precision, "processes": world, **final, "before": before, **baselines,
              "train": timing, "goal_metric": method.goal_metric, **({"extra": method.extra} if method.extra else {})}
    if main:
        _write_json(os.path.join(out, "metrics.json"), result)
        note = plot_curves(os.path.join(out, "curves.png"), losses, evals, method.goal_metric,
                           f"{method_name} ({config.loss}; {method.data_source.split(';')[0]})")
        say("")
        final_flat, final_sections = _split_sections(final)
        before_flat, before_sections = _split_sections(before)
        columns = {**final_sections, "before": before_flat, **{f"{k} before": v for k, v in before_sections.items()}, **baselines}
        say(format_metrics_table(final_flat, columns))
        say(f"time/step {timing['time_per_step_s'] or float('nan'):.3f} s, peak memory of the steps "
            f"{(peak if peak is not None else float('nan')):.0f} MB; wrote {out}/metrics.json, log.jsonl"
            + ("" if note else ", curves.png"))
        if note:
            say(note)
    accelerator.wait_for_everyone()
    return result
