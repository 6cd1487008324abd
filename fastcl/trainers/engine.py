"""The one training loop every method shares, on Hugging Face Accelerate, as a few named steps.

A method (``fastcl/trainers/<name>.py``) builds a :class:`Method`: its model, its data, its loss
and its evaluation. This module does everything else: devices and mixed precision (Accelerate),
DDP under ``torchrun`` / ``accelerate launch`` (each process takes its slice of the global
batch; the losses gather every rank's negatives through ``fastcl.distributed``), GradCache as an
option of the loop, the run directory and checkpoints (:mod:`.runs`), exact resume, SIGINT /
SIGTERM (finish the step, checkpoint, exit non-zero), the progress bar, the per-step log, the
final metrics and the curves. :func:`fit` is the one optimization loop of ``fastcl/trainers``:
the engine, the methods' baselines (CCN's ablation, BPR-MF) all step through it.

Determinism: the data order is a pure function of (seed, step) and the torch generator is
re-seeded from (seed, step, rank) before every step, so ``--loss fused`` and ``--loss naive``
draw the same random numbers (dropout, sampling), and a run resumed at step k continues exactly
as the uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..grad_cache import call_encoder
from .config import TrainConfig, config_to_dict
from .runs import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, STATE_FILE, CheckpointError, DataUnavailable, RunDirectory,
                   load_checkpoint, read_checkpoint_state, resolve_checkpoint, save_checkpoint,  # noqa: F401
                   write_json)

__all__ = ["Method", "Stage", "train", "fit", "linear_schedule", "DataUnavailable", "CheckpointError",
           "TrainingInterrupted", "TrainingDiverged", "CHECKPOINT_FORMAT", "STATE_FILE"]


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


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at step ``total``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total))


def fit(steps: Iterable[int], optimizer: torch.optim.Optimizer, compute_gradients: Callable[[int], torch.Tensor], *,
        scheduler=None, before_update: Optional[Callable[[int, torch.Tensor], None]] = None,
        after_update: Optional[Callable[[int, torch.Tensor], None]] = None) -> None:
    """The optimization loop of every trainer in ``fastcl/trainers``. For each step,
    ``compute_gradients(step)`` returns the loss with its gradients accumulated;
    ``before_update(step, loss)`` may refuse the update by raising (a non-finite loss); then the
    optimizer and the scheduler step, the gradients are cleared, and ``after_update(step, loss)``
    runs (logging, evaluation, checkpoints, stop requests)."""
    for step in steps:
        loss = compute_gradients(step)
        if before_update is not None:
            before_update(step, loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_update is not None:
            after_update(step, loss)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a step; its checkpoint is saved."""

    def __init__(self, signum: int, step: int, out: str, method_name: str):
        self.signum, self.step, self.out = signum, step, out
        self.exit_code = 128 + signum  # the shell's convention for a process ended by a signal
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step} with a checkpoint; continue with "
                         f"python -m fastcl.trainers {method_name} --resume {out}")


class TrainingDiverged(FloatingPointError):
    """A non-finite loss: the update is refused and the last good state saved."""


class StopSignals:
    """While active, the first SIGINT / SIGTERM asks the loop to stop after the current step (it
    writes a checkpoint and exits non-zero); a second one ends the process at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second signal: no more waiting
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                    "(send it again to exit at once)\n".encode())

    def requested(self, accelerator) -> Optional[int]:
        """The signal any process received (every rank stops at the same step), or None."""
        received = self.received or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor([received], dtype=torch.int64, device=accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = int(flag.item())
        return received or None


@dataclass
class History:
    """What a run has accumulated and a resume continues: evaluations, baselines, step times."""

    before: Dict[str, Any] = field(default_factory=dict)
    baselines: Dict[str, Any] = field(default_factory=dict)
    evals: List[Dict[str, Any]] = field(default_factory=list)
    step_times: List[List[float]] = field(default_factory=list)  # one list per session (resume)
    peaks_mb: List[Optional[float]] = field(default_factory=list)

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "History":
        timing = state.get("timing") or {}
        return cls(state.get("before", {}), state.get("baselines", {}), state.get("evals", []),
                   [list(map(float, t)) for t in timing.get("step_times", [])], list(timing.get("peaks_mb", [])))

    def state(self) -> Dict[str, Any]:
        return {"before": self.before, "baselines": self.baselines, "evals": self.evals,
                "timing": {"step_times": self.step_times, "peaks_mb": self.peaks_mb}}

    def timing(self) -> Dict[str, Any]:
        """Median time of the steps after each session's first (all of them when none is later),
        the largest steady-state peak, the steps run: over every session of the run."""
        steady = [t for times in self.step_times for t in times[1:]] or [t for times in self.step_times for t in times]
        peaks = [p for p in self.peaks_mb if p is not None]
        return {"time_per_step_s": statistics.median(steady) if steady else None,
                "peak_memory_mb": max(peaks) if peaks else None,
                "steps_run": sum(len(times) for times in self.step_times)}


class _Loop:
    """The step, the checkpoint and the log of one session of a run (the callbacks of :func:`fit`)."""

    def __init__(self, accelerator, name: str, method: Method, config: TrainConfig, plan, orders, run: RunDirectory,
                 model, optimizer, scheduler, history: History, losses, evaluate, start: int, end: int, total: int):
        self.accelerator, self.name, self.method, self.config = accelerator, name, method, config
        self.plan, self.orders, self.run, self.model = plan, orders, run, model
        self.optimizer, self.scheduler, self.history, self.losses = optimizer, scheduler, history, losses
        self.evaluate, self.start, self.end, self.total = evaluate, start, end, total
        self.main = accelerator.is_main_process
        self.rank, self.local = accelerator.process_index, config.batch_size // accelerator.num_processes
        self.cache = None
        if config.grad_cache is not None:
            from fastcl import GradCache

            self.cache = GradCache(model, chunk_size=config.grad_cache, loss_fn=method.representation_loss)
        self.times: List[float] = []
        history.step_times.append(self.times)
        history.peaks_mb.append(None)
        self.memory = PeakMemory(accelerator.device)
        self.signals: Optional[StopSignals] = None

    def run_steps(self) -> None:
        bar = _progress(self.total, self.start, self.main)
        log = open(os.path.join(self.run.path, "log.jsonl"), "a") if self.main else None
        self.bar, self.log = bar, log
        try:
            with StopSignals() as self.signals:
                self.model.train()
                fit(range(self.start, self.end), self.optimizer, self.compute_gradients, scheduler=self.scheduler,
                    before_update=self.before_update, after_update=self.after_update)
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()

    def compute_gradients(self, step: int) -> torch.Tensor:
        stage_index = max(i for i, (_, first, _) in enumerate(self.plan) if step >= first or i == 0)
        stage, first, _ = self.plan[stage_index]
        self.stage = stage
        indices = self.orders[stage_index].indices(step - first)[self.rank * self.local:(self.rank + 1) * self.local]
        batch = to_device(stage.collate([stage.data[i] for i in indices]), self.accelerator.device)
        torch.manual_seed(step_seed(self.config.seed, step, self.rank))
        self.began = time.perf_counter()
        if self.cache is not None:
            inputs, loss_kwargs = self.method.encode_inputs(batch)
            with self.accelerator.autocast():
                return self.cache.step(*inputs, **loss_kwargs)
        with self.accelerator.autocast():
            loss = self.method.compute_loss(batch, self.model)
        self.accelerator.backward(loss)
        return loss

    def before_update(self, step: int, loss: torch.Tensor) -> None:
        self.learning_rate = self.scheduler.get_last_lr()[0]  # the rate this step trains at
        self.loss_value = float(self.accelerator.reduce(loss.detach().float().reshape(1), reduction="mean").item())
        if not math.isfinite(self.loss_value):  # no update from it: the weights stay the last good ones
            kept = f"; the state after step {step} is saved: continue it with --resume {self.run.path} (e.g. with a lower --lr)"
            if step > self.start:
                self.checkpoint(step)
            elif step == 0:
                kept = ""
            raise TrainingDiverged(f"step {step + 1}: the loss is {self.loss_value}{kept}")

    def after_update(self, step: int, loss: torch.Tensor) -> None:
        if self.method.after_step is not None:
            self.method.after_step(self.accelerator.unwrap_model(self.model))
        elapsed = time.perf_counter() - self.began
        self.times.append(elapsed)
        done, config = step + 1, self.config
        evaluate = bool(config.eval_every and done % config.eval_every == 0 and done < self.total)
        save = bool((config.save_every and done % config.save_every == 0)
                    or (done == self.end and not (config.skip_save and self.end == self.total)))
        received = self.signals.requested(self.accelerator)  # every rank asks at every step: same collectives
        if len(self.times) == 1 and self.end - self.start > 1:
            # steady state: the peak of the later steps above what the first one left allocated
            # (optimizer state, lazy initialization, warmed-up caches)
            self.memory = PeakMemory(self.accelerator.device)
        elif evaluate or save or received or done == self.end:
            # the peak of the steps so far, read before this step's evaluation or checkpoint
            self.history.peaks_mb[-1] = self.memory.peak_mb()
        record = {"step": done, "loss": self.loss_value, "lr": self.learning_rate, "stage": self.stage.name,
                  "time_s": round(elapsed, 5), "samples_per_s": round(config.batch_size / elapsed, 2)}
        if evaluate:
            metrics = self.evaluate()
            self.history.evals.append({"step": done, "metrics": metrics})
            record["eval"] = metrics
        if self.main:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
            self.losses.append((done, self.loss_value))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.loss_value:.4f}", samples_s=f"{record['samples_per_s']:.1f}",
                                 **({"stage": self.stage.name} if len(self.plan) > 1 else {}))
            self.bar.update(1)
        if save or received:
            self.checkpoint(done)
        if received:
            raise TrainingInterrupted(received, done, self.run.path, self.name)

    def checkpoint(self, step: int) -> None:
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "method": self.name, "step": step,
                 "total_steps": self.total, "batch_size": self.config.batch_size, "seed": self.config.seed,
                 **self.history.state()}
        save_checkpoint(self.accelerator, self.run.path, state)


# -- the named steps of a run ----------------------------------------------------------------------
def _accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # each run its own precision (repeated in-process runs, tests)
    accelerator = Accelerator(mixed_precision="bf16" if config.precision == "bf16" else "no",
                              step_scheduler_with_optimizer=False,
                              cpu=not torch.cuda.is_available())  # Accelerate needs cpu=True to run gloo DDP
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the number of processes "
                         f"({accelerator.num_processes})")
    return accelerator


def _broadcaster(accelerator) -> Callable[[Any], Any]:
    def broadcast(value):
        if accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    return broadcast


def _build(name: str, build: Callable[[TrainConfig], Method], config: TrainConfig, default_steps: int):
    """The method, its stage plan and batch orders, and the number of steps; checks them."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    torch.manual_seed(step_seed(config.seed, -1, 0))  # the model's initialization: the same on every rank
    method = build(config)
    if config.grad_cache is not None and not method.supports_grad_cache:
        raise ValueError(f"--grad-cache: method {name!r} does not give encoders and a representation loss")
    stages = method.stages()
    for stage in stages:
        if len(stage.data) < config.batch_size:
            raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(stage.data)} training "
                             f"examples of stage {stage.name!r} (in-batch negatives would repeat)")
    total = total_steps_of(config, stages, default_steps)
    plan = stage_plan(stages, total)
    orders = [BatchOrder(len(stage.data), config.batch_size, config.seed + number) for number, (stage, _, _) in enumerate(plan)]
    return method, plan, orders, total


def _resume_state(run: RunDirectory, name: str, config: TrainConfig, total: int) -> Optional[Dict[str, Any]]:
    if run.checkpoint is None:
        return None
    state = read_checkpoint_state(run.checkpoint, name, config)
    if state.get("total_steps") != total:
        raise CheckpointError(f"--resume {run.checkpoint!r}: the run had {state.get('total_steps')} steps, this one {total} "
                              "(the learning-rate schedule would differ); pass the same --steps")
    return state


def _prepare(accelerator, method: Method, config: TrainConfig, total: int):
    optimizer = torch.optim.AdamW(method.parameters if method.parameters is not None else method.model.parameters(),
                                  lr=config.lr, weight_decay=config.weight_decay)
    return accelerator.prepare(method.model, optimizer, linear_schedule(optimizer, config.warmup_steps, total))


def _evaluator(accelerator, method: Method, config: TrainConfig) -> Callable[[], Dict[str, float]]:
    def evaluate() -> Dict[str, float]:
        metrics = {}
        if accelerator.is_main_process and not config.skip_eval:
            model = accelerator.unwrap_model(method.model)
            model.eval()
            with torch.no_grad(), accelerator.autocast():
                metrics = _floats(method.evaluate(model))
            model.train()
        accelerator.wait_for_everyone()
        return metrics

    return evaluate


def _history(state, evaluate, method: Method, config: TrainConfig, main: bool) -> History:
    if state is not None:
        return History.from_state(state)
    if config.skip_before:
        return History()
    before = evaluate()
    baselines = (method.baselines() if method.baselines is not None and not config.skip_eval else {}) if main else {}
    return History(before, baselines, [{"step": 0, "metrics": before}])


def _announce(say, name: str, method: Method, config: TrainConfig, accelerator, total: int, out: str) -> None:
    say(f"fastcl.trainers {name}: data {method.data_source or '?'}")
    say(f"  seed {config.seed}, {total} steps, global batch {config.batch_size} on {accelerator.num_processes} process(es), "
        f"device {accelerator.device}, precision {config.precision}, loss {config.loss}"
        + (f", GradCache chunk {config.grad_cache}" if config.grad_cache else "") + f", output {out}/")


def _results(say, name: str, method: Method, config: TrainConfig, accelerator, history: History, losses, evaluate,
             total: int, out: str) -> Dict[str, Any]:
    final = evaluate()
    history.evals.append({"step": total, "metrics": final})
    timing = history.timing()
    result = {"method": name, "data": method.data_source, "seed": config.seed, "steps": total,
              "batch_size": config.batch_size, "loss_implementation": config.loss,
              "final_train_loss": losses[-1][1] if losses else None, "grad_cache": config.grad_cache,
              "precision": config.precision, "processes": accelerator.num_processes, **final, "before": history.before,
              **history.baselines, "train": timing, "goal_metric": method.goal_metric,
              **({"extra": method.extra} if method.extra else {})}
    if accelerator.is_main_process:
        write_json(os.path.join(out, "metrics.json"), result)
        note = plot_curves(os.path.join(out, "curves.png"), losses, history.evals, method.goal_metric,
                           f"{name} ({config.loss}; {method.data_source.split(';')[0]})")
        final_flat, final_sections = _split_sections(final)
        before_flat, before_sections = _split_sections(history.before)
        columns = {**final_sections, "before": before_flat, **{f"{k} before": v for k, v in before_sections.items()},
                   **history.baselines}
        say("\n" + format_metrics_table(final_flat, columns))
        peak = timing["peak_memory_mb"]
        say(f"time/step {timing['time_per_step_s'] or float('nan'):.3f} s, peak memory of the steps "
            f"{(peak if peak is not None else float('nan')):.0f} MB; wrote {out}/metrics.json, log.jsonl"
            + ("" if note else ", curves.png"))
        if note:
            say(note)
    accelerator.wait_for_everyone()
    return result


def train(method_name: str, build: Callable[[TrainConfig], Method], config: TrainConfig,
          default_steps: int = 100) -> Dict[str, Any]:
    """Build the method, train it, evaluate it; returns what metrics.json holds.

    Every check (options, the run directory, the resume state) runs before anything is written.
    Raises TrainingInterrupted after a SIGINT / SIGTERM (its checkpoint saved), TrainingDiverged
    on a non-finite loss, ValueError / CheckpointError / DataUnavailable on a refused run."""
    accelerator = _accelerator(config)
    main = accelerator.is_main_process
    say = (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)
    run = RunDirectory.choose(config.out, config.resume, config.overwrite, method_name, _broadcaster(accelerator))
    method, plan, orders, total = _build(method_name, build, config, default_steps)
    state = _resume_state(run, method_name, config, total)
    if main:
        run.create({"method": method_name, **config_to_dict(config)})
    _announce(say, method_name, method, config, accelerator, total, run.path)
    model, optimizer, scheduler = _prepare(accelerator, method, config, total)
    start = 0
    if state is not None:
        load_checkpoint(accelerator, run.checkpoint)
        start = int(state["step"])
        say(f"  resumed from {run.checkpoint} at step {start}")
    evaluate = _evaluator(accelerator, method, config)
    history = _history(state, evaluate, method, config, main)
    losses = run.start_log(start) if main else []
    end = min(total, config.stop_after) if config.stop_after else total
    loop = _Loop(accelerator, method_name, method, config, plan, orders, run, model, optimizer, scheduler, history,
                 losses, evaluate, min(start, end), end, total)
    loop.run_steps()
    if end < total:
        say(f"stopped after step {end} of {total} (--stop-after); continue with "
            f"python -m fastcl.trainers {method_name} --resume {run.path}")
        return {"stopped_at": end, "train": history.timing()}
    return _results(say, method_name, method, config, accelerator, history, losses, evaluate, total, run.path)
