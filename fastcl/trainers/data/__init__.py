"""Offline data for the trainers: the real sets of docs/trainers.md when installed, else the
small synthetic generators (``synthetic.py``). Loaders raise ``DataUnavailable`` saying how to
install what is missing (``make data``)."""

from typing import Callable, Tuple, TypeVar

from ..engine import DataUnavailable

T = TypeVar("T")


def choose(data: str, load_real: Callable[[], T], load_synthetic: Callable[[], T], what: str) -> Tuple[T, bool, str]:
    """(data, is_real, description) for ``--data real|synthetic|auto``: ``auto`` falls back to the
    synthetic set (saying so) when the real one is not installed; ``real`` raises DataUnavailable."""
    if data not in ("real", "synthetic", "auto"):
        raise ValueError(f"--data must be real, synthetic or auto, got {data!r}")
    if data != "synthetic":
        try:
            return load_real(), True, f"real: {what}"
        except DataUnavailable as error:
            if data == "real":
                raise
            return load_synthetic(), False, f"synthetic (auto: {error})"
    return load_synthetic(), False, "synthetic"
