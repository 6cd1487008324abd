"""``python -m fastcl.trainers METHOD [options]`` (``--help`` after METHOD lists its options).

Runs under ``torchrun --nproc_per_node N -m fastcl.trainers METHOD ...`` or ``accelerate launch``
for data-parallel training (gloo on CPU, NCCL on GPU).
"""
import sys

from . import METHODS, load_method
from .config import parse_config
from .engine import CheckpointError, DataUnavailable, train

USAGE = ("usage: python -m fastcl.trainers METHOD [options]   (METHOD --help for its options)\n"
         f"methods: {', '.join(METHODS)}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in METHODS:
        print(f"{USAGE}\nerror: unknown method {name!r}", file=sys.stderr)
        return 2
    module = load_method(name)
    config = parse_config(module.Config, rest, prog=f"python -m fastcl.trainers {name}",
                          description=(module.__doc__ or "").strip().splitlines()[0])
    try:
        train(name, module.build, config, default_steps=getattr(module, "DEFAULT_STEPS", 100))
    except (DataUnavailable, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
