"""Contrastive losses whose negatives come from every process of a ``torch.distributed`` group.

Each rank passes its local rows. The keys (and, for symmetric losses, the queries) are gathered
with an autograd-aware all-gather, so every local query sees the global batch of keys as
candidates and the gradient of a gathered key flows back to the rank that owns it (backward of
the gather = one reduce-scatter). ``mode="ring"`` passes blocks around the ranks instead
(:mod:`fastcl._ring`): memory per rank flat in the number of ranks (the plain InfoNCE / CLIP
loss and SigLIP).

Loss convention (open_clip's "local loss"): rank r returns

    L_r = R / D_global * sum_{i in local rows of r} l_i

where l_i is the loss of local query i against all gathered keys, R the world size and
D_global the global divisor of the "mean" reduction (the global row count in the default mode).
With equal local batches this is the mean over the local rows; in every case
``mean_r L_r`` equals the single-process loss on the concatenated batch, so after
``DistributedDataParallel`` averages the gradients (a division by R), parameter gradients equal
single-process training. Uneven local batch sizes are therefore exact too.

A learnable temperature / logit scale / bias gets its gradient averaged across ranks inside
these functions, so it is right whether it lives inside the DDP module (DDP then averages
values that are already equal: a no-op) or outside it.

Memory per rank (gather mode): the gathered keys O(N_global · D) plus the local rows; the
chunked kernels of ``fastcl.info_nce`` never build the (local × global) logits.

Composes with :class:`fastcl.GradCache`: pass ``loss_fn=fastcl.distributed.info_nce``; the
representations are gathered once per step, in the loss pass.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .ops.common.blocks import ACCELERATOR_BLOCK_BYTES, DEFAULT_BLOCK_BYTES, block_rows_for
from ._ring import RingOptions, fused_tiles, ring_info_nce, ring_sigmoid_rows
from .ops.common.checks import BACKENDS, REDUCTIONS, check_choice, check_embeddings, check_same_device
from .ops.common.gradients import compute_dtype
from .ops.info_nce import MASK, SUPCON, check_info_nce_args, count_positives, logit_scale_temperature
from .ops.info_nce import info_nce as _info_nce

__all__ = ["info_nce", "clip_loss", "siglip_loss", "all_gather_rows", "choose_mode", "MODES", "RING_MEMORY_SHARE"]

MODES = ("auto", "gather", "ring")
# mode="auto" takes the ring when the gathered rows and their gradients would take more than this
# share of the device's memory (GPU memory, or the machine's RAM on the CPU), for a loss the
# ring covers. FASTCL_DISTRIBUTED_MODE=gather|ring (read at import) fixes auto's choice instead.
RING_MEMORY_SHARE = 0.25
_MODE_OVERRIDE = os.environ.get("FASTCL_DISTRIBUTED_MODE") or None


def _reduce_scatter(output: torch.Tensor, tensor: torch.Tensor, op, group) -> None:
    # torch 2.13 renamed reduce_scatter_tensor (which now warns) to reduce_scatter_single
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(output, tensor, op=op, group=group)


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_mode(mode: str, gathered_rows: int, dim: int, element_size: int, device: torch.device,
                ring_covers: bool = True) -> str:
    """The mode a call runs: ``auto`` is the ring when the gathered rows (and their gradients,
    ``2 * gathered_rows * dim * element_size`` bytes) exceed :data:`RING_MEMORY_SHARE` of the
    device's memory and the ring covers the call's options, else gather (or the
    ``FASTCL_DISTRIBUTED_MODE`` override)."""
    if mode != "auto":
        return mode
    if _MODE_OVERRIDE is not None:
        if _MODE_OVERRIDE not in ("gather", "ring"):
            raise ValueError(f"FASTCL_DISTRIBUTED_MODE must be 'gather' or 'ring', got {_MODE_OVERRIDE!r}")
        return _MODE_OVERRIDE if ring_covers else "gather"
    gathered_bytes = 2 * gathered_rows * dim * element_size
    return "ring" if ring_covers and gathered_bytes > RING_MEMORY_SHARE * _device_memory(device) else "gather"


def _group_info(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fastcl.distributed needs an initialized process group: call torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_ints(values: Sequence[int], device: torch.device, group) -> List[List[int]]:
    """Every rank's list of small integers (sizes), in rank order."""
    _, world = _group_info(group)
    local = torch.tensor(list(values), dtype=torch.long, device=device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return [t.tolist() for t in out]


def _all_gather_padded(tensor: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Concatenation in rank order of every rank's (sizes[r], ...) tensor; pads to the longest."""
    longest = max(sizes)
    padded = tensor.contiguous()
    if tensor.shape[0] < longest:
        padded = torch.cat([padded, padded.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))])
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded, group=group)
    return torch.cat([buffer[:rows] for buffer, rows in zip(buffers, sizes)])


class _AllGatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns to each rank the sum over ranks of the
    gradient of its own rows: one reduce-scatter, which moves half the bytes of an all-reduce of
    the whole gathered gradient and leaves no N_global x D result on any rank."""

    @staticmethod
    def forward(ctx, tensor, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return _all_gather_padded(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, longest = ctx.sizes, max(ctx.sizes)
        grad = grad.contiguous()
        if any(rows != longest for rows in sizes):  # uneven batches: every rank's block padded to the longest
            padded = grad.new_zeros((len(sizes) * longest, *grad.shape[1:]))
            start = 0
            for index, rows in enumerate(sizes):
                padded[index * longest:index * longest + rows] = grad[start:start + rows]
                start += rows
            grad = padded
        own = grad.new_empty((longest, *grad.shape[1:]))
        _reduce_scatter(own, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return own[:sizes[ctx.rank]], None, None


class _AverageGradientAcrossRanks(torch.autograd.Function):
    """Identity whose backward averages the gradient over the ranks (a shared scalar parameter)."""

    @staticmethod
    def forward(ctx, value, group):
        ctx.group = group
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def all_gather_rows(tensor: torch.Tensor, *, group=None, local_first: bool = False, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Rows of every rank (dim 0 may differ between ranks), differentiable.

    ``local_first=True`` puts this rank's own rows first (the local tensor itself, so local
    indices stay valid), then the other ranks' rows in rank order. ``sizes``: every rank's row
    count when already known (saves one small collective).
    """
    rank, _ = _group_info(group)
    if sizes is None:
        sizes = [s[0] for s in _gather_ints([tensor.shape[0]], tensor.device, group)]
    sizes = list(sizes)
    if tensor.requires_grad:
        gathered = _AllGatherRows.apply(tensor, sizes, group)
    else:
        gathered = _all_gather_padded(tensor, sizes, group)
    if not local_first:
        return gathered
    start = sum(sizes[:rank])
    return torch.cat([tensor, gathered[:start], gathered[start + sizes[rank]:]])


def _average_scalar_gradient(value, group):
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return _AverageGradientAcrossRanks.apply(value, group)
    return value


def _check_uniform(name: str, per_rank: List[int]) -> None:
    if len(set(per_rank)) != 1:
        raise ValueError(f"{name} must be the same on every rank, got {per_rank} (rank order)")


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    positive: Optional[torch.Tensor] = None,
    hard_negatives: Optional[torch.Tensor] = None,
    temperature=0.07,
    normalize: bool = False,
    symmetric: bool = False,
    exclude_self: bool = False,
    labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    multi_positive: str = MASK,
    false_negative_margin: Optional[float] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    mode: str = "auto",
) -> torch.Tensor:
    r""":func:`fastcl.info_nce` with the keys of every rank as candidates.

    Local arguments, as :func:`fastcl.info_nce` takes them for this rank's rows: ``query``
    (B_r, D), ``key`` (N_r, D), ``positive`` (B_r,) indexing the *local* keys (default
    ``arange(B_r)``), ``hard_negatives`` (B_r, H, D) private to each query, ``labels`` (B_r,),
    ``key_labels`` (N_r,). B_r and N_r may differ between ranks; D must not.

    Row direction: local query i against every rank's keys (plus its hard negatives). With
    ``symmetric=True`` the column direction is local key i < B_r against every rank's queries,
    its positive being local query i, which is single-process ``symmetric=True`` on the
    concatenated batch (each rank's first B_r keys being its positives). ``exclude_self`` drops
    the pair of a local query with the local key of the same index (NT-Xent-style calls where
    query and key are the same local set).

    ``mode="gather"`` all-gathers the keys (memory per rank O(N_global · D)); ``mode="ring"``
    passes key blocks around the ring of ranks (:mod:`fastcl._ring`; memory per rank flat in the
    number of ranks; a symmetric loss computes both directions on the same tiles, the columns'
    statistics travelling with their block); ``mode="auto"`` (default) is :func:`choose_mode`'s
    pick. Ring mode covers the plain loss (``positive``, ``hard_negatives``, ``normalize``,
    ``symmetric``, ``exclude_self``, labels in ``"mask"`` mode (the keys' labels travel with
    their block), ``false_negative_margin``, ``label_smoothing``, a learnable temperature, every
    reduction, uneven batches); ``"supcon"`` and ``"pairwise"`` raise a ``ValueError`` that
    names ``mode="gather"``. ``backend`` applies to gather mode.

    Returns (see the module docstring): ``R / D_global * (local sum of row losses)`` for
    "mean" (the local mean when batches are equal), ``R * local sum`` for "sum", so that the
    mean over ranks is the single-process loss; the local (B_r,) row losses for "none".

    Example::

        >>> # inside each DDP process, after init_process_group
        >>> loss = fastcl.distributed.info_nce(model(q_batch), model(p_batch), temperature=0.05, normalize=True)
        >>> loss.backward()   # DDP averages: gradients of single-process training on the global batch
    """
    rank, world = _group_info(group)
    check_embeddings("query", query, "(B, D)", 2)
    check_embeddings("key", key, "(N, D)", 2)
    check_same_device(query=query, key=key, hard_negatives=hard_negatives, positive=positive,
                      labels=labels, key_labels=key_labels)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("mode", mode, MODES)
    ring_covers = multi_positive == MASK
    if mode == "ring" and not ring_covers:
        raise ValueError(f"mode='ring' covers multi_positive='mask'; multi_positive={multi_positive!r} needs mode='gather'")
    batch, num_keys = query.shape[0], key.shape[0]
    if positive is not None and isinstance(positive, torch.Tensor) and positive.numel() > 0:
        low, high = int(positive.min()), int(positive.max())
        if low < 0 or high >= num_keys:
            raise ValueError(f"positive indexes this rank's keys: values must be in [0, N_r) = [0, {num_keys}), got [{low}, {high}]")

    if symmetric:
        if positive is not None:
            raise ValueError("positive must be None when symmetric=True (each rank's first B_r keys are the positives, in order)")
        if num_keys < batch:
            raise ValueError(f"symmetric=True needs at least B_r keys on every rank: this rank has N_r = {num_keys} < B_r = {batch}")

    per_rank = _gather_ints([batch, num_keys, query.shape[1]], query.device, group)
    _check_uniform("the embedding size D", [s[2] for s in per_rank])
    query_sizes = [s[0] for s in per_rank]
    key_sizes = [s[1] for s in per_rank]

    temperature = _average_scalar_gradient(temperature, group)
    common = dict(temperature=temperature, normalize=normalize, exclude_self=exclude_self,
                  multi_positive=multi_positive, false_negative_margin=false_negative_margin,
                  label_smoothing=label_smoothing, backend=backend)
    per_row = "none" if reduction == "none" else "sum"
    gathered = sum(key_sizes) + (sum(query_sizes) if symmetric else 0)
    mode = choose_mode(mode, gathered, query.shape[1], query.element_size(), query.device,  # gathered as given
                       ring_covers=ring_covers)

    if mode == "ring":
        rows, columns = _ring_directions(query, key, positive, hard_negatives, temperature, normalize, symmetric,
                                         exclude_self, labels, key_labels, false_negative_margin, label_smoothing,
                                         reduction, backend, query_sizes, key_sizes, group)
        if per_row == "sum":
            rows = rows.sum()
            columns = columns.sum() if columns is not None else None
        directions = [(rows, None, None, query_sizes)]
        if symmetric:
            directions.append((columns, None, None, query_sizes))
    else:
        all_keys = all_gather_rows(key, group=group, local_first=True, sizes=key_sizes)
        all_key_labels = None
        if key_labels is not None:
            all_key_labels = all_gather_rows(key_labels, group=group, local_first=True, sizes=key_sizes)
        rows = _info_nce(query, all_keys, positive=positive, hard_negatives=hard_negatives, labels=labels,
                         key_labels=all_key_labels, reduction=per_row, **common)
        directions = [(rows, labels, all_key_labels, query_sizes)]
        if symmetric:
            all_queries = all_gather_rows(query, group=group, local_first=True, sizes=query_sizes)
            all_query_labels = None
            anchor_labels = None
            if labels is not None:
                all_query_labels = all_gather_rows(labels, group=group, local_first=True, sizes=query_sizes)
                anchor_labels = key_labels[:batch]
            columns = _info_nce(key[:batch], all_queries, labels=anchor_labels, key_labels=all_query_labels,
                                reduction=per_row, **common)
            directions.append((columns, anchor_labels, all_query_labels, query_sizes))

    if reduction == "none":
        return rows if not symmetric else 0.5 * (rows + directions[1][0])

    totals = []
    for total, anchor_labels, candidate_labels, sizes in directions:
        if reduction == "sum":
            totals.append(total * world)
            continue
        if multi_positive == MASK:
            divisor = float(sum(sizes))
        else:
            # the global number of anchors with a positive (supcon) or of positive pairs (pairwise)
            counts = count_positives(anchor_labels, candidate_labels, exclude_self)
            local = (counts > 0).sum() if multi_positive == SUPCON else counts.sum()
            local = local.to(torch.float64 if query.device.type != "mps" else torch.float32).reshape(1)
            dist.all_reduce(local, group=group)
            divisor = float(local)
        totals.append(total * (world / divisor) if divisor > 0 else total * 0.0)
    return totals[0] if len(totals) == 1 else 0.5 * (totals[0] + totals[1])


def _ring_directions(query, key, positive, hard_negatives, temperature, normalize, symmetric, exclude_self, labels,
                     key_labels, margin, smoothing, reduction, backend, query_sizes, key_sizes, group):
    """(row losses (B_r,), column losses (B_r,) or None) of the "mask" loss by ring exchange,
    both directions of a symmetric loss on the same tiles; the local arguments are checked as
    :func:`fastcl.info_nce` checks them (gather mode's call does)."""
    dtype = compute_dtype(query)
    options = RingOptions(exclude_self=bool(exclude_self), margin=None if margin is None else float(margin),
                          smoothing=float(smoothing))
    # bf16 rows of the plain loss stay bf16 on the fused tile kernels (half the bytes per hop, the
    # products in bf16 as the single-process Triton kernels do); anything else runs in the compute dtype
    own_dtype = (query.dtype == key.dtype == torch.bfloat16 and not normalize and hard_negatives is None
                 and fused_tiles(query, labels, options))
    q, k = (query, key) if own_dtype else (query.to(dtype), key.to(dtype))
    h = hard_negatives.to(dtype) if hard_negatives is not None else None
    check_info_nce_args(q, k, positive, h, temperature, normalize, symmetric, exclude_self, labels, key_labels, MASK,
                        margin, smoothing, reduction, backend)
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        h = F.normalize(h, dim=-1) if h is not None else None
    if isinstance(temperature, torch.Tensor):
        scale = 1.0 / temperature.to(dtype).reshape(())
    else:
        scale = torch.tensor(1.0 / float(temperature), dtype=dtype, device=query.device)
    return ring_info_nce(q, k, scale, positive, key_sizes, group, private=h,
                         labels=labels.long() if labels is not None else None,
                         candidate_labels=key_labels.long() if key_labels is not None else None, options=options,
                         column_sizes=query_sizes if symmetric else None)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *, backend: str = "auto",
              group=None, mode: str = "auto") -> torch.Tensor:
    r"""CLIP loss with every rank's images and texts as negatives.

    Local (B_r, D) features. Rows: local images against all texts; columns: local texts against
    all images. ``logit_scale`` is the multiplier (``model.logit_scale.exp()``). Returns
    ``R / B_global * sum of this rank's 0.5 * (row_i + column_i)``: the local mean for equal
    batches; the mean over ranks is :func:`fastcl.clip_loss` on the concatenated batch.
    ``mode``: "auto", "gather" or "ring", as :func:`info_nce`.

    Example::

        >>> loss = fastcl.distributed.clip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), model.logit_scale.exp())
    """
    check_embeddings("image_features", image_features, "(B, D)", 2)
    check_embeddings("text_features", text_features, "(B, D)", 2)
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and text_features must have the same shape (B, D), got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    temperature = logit_scale_temperature(logit_scale)
    return info_nce(image_features, text_features, temperature=temperature, symmetric=True, backend=backend, group=group,
                    mode=mode)


def _softplus_block_sum(image_block, text, scale, bias):
    return F.softplus(image_block @ text.T * scale + bias).sum()


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                backend: str = "auto", group=None, mode: str = "auto") -> torch.Tensor:
    r"""SigLIP loss with every rank's texts as negatives of the local images.

    With z_ij = t x_i . y_j + b over local images i and all texts j (its own text the only
    positive), ``-log sigmoid(z) = softplus(z) - z``, so

        L_r = R / B_global * (sum_ij softplus(z_ij) - sum_i z_{i, own(i)})

    (the local ``1/B_r`` normalization of open_clip's SigLIP for equal batches). Row blocks are
    recomputed in backward (activation checkpointing), so memory stays O((B_r + B_global) D);
    ``backend="naive"`` materializes the B_r x B_global logits instead (the plain loss, as a
    baseline), every other backend takes the blocks. ``mode="ring"`` passes the text blocks
    around the ranks instead of all-gathering them (memory per rank flat in the number of ranks).

    Example::

        >>> loss = fastcl.distributed.siglip_loss(img, txt, model.logit_scale.exp(), model.logit_bias)
    """
    _, world = _group_info(group)
    check_embeddings("image_features", image_features, "(B, D)", 2)
    check_embeddings("text_features", text_features, "(B, D)", 2)
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and text_features must have the same shape (B, D), got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    check_same_device(image_features=image_features, text_features=text_features)
    check_choice("backend", backend, BACKENDS)
    check_choice("mode", mode, MODES)
    for name, value in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                raise ValueError(f"{name} must be a float or a floating scalar tensor, got {value.dtype} of shape {tuple(value.shape)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float or a scalar tensor, got {type(value).__name__}")
    batch = image_features.shape[0]
    per_rank = _gather_ints([batch, image_features.shape[1]], image_features.device, group)
    _check_uniform("the embedding size D", [s[1] for s in per_rank])
    sizes = [s[0] for s in per_rank]

    dtype = compute_dtype(image_features)
    scale = _average_scalar_gradient(logit_scale, group)
    bias = _average_scalar_gradient(logit_bias, group)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(dtype).reshape(())
    if isinstance(bias, torch.Tensor):
        bias = bias.to(dtype).reshape(())
    image = image_features.to(dtype)
    mode = choose_mode(mode, sum(sizes), image.shape[1], text_features.element_size(), image.device)
    if mode == "ring":
        as_tensor = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=dtype, device=image.device)
        rows = ring_sigmoid_rows(image, text_features.to(dtype), as_tensor(scale), as_tensor(bias), sizes, group)
        return rows.sum() * (world / float(sum(sizes)))
    texts = all_gather_rows(text_features, group=group, local_first=True, sizes=sizes).to(dtype)

    total = 0.0
    # a GPU wants far larger blocks than the CPU's cache-sized default (a few rows of a global
    # batch of a million would re-read every gathered text per row)
    budget = DEFAULT_BLOCK_BYTES if image.device.type == "cpu" else ACCELERATOR_BLOCK_BYTES
    step = batch if backend == "naive" else max(1, min(batch, block_rows_for(texts.shape[0], image.element_size(), budget)))
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (image, texts, scale, bias))
    for row0 in range(0, batch, step):
        block = image[row0:row0 + step]
        if needs_grad and backend != "naive":
            total = total + checkpoint(_softplus_block_sum, block, texts, scale, bias, use_reentrant=False)
        else:
            total = total + _softplus_block_sum(block, texts, scale, bias)
    positives = (image * texts[:batch]).sum(-1) * scale + bias
    return (total - positives.sum()) * (world / float(sum(sizes)))
