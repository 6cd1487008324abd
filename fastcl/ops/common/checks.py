"""The argument checks, dtype rules and backend names every op shares: one place, one set of
error messages (each names the argument and what was expected)."""
from __future__ import annotations

import contextlib

import torch

from ...validation import checks_values

REDUCTIONS = ("mean", "sum", "none")

BACKENDS = ("auto", "naive", "torch", "cpu", "triton", "cuda")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def checking_values(*tensors) -> bool:
    """Data-dependent checks need the values on the host: CPU tensors always, GPU tensors in
    validation mode only (:mod:`fastcl.validation`), never on meta tensors or while
    torch.compile traces."""
    return checks_values(*tensors)


def check_choice(name: str, value, allowed) -> None:
    """``value`` is one of ``allowed`` (an option such as ``reduction`` or ``backend``)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_scalar_device(name: str, value, like: torch.Tensor) -> None:
    """A scalar tensor (temperature, logit_scale, logit_bias) lives on ``like``'s device, or is a
    CPU scalar; with meta inputs it must be meta too (a CPU value would need real data)."""
    if not isinstance(value, torch.Tensor) or value.device == like.device:
        return
    if value.device.type == "cpu" and like.device.type != "meta":
        return
    if like.device.type == "meta":
        raise ValueError(f"{name} must be a float or a tensor on the meta device like the inputs, got {value.device}")
    raise ValueError(f"{name} must be on the inputs' device {like.device} or be a CPU scalar, got {value.device}")


def check_float_tensor(name: str, tensor, expected: str, ndim: int) -> None:
    """A floating-point tensor with ``ndim`` dimensions (``expected`` spells the shape)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")


def check_embeddings(name: str, tensor, expected: str, ndim: int) -> None:
    check_float_tensor(name, tensor, expected, ndim)
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)}): the batch needs at least one row")


def check_same_device(**tensors) -> None:
    present = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all inputs must be on the same device, got {listing}")


def check_scalar(name: str, value):
    """A Python number (returned as float) or a one-element floating tensor (returned as is)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a scalar tensor, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} tensor must be floating point, got {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a scalar tensor, got {type(value).__name__}")
    return float(value)


def input_dtypes(device_type: str, **tensors):
    """The floating inputs as the loss computes them: under ``torch.autocast`` cast as autocast
    would cast a matmul's operands (float32/16 to the autocast dtype; float64 stays), then all
    promoted to one dtype as ``torch.promote_types`` would (bf16 query + fp32 key -> fp32).

    The casts are differentiable, so each gradient comes back in its input's own dtype. Returns
    (tensors as a dict in the same order, whether autocast was on). Non-tensors and non-floating
    tensors pass through for the argument checks to report.
    """
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    if not autocast:  # the common call: nothing to cast when every floating input shares one dtype
        dtypes = {t.dtype for t in tensors.values() if isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES}
        if len(dtypes) <= 1:
            return tensors, False
    present = {name: t for name, t in tensors.items()
               if isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES}
    if autocast:
        low = torch.get_autocast_dtype(device_type)
        present = {name: t if t.dtype == torch.float64 else t.to(low) for name, t in present.items()}
    if present:
        dtypes = [t.dtype for t in present.values()]
        common = dtypes[0]
        for dtype in dtypes[1:]:
            common = torch.promote_types(common, dtype)
        present = {name: t.to(common) for name, t in present.items()}
    return {name: present.get(name, t) for name, t in tensors.items()}, autocast


def autocast_disabled(device_type: str, autocast: bool):
    """After :func:`input_dtypes` cast the inputs to the autocast dtype, every path of a loss runs
    with autocast off: float32 logits and loss (float64 for float64 inputs), whichever runs."""
    return torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext()
