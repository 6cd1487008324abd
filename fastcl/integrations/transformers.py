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

from collections.abc import Mapping
from typing import Callable, Optional, Sequence

import torch

from ..grad_cache import GradCache
from ..ops.info_nce import info_nce
from . import log

__all__ = ["compute_loss_func", "grad_cache_compute_loss"]


def _default_embeddings(outputs) -> Sequence[torch.Tensor]:
    """(query, key, ...) embeddings from the model's outputs: a tuple / list / ModelOutput
    (positional), or a mapping's tensor values in order."""
    if isinstance(outputs, Mapping):
        return [v for v in outputs.values() if isinstance(v, torch.Tensor)]
    if isinstance(outputs, (tuple, list)):
        return list(outputs)
    raise TypeError(f"cannot take embeddings from model outputs of type {type(outputs).__name__}: pass embeddings=")


def compute_loss_func(loss_fn: Callable = info_nce, *, embeddings: Optional[Callable] = None, **loss_kwargs):
    """``Trainer(compute_loss_func=fastcl.integrations.transformers.compute_loss_func(...))``.

    Returns ``fn(outputs, labels, num_items_in_batch=None)`` computing
    ``loss_fn(*embeddings(outputs), **loss_kwargs)``. ``embeddings`` maps the model's outputs to
    the loss's positional tensors (default: the outputs' tensors in order).

    Example::

        >>> trainer = Trainer(model=two_tower, args=args, train_dataset=pairs,
        ...                   compute_loss_func=compute_loss_func(fastcl.info_nce, temperature=0.05, normalize=True))
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    take = embeddings or _default_embeddings

    def fastcl_compute_loss(outputs, labels=None, num_items_in_batch=None):
        log.debug("transformers compute_loss_func: %s", getattr(loss_fn, "__name__", loss_fn))
        return loss_fn(*take(outputs), **loss_kwargs)

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
