"""The options every trainer shares (``TrainConfig``) and the command line built from a config dataclass.

A method extends ``TrainConfig`` with its own fields (and may redefine a shared field to change
its default). The command line is generated from the dataclass by transformers'
``HfArgumentParser``: every field is an option (``--batch-size`` and ``--batch_size`` both work),
``--help`` lists each with its default, and ``--config FILE`` (JSON or YAML) sets any of them,
command-line options winning over the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar

__all__ = ["TrainConfig", "parse_config", "load_config_file", "config_to_dict"]

C = TypeVar("C", bound="TrainConfig")


def option(default: Any, help: str, **metadata) -> Any:
    """A dataclass field with its ``--help`` line."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    """Options shared by every method (the method's own ``Config`` adds its fields)."""

    loss: Literal["fused", "naive", "kernels"] = option(
        "fused", "fused: fastcl's loss with backend auto (on the CPU, calls of at most 2^17-2^19 logits, e.g. "
                 "batch <= 512, materialize them: faster there); kernels: fastcl's fused kernels at every size "
                 "(no BxN logits); naive: the plain PyTorch loss that materializes the logits")
    data: Literal["real", "synthetic", "auto"] = option(
        "auto", "real: the offline data sets of `make data` (error when absent); synthetic: the small generator; "
                "auto: real when installed, else synthetic")
    synthetic_size: int = option(0, "rows of the synthetic training set (0: the method's default)")
    steps: Optional[int] = option(None, "optimizer steps (default: the method's; --epochs instead counts passes over the data)")
    epochs: Optional[float] = option(None, "passes over the training data (used when --steps is not given)")
    batch_size: int = option(32, "global batch (split evenly across processes under torchrun)")
    lr: float = option(3e-5, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(0, "linear warm-up steps, then linear decay to 0 at the last step")
    seed: int = option(0, "seeds Python, NumPy, torch and the data order")
    seeds: Optional[str] = option(None, "run once per seed, e.g. 0,1,2 (each in OUT/seed-N, a fresh process), then "
                                        "write OUT/metrics.json with every metric's mean, std, min and max over them")
    precision: Literal["fp32", "bf16"] = option("fp32", "fp32, or bf16 mixed precision (autocast)")
    grad_cache: Optional[int] = option(None, "GradCache chunk size (rows per chunk): full-batch gradients with one chunk's activations")
    out: Optional[str] = option(None, "the run's directory (config.json, log.jsonl, metrics.json, curves.png, checkpoints/); "
                                      "default: a fresh runs/METHOD/DATE-TIME, or the --resume run's directory. A directory "
                                      "that holds another run is refused unless --overwrite")
    overwrite: bool = option(False, "start afresh in an --out that holds a run (removes that run's files)")
    resume: Optional[str] = option(None, "a run directory (its latest checkpoint) or a checkpoint directory to continue; "
                                         "the run continues in that directory unless --out names another")
    save_every: int = option(0, "save a checkpoint every N steps (0: only at the end, and on SIGINT / SIGTERM)")
    stop_after: Optional[int] = option(None, "stop (with a checkpoint) after this step, as an interrupted run would; --resume continues it")
    eval_every: int = option(0, "evaluate every N steps for the curves (0: before and after training only)")
    skip_eval: bool = option(False, "no evaluation before or after training (timing runs of the benchmark)")
    skip_before: bool = option(False, "no evaluation before training and no baselines (repeated benchmark runs)")
    skip_save: bool = option(False, "no checkpoint at the end (timing runs of the benchmark)")
    config: Optional[str] = option(None, "JSON or YAML file with any of these options; command-line options override it")

    # the smallest batch that trains: 2 where the only negatives are the batch's other rows
    min_batch_size: ClassVar[int] = 1
    # False where the method has no encoders for GradCache to cache (the embeddings are the parameters)
    grad_cache_supported: ClassVar[bool] = True

    def __post_init__(self):
        smallest = type(self).min_batch_size
        checks = [
            ("seed", 0 <= self.seed < 2**32, "an integer in [0, 2^32)"),
            ("steps", self.steps is None or self.steps >= 1, "a positive integer"),
            ("epochs", self.epochs is None or self.epochs > 0, "a positive number"),
            ("batch_size", self.batch_size >= smallest,
             "a positive integer" if smallest == 1 else
             f"at least {smallest} (the loss's negatives are the other rows of the batch)"),
            ("lr", self.lr > 0, "a positive number"),
            ("weight_decay", self.weight_decay >= 0, "a non-negative number"),
            ("warmup_steps", self.warmup_steps >= 0, "a non-negative integer"),
            ("grad_cache", self.grad_cache is None or self.grad_cache >= 1, "a positive chunk size"),
            ("save_every", self.save_every >= 0, "a non-negative integer"),
            ("stop_after", self.stop_after is None or self.stop_after >= 1, "a positive step"),
            ("eval_every", self.eval_every >= 0, "a non-negative integer"),
            ("synthetic_size", self.synthetic_size >= 0, "a non-negative integer"),
        ]
        if self.grad_cache is not None and not type(self).grad_cache_supported:
            raise ValueError("--grad-cache: this method has no encoders to cache (its embeddings are the parameters)")
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {getattr(self, name)!r}")
        for name, allowed in (("loss", ("fused", "naive", "kernels")), ("data", ("real", "synthetic", "auto")),
                              ("precision", ("fp32", "bf16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")


def config_to_dict(config: TrainConfig) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def load_config_file(path: str) -> Dict[str, Any]:
    """Options from a JSON or YAML file (a mapping of option names to values)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config: no such file {path!r}")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as error:  # pragma: no cover - PyYAML ships with transformers' dependencies
            raise ValueError("--config: reading YAML needs PyYAML (pip install pyyaml); or use a .json file") from error
        values = yaml.safe_load(text)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config: {path!r} is not valid JSON ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"--config: {path!r} must hold a mapping of option names to values, got {type(values).__name__}")
    return {key.replace("-", "_"): value for key, value in values.items()}


def build_parser(config_class: Type[TrainConfig], prog: str, description: str = "", default_steps: Optional[int] = None):
    import argparse

    from transformers import HfArgumentParser

    class Formatter(argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):  # an option that states its own default
            return action.help if getattr(action, "states_default", False) else super()._get_help_string(action)

    # no abbreviations: argparse would take --conf for --config, which the file loader never sees
    parser = HfArgumentParser(config_class, prog=prog, description=description, allow_abbrev=False,
                              formatter_class=Formatter)
    for action in parser._actions:
        if action.dest == "steps" and default_steps is not None:
            # not "(default: None)": an unset --steps means the method's own number
            action.states_default = True
            action.help = (f"optimizer steps (default: {default_steps}, this method's; "
                           "--epochs instead counts passes over the data)")
        if action.dest == "grad_cache" and not config_class.grad_cache_supported:
            action.help = argparse.SUPPRESS
    return parser


def _value_problem(kind, value) -> Optional[str]:
    """Why ``value`` (from a config file) does not fit a field annotated ``kind``, or None."""
    origin = getattr(kind, "__origin__", None)
    arguments = getattr(kind, "__args__", ())
    if origin is not None and type(None) in arguments:  # Optional[X]
        if value is None:
            return None
        kind = next(a for a in arguments if a is not type(None))
        origin = getattr(kind, "__origin__", None)
        arguments = getattr(kind, "__args__", ())
    if origin is Literal:
        return None if value in arguments else f"one of {list(arguments)}"
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if kind is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if kind is str:
        return None if isinstance(value, str) else "a string"
    return None


def check_config_values(config_class: Type[TrainConfig], values: Dict[str, Any]) -> Optional[str]:
    """The first config-file value whose type does not fit its option, as a message, or None."""
    import typing

    hints = typing.get_type_hints(config_class)
    for name, value in values.items():
        if name in hints:
            expected = _value_problem(hints[name], value)
            if expected is not None:
                return f"--{name.replace('_', '-')} must be {expected}, got {value!r}"
    return None


def parse_config(config_class: Type[C], argv: Optional[Sequence[str]] = None, prog: str = "fastcl.trainers",
                 description: str = "", default_steps: Optional[int] = None) -> C:
    """Parse command-line options (and ``--config FILE``) into ``config_class``; exits with a usage
    message naming the option on a bad value, like any argparse program."""
    parser = build_parser(config_class, prog, description, default_steps)
    argv = list(argv) if argv is not None else []
    pre, _ = _config_file_argument(argv)
    if pre is not None:
        try:
            values = load_config_file(pre)
        except ValueError as error:
            parser.error(str(error))
        names = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(values) - names)
        if unknown:
            parser.error(f"--config {pre}: unknown option(s) {unknown}; see --help")
        problem = check_config_values(config_class, values)
        if problem:
            parser.error(f"--config {pre}: {problem}")
        parser.set_defaults(**values)
    try:
        (config,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))
    return config


def _config_file_argument(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1], argv
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv
    return None, argv
