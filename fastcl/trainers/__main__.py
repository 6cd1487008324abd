"""``python -m fastcl.trainers METHOD [options]`` (``--help`` after METHOD lists its options).

Runs under ``torchrun --nproc_per_node N -m fastcl.trainers METHOD ...`` or ``accelerate launch``
for data-parallel training (gloo on CPU, NCCL on GPU). Exit status: 0 done, 1 the loss diverged,
2 a refused run (bad option, missing data, unusable checkpoint or run directory), 128 + the signal
after SIGINT / SIGTERM (its checkpoint written).
"""
import os
import sys

from . import METHODS, load_method
from .config import parse_config
from .engine import CheckpointError, DataUnavailable, TrainingDiverged, TrainingInterrupted, train
from .seeds import run_seeds

USAGE = ("usage: python -m fastcl.trainers METHOD [options]   (METHOD --help for its options)\n"
         f"methods: {', '.join(METHODS)}")


def _main_process() -> bool:
    """Under torchrun every rank runs this: only the first prints errors."""
    return os.environ.get("RANK", "0") == "0"


def _error(message: str) -> None:
    if _main_process():
        print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in METHODS:
        print(f"{USAGE}\nerror: unknown method {name!r}", file=sys.stderr)
        return 2
    module = load_method(name)
    default_steps = getattr(module, "DEFAULT_STEPS", 100)
    config = parse_config(module.Config, rest, prog=f"python -m fastcl.trainers {name}",
                          description=(module.__doc__ or "").strip().splitlines()[0], default_steps=default_steps)
    try:
        if config.seeds:
            return run_seeds(name, rest, config)
        train(name, module.build, config, default_steps=default_steps)
    except TrainingInterrupted as stop:
        _error(str(stop))
        return stop.exit_code
    except TrainingDiverged as error:
        _error(str(error))
        return 1
    except (DataUnavailable, CheckpointError, ValueError) as error:
        _error(str(error))
        return 2
    except KeyboardInterrupt:  # before the first step or in the final evaluation: the checkpoint, if any, is kept
        _error(f"interrupted; the run's last checkpoint, if it has one, continues with "
               f"python -m fastcl.trainers {name} --resume DIR")
        return 130
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Under torchrun, destroy the process group while the interpreter is fully alive: gloo's
    threads can otherwise still hold work objects at teardown and abort the process at exit."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        import gc
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
