"""fastcl losses inside Hugging Face ``transformers.Trainer``.

- :func:`compute_loss_func`: a ``Trainer(compute_loss_func=...)`` for a fastcl loss computed
  from the model's outputs (the model embeds the whole batch with autograd, as usual).
- :func:`grad_cache_compute_loss`: a ``compute_loss`` method for a ``Trainer`` subclass that
  embeds the batch chunk by chunk through :class:`fastcl.GradCache` in deferred mode; the
  Trainer's own ``loss.backward()`` (through Accelerate, with gradient accumulation and loss
  scaling) replays the chunks. Big contrastive batches with the activation memory of a chunk.
This module does not import transformers.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Callable, Optional, Sequence

import torch

from ..grad_cache import GradCache
from ..ops.info_nce import info_nce
from . import log

__all__ = ["compute_loss_func", "grad_cache_compute_loss", "accumulation_share"]


def _default_embeddings(outputs) -> Sequence[torch.Tensor]:
    """(query, key, ...) embeddings from the model's outputs: a tuple / list / ModelOutput
    (positional), or a mapping's tensor values in order."""
    if isinstance(outputs, Mapping):
        return [v for v in outputs.values() if isinstance(v, torch.Tensor)]
    if isinstance(outputs, (tuple, list)):
        return list(outputs)
    raise TypeError(f"cannot take embeddings from model outputs of type {type(outputs).__name__}: pass embeddings=")


def _calling_trainer(depth: int = 8):
    """The ``transformers.Trainer`` whose ``compute_loss`` called us (a few frames up), or None."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if candidate is not None and hasattr(candidate, "compute_loss_func") and \
                hasattr(candidate, "current_gradient_accumulation_steps"):
            return candidate
        frame = frame.f_back
    return None


def accumulation_share(labels, num_items_in_batch, trainer=None):
    """The factor that turns a micro-batch's *mean* loss into what ``transformers.Trainer``
    expects of a ``compute_loss_func``: a loss already normalized over the whole gradient
    accumulation window (the Trainer does not divide it by ``gradient_accumulation_steps``).

    With ``num_items_in_batch`` (the batch has ``labels``: the count over the window, and across
    devices when ``average_tokens_across_devices``), the share of this micro-batch's items, as
    transformers intends; without it, ``1 / current_gradient_accumulation_steps`` of the Trainer
    in training mode (1 in evaluation, or where the Trainer divides itself,
    ``loss_is_scaled_for_ga=False``)."""
    if num_items_in_batch is not None and labels is not None:
        local = labels.ne(-100).sum() if isinstance(labels, torch.Tensor) else len(labels)
        return local / num_items_in_batch
    if trainer is None or not getattr(getattr(trainer, "model", None), "training", False):
        return 1.0
    if getattr(trainer, "loss_is_scaled_for_ga", None) is False:
        return 1.0
    return 1.0 / max(1, int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1))


def compute_loss_func(loss_fn: Callable = info_nce, *, embeddings: Optional[Callable] = None, **loss_kwargs):
    """``Trainer(compute_loss_func=fastcl.integrations.transformers.compute_loss_func(...))``.

    Returns ``fn(outputs, labels, num_items_in_batch=None)`` computing
    ``loss_fn(*embeddings(outputs), **loss_kwargs)``, scaled as the Trainer expects of a
    ``compute_loss_func`` under gradient accumulation (:func:`accumulation_share`): the weights and
    the logged loss equal those of a ``compute_loss`` override returning the per-batch mean loss,
    for every ``gradient_accumulation_steps``. ``embeddings`` maps the model's outputs to the
    loss's positional tensors (default: the outputs' tensors in order). ``loss_fn`` must return
    the mean over the micro-batch (fastcl's default ``reduction="mean"``).

    Example::

        >>> trainer = Trainer(model=two_tower, args=args, train_dataset=pairs,
        ...                   compute_loss_func=compute_loss_func(fastcl.info_nce, temperature=0.05, normalize=True))
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    take = embeddings or _default_embeddings

    def fastcl_compute_loss(outputs, labels=None, num_items_in_batch=None):
        log.debug("transformers compute_loss_func: %s", getattr(loss_fn, "__name__", loss_fn))
        share = accumulation_share(labels, num_items_in_batch, _calling_trainer())
        loss = loss_fn(*take(outputs), **loss_kwargs)
        return loss if isinstance(share, float) and share == 1.0 else loss * share

    return fastcl_compute_loss


def grad_cache_compute_loss(split_inputs: Callable, *, chunk_size: Optional[int] = 32, loss_fn: Callable = info_nce,
                            get_rep: Optional[Callable] = None, encoders: Optional[Callable] = None,
                            chunk_tokens: Optional[int] = None, trim_padding: bool = False, **loss_kwargs):
    """A ``compute_loss`` method for a ``transformers.Trainer`` subclass, on GradCache.

    ``split_inputs(inputs)`` returns the per-encoder inputs (e.g. ``(inputs["query"],
    inputs["passage"])``: tensors or dicts of tensors, passed to the encoder as keyword
    arguments when dicts). ``encoders(model)`` returns the encoder(s) (default: the model
    itself for every input). The remaining arguments are :class:`fastcl.GradCache`'s.

    Example::

        >>> class ContrastiveTrainer(Trainer):
        ...     compute_loss = grad_cache_compute_loss(lambda x: (x["query"], x["passage"]), chunk_size=16,
        ...                                            temperature=0.05, normalize=True)
    """
    if not callable(split_inputs):
        raise TypeError(f"split_inputs must be callable, got {type(split_inputs).__name__}")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts = split_inputs(inputs)
        if not isinstance(parts, (tuple, list)):
            raise TypeError(f"split_inputs must return a tuple of per-encoder inputs, got {type(parts).__name__}")
        cache = GradCache(encoders(model) if encoders is not None else model, chunk_size, loss_fn,
                          chunk_tokens=chunk_tokens, trim_padding=trim_padding, get_rep=get_rep, **loss_kwargs)
        log.debug("transformers Trainer: fastcl.GradCache deferred, %d inputs", len(parts))
        loss = cache.loss(*parts)
        return (loss, None) if return_outputs else loss

    return compute_loss
