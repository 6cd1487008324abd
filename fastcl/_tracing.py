"""Cheap tracing checks for eager calls: nothing here imports ``torch._dynamo``.

Importing ``torch._dynamo`` (and sympy with it) costs about 200 MB and seconds; an eager call
must not pay that. Nothing can be compiling while ``torch._dynamo`` has never been imported,
so each check consults the compiler only once it is loaded.
"""
from __future__ import annotations

import sys

import torch

__all__ = ["is_compiling", "functorch_active", "untraced", "plain_eager", "lazy_dynamo_disable"]


def is_compiling() -> bool:
    """``torch.compiler.is_compiling()`` without loading the compiler in plain eager code."""
    if "torch._dynamo" not in sys.modules:
        return False
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


_PEEK_INTERPRETER = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)


def _inside_transform() -> bool:
    return _PEEK_INTERPRETER is not None and _PEEK_INTERPRETER() is not None


def functorch_active() -> bool:
    """Inside a ``torch.func`` transform (grad, vmap, jacrev, jvp, functional_call's callers):
    tensors are wrapped, data-dependent Python branches break vmap, and the fused kernels'
    autograd (custom ops) does not compose with the transforms. False while torch.compile
    traces (the custom ops are what it compiles)."""
    return not is_compiling() and _inside_transform()


def untraced() -> bool:
    """Neither torch.compile nor a torch.func transform is tracing this call."""
    return not is_compiling() and not _inside_transform()


def plain_eager(*tensors) -> bool:
    """True outside every tracer (dynamo, AOT autograd's fake/functional tensors, make_fx)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (not is_compiling() and not functorch_active() and _get_current_dispatch_mode() is None
            and all(type(t) is torch.Tensor for t in tensors))


def lazy_dynamo_disable(op) -> None:
    """Stop ``op``'s kernels from importing ``torch._dynamo`` on their first eager call.

    ``torch.library.custom_op`` wraps each device implementation in ``torch._disable_dynamo``,
    which imports ``torch._dynamo`` on the first call to build the disabled function. Until
    ``torch._dynamo`` is loaded no frame can be compiled, so the plain function is the same
    thing; once it is loaded, the first call builds the real disabled function as torch would.
    Relies on the wrapper's cache attribute (``__dynamo_disable``); if torch changes it this
    does nothing and torch's own behaviour stays.
    """
    for wrapper in getattr(op, "_backend_fns", {}).values():
        function = getattr(wrapper, "__wrapped__", None)
        if function is None or getattr(function, "__dynamo_disable", None) is not None:
            continue
        setattr(function, "__dynamo_disable", _LazyDisable(function))


class _LazyDisable:
    def __init__(self, function):
        self.function = function

    def __call__(self, *args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return self.function(*args, **kwargs)
        import torch._dynamo

        disabled = torch._dynamo.disable(self.function, recursive=True, wrapping=False)
        setattr(self.function, "__dynamo_disable", disabled)
        return disabled(*args, **kwargs)
