"""Reference trainers: one command per method, one engine (``python -m fastcl.trainers METHOD``).

Needs the ``trainers`` extra (accelerate, transformers, ...); ``fastcl`` itself never imports
this package.
"""
import importlib

from .methods import METHODS

__all__ = ["METHODS", "load_method", "main"]


def load_method(name: str):
    """The module of a registered method (``ValueError`` naming the known ones otherwise)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])


def main(argv=None):
    from .__main__ import main as run

    return run(argv)
