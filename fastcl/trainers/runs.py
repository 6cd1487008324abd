"""A run's directory and its checkpoints: where a run writes, what it may delete, and how a resume
reads a checkpoint back.

A run owns its directory (``--out``; by default a fresh ``runs/METHOD/<date>-<time>``). Starting
a new run in a directory that already holds one is refused unless ``--overwrite`` (which removes
only the files a run writes) or ``--resume DIR`` (which continues in DIR unless ``--out`` names
another, fresh directory). Every check runs before the first byte is written, and every name
read from disk is validated: a crafted ``checkpoints/latest`` cannot point a resume or a
deletion outside ``checkpoints/``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["RunDirectory", "CheckpointError", "DataUnavailable", "resolve_checkpoint", "read_checkpoint_state",
           "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "STATE_FILE"]

CHECKPOINT_FORMAT = "fastcl-trainer-checkpoint"
CHECKPOINT_VERSION = 1
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
RUN_FILES = ("config.json", "log.jsonl", "metrics.json", "curves.png")  # what a run writes beside checkpoints/
_CHECKPOINT_NAME = re.compile(r"step-\d{8}")


class DataUnavailable(FileNotFoundError):
    """``--data real`` but the data set (or the model it needs) is not installed (the message says how to get it)."""


class CheckpointError(RuntimeError):
    """``--resume`` of something that is not a readable checkpoint of this method and run."""


def write_json(path: str, value) -> None:
    """Write ``value`` as JSON under a temporary name, then rename (never a half-written file)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(temporary, path)


# -- checkpoints -----------------------------------------------------------------------------------
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
    name = _latest_name(os.path.join(path, CHECKPOINTS))
    if name is not None:
        candidate = os.path.join(path, CHECKPOINTS, name)
        if os.path.isfile(os.path.join(candidate, STATE_FILE)):
            return candidate
    raise CheckpointError(f"--resume {path!r}: not a fastcl trainer checkpoint (no {STATE_FILE}) "
                          "nor a run directory with checkpoints/latest")


def run_of_checkpoint(checkpoint: str) -> Optional[str]:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/step-N``), or None."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINTS else None


def read_checkpoint_state(directory: str, method_name: str, config) -> Dict[str, Any]:
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
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(f"--resume {directory!r}: {STATE_FILE} has no valid step")
    if not os.path.isfile(os.path.join(directory, "model.safetensors")):
        raise CheckpointError(f"--resume {directory!r}: model.safetensors is missing")
    return state


def save_checkpoint(accelerator, run_dir: str, state: Dict[str, Any]) -> str:
    """``accelerator.save_state`` into a temporary directory, then rename: a crash mid-save
    leaves the previous checkpoint intact. Keeps the newest checkpoint only."""
    root = os.path.join(run_dir, CHECKPOINTS)
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
        write_json(os.path.join(temporary, STATE_FILE), state)
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


# -- the run directory -----------------------------------------------------------------------------
def default_out(method_name: str, root: str = "runs") -> str:
    """A fresh ``runs/METHOD/<date>-<time>`` (a suffix where a run of the same second exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, number = os.path.join(root, method_name, stamp), 1
    while os.path.exists(path):
        number += 1
        path = os.path.join(root, method_name, f"{stamp}-{number}")
    return path


def _run_files(path: str) -> List[str]:
    return [name for name in (*RUN_FILES, CHECKPOINTS) if os.path.lexists(os.path.join(path, name))]


def _check_writable(path: str) -> None:
    """``--out`` is (or can become) a directory this process can write in; writes nothing."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} is a file, not a directory")
    ancestor = os.path.abspath(path)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"--out {path!r}: {ancestor!r} is a file, not a directory")
    try:  # the only reliable test (root, read-only mounts, ACLs): make and remove a directory
        os.rmdir(tempfile.mkdtemp(prefix=".fastcl-probe-", dir=ancestor))
    except OSError as error:
        raise ValueError(f"--out {path!r}: cannot write in {ancestor!r} ({error.strerror or error})") from None


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


class RunDirectory:
    """Where a run writes: chosen and checked by :meth:`choose` (nothing written), made by :meth:`create`."""

    def __init__(self, path: str, checkpoint: Optional[str], source: Optional[str], overwrite: bool):
        self.path = path
        self.checkpoint = checkpoint  # the checkpoint to resume from, if any
        self.source = source  # the run directory the checkpoint belongs to (its log.jsonl continues)
        self.overwrite = overwrite

    @property
    def in_place(self) -> bool:
        return self.source is not None and _same(self.source, self.path)

    @classmethod
    def choose(cls, out: Optional[str], resume: Optional[str], overwrite: bool, method_name: str,
               broadcast=lambda value: value) -> "RunDirectory":
        """``broadcast(value)`` gives every process the main process's value (the default name)."""
        checkpoint = resolve_checkpoint(resume) if resume else None
        source = run_of_checkpoint(checkpoint) if checkpoint else None
        if out is None and checkpoint is not None:
            if source is None:
                raise ValueError(f"--resume {resume!r} is a checkpoint outside a run directory: name the directory "
                                 "the run continues in with --out")
            out = source
        elif out is None:
            out = broadcast(default_out(method_name))
        _check_writable(out)
        run = cls(out, checkpoint, source, overwrite)
        if run.in_place and overwrite:
            raise ValueError(f"--overwrite with --resume {resume!r} would delete the run it continues: "
                             "drop --overwrite, or write the continued run elsewhere with --out")
        found = _run_files(out) if os.path.isdir(out) else []
        if found and not run.in_place and not overwrite:
            raise ValueError(f"--out {out!r} already holds a run ({', '.join(found)}): continue it with --resume {out}, "
                             f"replace it with --overwrite, or choose another --out")
        return run

    def create(self, config: Dict[str, Any]) -> None:
        """Make the directory (main process only): remove the previous run's files where
        ``--overwrite`` says so, the stale results of a run continued in place; write config.json."""
        os.makedirs(self.path, exist_ok=True)
        stale = _run_files(self.path) if self.overwrite else (["metrics.json", "curves.png"] if self.in_place else [])
        for name in stale:
            target = os.path.join(self.path, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)
        write_json(os.path.join(self.path, "config.json"), config)

    def start_log(self, start: int) -> List[Tuple[int, float]]:
        """log.jsonl with the first ``start`` steps of the run it continues (none for a new run);
        returns their (step, loss)."""
        kept, losses = [], []
        previous = os.path.join(self.source, "log.jsonl") if (start and self.source) else None
        if previous and os.path.isfile(previous):
            with open(previous) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a line cut by a kill: everything after it is newer than the checkpoint
                    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start:
                        kept.append(line if line.endswith("\n") else line + "\n")
                        losses.append((record["step"], float(record["loss"])))
        with open(os.path.join(self.path, "log.jsonl"), "w") as f:
            f.writelines(kept)
        return losses
