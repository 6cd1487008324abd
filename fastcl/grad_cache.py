"""Gradient caching (Gao et al., 2021): contrastive batches larger than the activations that fit.

A contrastive loss couples every row of the batch, so the encoder's activations of the whole
batch would normally have to live until ``backward``. Gradient caching splits the work in three
passes so that only one chunk's activations exist at any time:

1. encode every chunk without autograd, keeping only its representation r (rows, D) and the RNG
   state it started from;
2. compute the loss L(r_1, ..., r_n) on the full batch of representations and backpropagate to
   the representations only: g = dL/dr (the "gradient cache", O(B·D));
3. for each chunk, restore its RNG state (same dropout masks), encode it again with autograd and
   backpropagate the surrogate <r_chunk, g_chunk>, whose gradient with respect to the encoder's
   parameters is exactly the chunk's share of dL/dθ = sum_chunks (dr_chunk/dθ)^T g_chunk.

The parameter gradients equal a plain full-batch backward up to floating-point summation order
(and up to the order in which dropout draws random numbers: chunks draw them chunk by chunk).
Peak activation memory is that of one chunk; the price is a second forward pass.

Not exact: encoders whose output for a row depends on the other rows of its chunk, above all
**BatchNorm in training mode** (statistics of a chunk, not of the batch; running statistics
are also updated twice per step). Use LayerNorm / GroupNorm, eval-mode BatchNorm, or accept the
approximation.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .ops.info_nce import info_nce

__all__ = ["GradCache"]

Chunk = Tuple[int, int]  # [start, stop) rows of one input


class _RandomState:
    """CPU and CUDA generator states at one instant, to replay a chunk's dropout exactly."""

    def __init__(self, cuda_devices: Sequence[int]):
        self.cpu = torch.get_rng_state()
        self.cuda = {device: torch.cuda.get_rng_state(device) for device in cuda_devices}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


class _GradientSnapshot:
    """The ``.grad`` of some tensors at one instant, to put back if a step fails half-way.

    A ``.grad`` that is None costs nothing to remember; an existing one (gradient accumulation)
    is copied once per step.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        unique = {id(t): t for t in tensors if t.requires_grad}
        self.saved = [(t, None if t.grad is None else t.grad.detach().clone()) for t in unique.values()]

    def restore(self) -> None:
        for tensor, grad in self.saved:
            tensor.grad = grad


def _graph_leaves(output: torch.Tensor, exclude: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Leaf tensors whose .grad a backward from ``output`` accumulates into (e.g. a learnable
    temperature of the loss), less ``exclude``."""
    skip = {id(t) for t in exclude}
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad
        if isinstance(variable, torch.Tensor) and id(variable) not in skip:
            found.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _rows_of(value, name: str) -> int:
    """Number of rows (dim 0) of one input: a tensor, a mapping of tensors, or a tuple of tensors."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-d tensor")
        return value.shape[0]
    if isinstance(value, Mapping):
        tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if not tensors:
            raise ValueError(f"{name} is a mapping without any tensor to split along dim 0 (keys {list(value)})")
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the tensors of {name} must share their dim 0 (the batch), got {sizes}")
        return next(iter(sizes.values()))
    if isinstance(value, (tuple, list)):
        if not value or not all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in value):
            raise TypeError(f"{name} as a tuple/list must hold tensors (positional arguments of the encoder)")
        sizes = [v.shape[0] for v in value]
        if len(set(sizes)) != 1:
            raise ValueError(f"the tensors of {name} must share their dim 0 (the batch), got {sizes}")
        return sizes[0]
    raise TypeError(
        f"{name} must be a tensor, a dict / BatchEncoding of tensors, or a tuple of tensors, got {type(value).__name__}"
    )


def _row_lengths(value) -> Optional[torch.Tensor]:
    """Tokens of each row: up to its last attention-mask 1 (right padding), else the padded width."""
    if isinstance(value, Mapping):
        mask = value.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
            return ((mask != 0).long() * positions).amax(dim=1).cpu()
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor) and v.dim() >= 2]
    elif isinstance(value, torch.Tensor):
        tensors = [value] if value.dim() >= 2 else []
    else:
        tensors = [v for v in value if v.dim() >= 2]
    if not tensors:
        return None
    return torch.full((tensors[0].shape[0],), tensors[0].shape[1], dtype=torch.long)


def _slice(value, start: int, stop: int, width: Optional[int]):
    """Rows [start, stop) of an input; ``width`` also drops padding columns past the longest row."""

    def cut(tensor):
        part = tensor[start:stop]
        if width is not None and part.dim() >= 2:
            part = part[:, :width]
        return part

    if isinstance(value, torch.Tensor):
        return cut(value)
    if isinstance(value, Mapping):
        return {k: cut(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in value.items()}
    return tuple(cut(v) for v in value)


def call_encoder(encoder: nn.Module, chunk):
    """``encoder(**chunk)`` for a mapping, ``encoder(*chunk)`` for a tuple, else ``encoder(chunk)``."""
    if isinstance(chunk, Mapping):
        return encoder(**chunk)
    if isinstance(chunk, tuple):
        return encoder(*chunk)
    return encoder(chunk)


def _default_get_rep(output):
    if isinstance(output, torch.Tensor):
        return output
    raise TypeError(
        f"the encoder returned {type(output).__name__}, not a tensor: pass get_rep= to pick the representation "
        "(e.g. get_rep=lambda out: out.pooler_output, or get_rep=lambda out, inputs: mean_pool(out, inputs))"
    )


def _wants_inputs(get_rep: Callable) -> bool:
    """True when get_rep takes (output, chunk_inputs) rather than (output) alone."""
    try:
        parameters = inspect.signature(get_rep).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _is_ddp(module: nn.Module) -> bool:
    """A DDP module, or a wrapper around one that says so (``wraps_ddp``) and forwards ``no_sync``."""
    return isinstance(module, nn.parallel.DistributedDataParallel) or bool(getattr(module, "wraps_ddp", False))


def _has_training_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules())


class _Run:
    """What phase 1 leaves for the replay: inputs, encoders, chunk plans, RNG states, representations."""

    def __init__(self, inputs, encoders, plans, states, reps, state_after_forward):
        self.inputs, self.encoders, self.plans, self.states = inputs, encoders, plans, states
        self.reps, self.state_after_forward = reps, state_after_forward


class GradCache:
    r"""Contrastive training step with the memory of one chunk and the gradients of the full batch.

    ``step(*inputs)`` encodes ``inputs[i]`` with ``encoders[i]`` (or the one shared encoder),
    chunk by chunk, calls ``loss_fn(rep_0, rep_1, ..., **loss_kwargs)`` on the full batch of
    representations, and accumulates into ``.grad`` of every parameter the gradient a plain
    ``loss_fn(encoder(x_0), encoder(x_1), ...).backward()`` would give (see the module docstring
    for the maths and the BatchNorm caveat). It never zeroes gradients, so gradient accumulation
    over several steps works as with plain backward; call ``optimizer.zero_grad()`` yourself.

    Args:
        encoders: one ``nn.Module`` shared by every input, or a sequence with one per input
            (dual encoder). ``DistributedDataParallel`` modules are synchronized once per step:
            every chunk but a module's last runs under ``no_sync()``.
        chunk_size: rows per chunk (the activation-memory knob); ``None`` when ``chunk_tokens``
            alone bounds the chunks.
        loss_fn: called with the representations positionally, e.g. ``fastcl.info_nce``,
            ``fastcl.clip_loss``, ``fastcl.distributed.info_nce`` (which gathers the
            representations across ranks once per step). Must return a scalar.
        chunk_tokens: token budget: a chunk takes consecutive rows while
            ``rows * longest_row_in_chunk <= chunk_tokens`` (row length from ``attention_mask``,
            right padding, else the padded width). Both limits apply when both are given.
        trim_padding: drop the padding columns past each chunk's longest row (exact for models
            that honour ``attention_mask`` with right padding, e.g. BERT; saves compute with
            ``chunk_tokens``). Needs representations whose shape does not depend on the width.
        get_rep: maps the encoder's output (e.g. a ``ModelOutput``) to the (rows, ...) tensor
            passed to the loss; ``get_rep(output)`` or ``get_rep(output, chunk_inputs)`` (for
            mean pooling with the attention mask). One callable, or one per input.
        **loss_kwargs: keyword arguments of ``loss_fn`` (``temperature``, ``normalize`` ...);
            ``step``'s keywords override them. A learnable temperature (a tensor that requires
            grad) gets its gradient once per step, from the loss pass.

    Inputs of ``step``: tensors, dicts or HF ``BatchEncoding``s of tensors (passed as keyword
    arguments), or tuples of tensors (positional arguments), all split along dim 0. Inputs may
    have different row counts (e.g. queries (B, L) and keys with hard negatives (2B, L)).

    AMP: run ``step`` inside ``torch.autocast(...)``; pass ``scaler=`` a ``GradScaler`` and the
    loss is scaled before the backward passes (then ``scaler.step(optimizer)``,
    ``scaler.update()`` as usual). The returned loss is detached and unscaled.

    Distributed data parallel: every rank must run the same number of chunks per encoder (DDP
    broadcasts buffers in each forward), i.e. equal local batches with row chunks.

    Example::

        >>> cache = fastcl.GradCache(model, chunk_size=32, loss_fn=fastcl.info_nce, temperature=0.05, normalize=True)
        >>> for queries, passages in loader:              # e.g. (1024, 32) token ids each
        ...     loss = cache.step(queries, passages)      # forward + backward, chunk by chunk
        ...     optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, encoders: Union[nn.Module, Sequence[nn.Module]], chunk_size: Optional[int] = 32,
                 loss_fn: Callable = info_nce, *, chunk_tokens: Optional[int] = None, trim_padding: bool = False,
                 get_rep: Union[None, Callable, Sequence[Callable]] = None, **loss_kwargs):
        if isinstance(encoders, nn.Module):
            self.encoders: List[nn.Module] = [encoders]
        elif isinstance(encoders, (list, tuple, nn.ModuleList)) and encoders and all(isinstance(e, nn.Module) for e in encoders):
            self.encoders = list(encoders)
        else:
            raise TypeError(f"encoders must be an nn.Module or a non-empty sequence of nn.Modules, got {type(encoders).__name__}")
        for name, value in (("chunk_size", chunk_size), ("chunk_tokens", chunk_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if chunk_size is None and chunk_tokens is None:
            raise ValueError("chunk_size and chunk_tokens are both None: give at least one bound on a chunk")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if get_rep is None or callable(get_rep):
            get_reps = [get_rep or _default_get_rep]
        elif isinstance(get_rep, (list, tuple)) and all(callable(g) for g in get_rep):
            get_reps = list(get_rep)
        else:
            raise TypeError("get_rep must be a callable or a sequence of callables (one per input)")
        self.get_reps = [(g, _wants_inputs(g)) for g in get_reps]
        self.chunk_size = chunk_size
        self.chunk_tokens = chunk_tokens
        self.trim_padding = bool(trim_padding)
        self.loss_fn = loss_fn
        self.loss_kwargs = loss_kwargs
        self._warned_batchnorm = False

    # -- planning -------------------------------------------------------------------------------
    def _per_input(self, items: list, count: int, what: str) -> list:
        if len(items) == 1:
            return items * count
        if len(items) != count:
            raise ValueError(f"step() got {count} inputs but GradCache holds {len(items)} {what} (one per input, or one shared)")
        return items

    def plan(self, value, name: str = "input") -> List[Tuple[int, int, Optional[int]]]:
        """Chunks of one input as (start, stop, width) where width is None unless padding is trimmed."""
        rows = _rows_of(value, name)
        if rows == 0:
            raise ValueError(f"{name} has 0 rows: GradCache.step needs at least one row in every input")
        max_rows = self.chunk_size or rows
        lengths = _row_lengths(value) if (self.chunk_tokens is not None or self.trim_padding) else None
        if self.chunk_tokens is not None and lengths is None:
            raise ValueError(f"chunk_tokens needs token inputs: {name} has no attention_mask and no (rows, length) tensor")
        chunks = []
        start = 0
        while start < rows:
            stop = min(rows, start + max_rows)
            if self.chunk_tokens is not None:
                stop, longest = start + 1, int(lengths[start])
                while stop < rows and stop - start < max_rows:
                    longest_next = max(longest, int(lengths[stop]))
                    if (stop - start + 1) * longest_next > self.chunk_tokens:
                        break
                    stop, longest = stop + 1, longest_next
            width = None
            if self.trim_padding and lengths is not None:
                width = max(1, int(lengths[start:stop].max()))
            chunks.append((start, stop, width))
            start = stop
        return chunks

    def _cuda_devices(self, inputs, encoders) -> List[int]:
        devices = set()
        for encoder in encoders:
            devices.update(p.device.index for p in encoder.parameters() if p.device.type == "cuda")

        def visit(value):
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                devices.add(value.device.index)
            elif isinstance(value, Mapping):
                for v in value.values():
                    visit(v)
            elif isinstance(value, (tuple, list)):
                for v in value:
                    visit(v)

        for value in inputs:
            visit(value)
        return sorted(d if d is not None else torch.cuda.current_device() for d in devices)

    def _representation(self, index: int, output, chunk, rows: int) -> torch.Tensor:
        get_rep, wants_inputs = self.get_reps[0] if len(self.get_reps) == 1 else self.get_reps[index]
        rep = get_rep(output, chunk) if wants_inputs else get_rep(output)
        if not isinstance(rep, torch.Tensor):
            raise TypeError(f"get_rep must return a tensor for input {index}, got {type(rep).__name__}")
        if rep.dim() == 0 or rep.shape[0] != rows:
            raise ValueError(f"the representation of input {index} must have the chunk's {rows} rows on dim 0, got shape {tuple(rep.shape)}")
        return rep


    # -- phases shared by step() and loss() ----------------------------------------------------
    def _encode(self, inputs) -> "_Run":
        """Phase 1: representations without autograd; each chunk remembers its RNG state."""
        if not inputs:
            raise ValueError("step() needs at least one input to encode")
        if len(self.get_reps) > 1 and len(self.get_reps) != len(inputs):
            raise ValueError(f"step() got {len(inputs)} inputs but get_rep holds {len(self.get_reps)} callables")
        encoders = self._per_input(self.encoders, len(inputs), "encoders")
        plans = [self.plan(value, f"inputs[{i}]") for i, value in enumerate(inputs)]
        if not self._warned_batchnorm and any(_has_training_batchnorm(e) for e in set(encoders)):
            self._warned_batchnorm = True
            warnings.warn("GradCache: an encoder has BatchNorm in training mode; chunk statistics differ from "
                          "full-batch ones, so the gradients are not exact (and running statistics update twice)",
                          stacklevel=3)
        cuda_devices = self._cuda_devices(inputs, encoders)
        states: List[List[_RandomState]] = []
        reps: List[torch.Tensor] = []
        with torch.no_grad():
            for index, (value, encoder, chunks) in enumerate(zip(inputs, encoders, plans)):
                parts, chunk_states = [], []
                for start, stop, width in chunks:
                    chunk_states.append(_RandomState(cuda_devices))
                    chunk = _slice(value, start, stop, width)
                    parts.append(self._representation(index, call_encoder(encoder, chunk), chunk, stop - start))
                states.append(chunk_states)
                reps.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        return _Run(inputs, encoders, plans, states, reps, _RandomState(cuda_devices))

    def _checked_loss(self, leaves, kwargs) -> torch.Tensor:
        loss = self.loss_fn(*leaves, **kwargs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                             f"{'' if not isinstance(loss, torch.Tensor) else ' of shape ' + str(tuple(loss.shape))}")
        if not loss.requires_grad:
            raise ValueError("loss_fn returned a loss that does not depend on the representations (no grad_fn)")
        return loss

    def _replay(self, run: "_Run", rep_grads, scale=None, resume: Optional[_RandomState] = None) -> None:
        """Phase 3: replay every chunk with autograd and push its cached gradient (times
        ``scale``) into the encoder. A DDP module all-reduces only on the backward of its last chunk.
        The random stream then continues from ``resume`` (default: as if each chunk had run once)."""
        last_use: Dict[int, Tuple[int, int]] = {}
        for index, (encoder, chunks) in enumerate(zip(run.encoders, run.plans)):
            last_use[id(encoder)] = (index, len(chunks) - 1)
        try:
            with torch.enable_grad():
                for index, (value, encoder, chunks) in enumerate(zip(run.inputs, run.encoders, run.plans)):
                    for number, (start, stop, width) in enumerate(chunks):
                        run.states[index][number].restore()
                        syncing = not _is_ddp(encoder) or last_use[id(encoder)] == (index, number)
                        with contextlib.nullcontext() if syncing else encoder.no_sync():
                            chunk = _slice(value, start, stop, width)
                            rep = self._representation(index, call_encoder(encoder, chunk), chunk, stop - start)
                            if rep.requires_grad:  # an encoder without trainable parameters has nothing to learn
                                grad = rep_grads[index][start:stop]
                                if scale is not None:
                                    grad = grad * scale.to(device=grad.device, dtype=grad.dtype)
                                rep.backward(gradient=grad.to(rep.dtype))
        finally:
            (resume or run.state_after_forward).restore()

    def loss(self, *inputs, **loss_kwargs) -> torch.Tensor:
        """Deferred mode, for a loop that calls ``loss.backward()`` itself (HF ``Trainer``,
        ``SentenceTransformerTrainer``, Lightning, Accelerate).

        Encodes the chunks without autograd and computes the loss and dL/d(representations)
        now; returns the loss as a tensor whose ``backward()`` replays the chunks with autograd
        and pushes the cached gradients, times the incoming gradient (a loss scaler's factor,
        a division by the accumulation steps), into the encoder's parameters. Every other leaf
        the loss depends on (a learnable temperature among the loss keywords, or held by a loss
        module such as ``InfoNCELoss(learnable_temperature=True)``) gets its gradient in that same
        backward. The random stream after ``backward()`` continues from where it was when
        ``backward()`` began (numbers drawn in between are not drawn again). Without grad mode it
        returns the plain detached loss.

        Example::

            >>> cache = fastcl.GradCache(model, chunk_size=32, loss_fn=fastcl.info_nce, temperature=0.05)
            >>> loss = cache.loss(queries, passages)   # what compute_loss returns
            >>> accelerator.backward(loss)             # replays the chunks here
        """
        run = self._encode(inputs)
        kwargs = {**self.loss_kwargs, **loss_kwargs}
        if not torch.is_grad_enabled():
            return self.loss_fn(*run.reps, **kwargs)
        leaves = [rep.detach().requires_grad_() for rep in run.reps]
        loss = self._checked_loss(leaves, kwargs)
        extra = _graph_leaves(loss, exclude=leaves)  # learnable temperatures, wherever they live
        grads = torch.autograd.grad(loss.reshape(()), leaves + extra, allow_unused=True)
        rep_grads = [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, leaves)]
        extra_grads = list(grads[len(leaves):])
        del leaves
        run.reps = None
        result = loss.detach().reshape(()).requires_grad_()

        cuda_devices = list(run.state_after_forward.cuda)

        def replay(grad_output):
            now = _RandomState(cuda_devices)
            pairs = [(t, g * grad_output.to(g.dtype)) for t, g in zip(extra, extra_grads) if g is not None]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            self._replay(run, rep_grads, grad_output.reshape(()), resume=now)
            return grad_output

        result.register_hook(replay)
        return result

    # -- the step -------------------------------------------------------------------------------
    def step(self, *inputs, scaler=None, **loss_kwargs) -> torch.Tensor:
        """Forward + backward of the whole batch, chunk by chunk. Returns the detached, unscaled loss.

        ``inputs[i]`` is encoded by ``encoders[i]`` (or the shared encoder) and its
        representation is the i-th positional argument of ``loss_fn``; ``loss_kwargs`` override
        the constructor's (per-batch ``positive``, ``labels`` ...).
        """
        run = self._encode(inputs)
        # 2. the loss on the full batch, backpropagated to the representations (and to any
        #    learnable temperature among the loss kwargs, once)
        leaves = [rep.detach().requires_grad_() for rep in run.reps]
        loss = self._checked_loss(leaves, {**self.loss_kwargs, **loss_kwargs})
        # Every .grad this step writes, as it was: if a pass raises (e.g. out of memory in the
        # replay), no partial gradient stays behind.
        before = _GradientSnapshot([p for encoder in set(run.encoders) for p in encoder.parameters()]
                                   + _graph_leaves(loss, exclude=leaves))
        try:
            (scaler.scale(loss) if scaler is not None else loss).reshape(()).backward()
            rep_grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
            del leaves
            run.reps = None
            self._replay(run, rep_grads)
        except BaseException:
            before.restore()
            raise
        return loss.detach().reshape(())
