"""Fused InfoNCE and its family: CLIP, NT-Xent (SimCLR), SupCon, DPR / MNRL.

Maths (s_ij = q_i . k_j / tau, candidates(i) = in-batch keys plus i's hard negatives)::

    L_i = -s_{i,pos(i)} + log sum_{j in candidates(i)} exp(s_ij)

Every backend shares :func:`~fastcl.ops.info_nce.options.check_info_nce_args` and returns the
same values; ``naive`` materializes the B x N logits (reference), ``torch`` and ``cpu`` walk
over row blocks and never do.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import nn

from ...validation import checks_values
from ..common.backends import resolve_backend as _resolve_backend
from . import extras, naive
from .dense import dense_info_nce, small_plain_call
from .op import info_nce_op
from ..common.checks import autocast_disabled, check_embeddings, check_same_device, check_scalar, input_dtypes
from .chunked import count_positives
from .options import MASK, PAIRWISE, SUPCON, check_info_nce_args, check_temperature
from .segments import PAIRED, PRIVATE, SHARED, Segment, SegmentOptions, segmented_loss

_log = logging.getLogger("fastcl")

__all__ = ["info_nce", "clip_loss", "nt_xent", "resolve_backend", "pair_statistics", "InfoNCELoss",
           # building blocks for the layers above the ops (distributed losses, adapters)
           "logit_scale_temperature", "count_positives", "check_info_nce_args", "MASK", "SUPCON", "PAIRWISE",
           "Segment", "SegmentOptions", "segmented_loss", "SHARED", "PAIRED", "PRIVATE"]

# GPU backends implemented for this op (beyond naive / torch / cpu); gpu.py adds them here:
# name -> check(query, options, labels) raising ValueError for what that backend refuses.
EXTRA_BACKENDS = {}
from .gpu import register_gpu_backends  # noqa: E402  (needs EXTRA_BACKENDS defined)

register_gpu_backends(EXTRA_BACKENDS)


def resolve_backend(backend: str, device: torch.device, extra_backends=None, logits: Optional[int] = None,
                    normalized: bool = True) -> str:
    """The backend an InfoNCE call takes (:func:`fastcl.ops.common.backends.resolve_backend` with
    InfoNCE's GPU table, or ``extra_backends``). The ``fastcl`` logger names it at DEBUG level
    for every call."""
    return _resolve_backend(backend, device, EXTRA_BACKENDS if extra_backends is None else extra_backends, logits,
                            normalized)


def pair_statistics(query: torch.Tensor, key: torch.Tensor, temperature) -> dict:
    """Row and column statistics of the paired logits ``q_i . k_j / temperature`` (pair i's
    positive on the diagonal), as ``return_stats`` reports them, without a B x N tensor: for
    the ops built on the same similarities (SigLIP adds its bias)."""
    from .options import InfoNCEOptions

    return extras.statistics(query, key, None, temperature, None, None, None, InfoNCEOptions(symmetric=True))


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
    multi_positive: str = "mask",
    false_negative_margin: Optional[float] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    memory_bank=None,
    sample_index: Optional[torch.Tensor] = None,
    guide=None,
    guide_margin: float = 0.0,
    guide_margin_strategy: str = "absolute",
    return_stats: bool = False,
):
    r"""InfoNCE loss of each query against shared keys (and optional private hard negatives).

    ``s_ij = q_i . k_j / temperature``; ``L_i = -s_{i,pos(i)} + log sum_{j in C_i} exp(s_ij)``
    where ``C_i`` holds every key and query i's hard negatives, less what the options mask.

    Args:
        query: (B, D) float16 / bfloat16 / float32 / float64.
        key: (N, D) candidates shared by every query (in-batch positives plus extra negatives,
            e.g. DPR's ``cat([positives, hard_negatives])``).
        positive: (B,) int64 index of each query's positive in ``key``; default ``arange(B)``.
        hard_negatives: (B, H, D) negatives private to each query.
        temperature: float or scalar tensor (a tensor that requires grad gets its gradient).
        normalize: cosine similarity (L2 normalization fused into the op and its backward).
        symmetric: also the key->query direction over the B x B in-batch block; the loss is the
            mean of both directions (CLIP).
        exclude_self: drop logit (i, i) (NT-Xent when query and key are the same set).
        labels, key_labels: (B,), (N,) integer labels; keys sharing the query's label are not
            negatives. ``multi_positive="mask"`` removes them from the denominator,
            ``"supcon"`` averages over them as positives (SupCon), ``"pairwise"`` makes one
            term per positive pair (pytorch-metric-learning's NTXentLoss; "mean" divides by the
            number of pairs, "none" sums each anchor's terms).
        false_negative_margin: drop a negative whose similarity exceeds the positive's minus m.
        label_smoothing: as ``F.cross_entropy(label_smoothing=...)`` over the row's candidates.
        reduction: "mean" | "sum" | "none" (per query row).
        backend: "auto" | "naive" | "torch" | "cpu" | "triton" | "cuda".
        memory_bank: a :class:`fastcl.MemoryBank` or an (M, D) tensor of extra negatives shared
            by every query (no gradient), read in place. With a ``MemoryBank`` holding labels,
            bank entries sharing the query's label (``labels``) are not negatives; holding
            sample indices, entries with the query's ``sample_index`` (B,) are not either.
        guide: (guide_query (B, G), guide_key (N, G)): a guide model's embeddings (GIST). Key j
            is dropped from query i's candidates when the guide's cosine similarity
            ``g_ij > g_i,pos - guide_margin`` (``guide_margin_strategy="absolute"``) or
            ``> g_i,pos - |g_i,pos| * guide_margin`` ("relative").
        return_stats: also return a dict of per-anchor ``lse`` (log-sum-exp of the kept logits),
            ``positive_logit`` and ``rank`` (how many kept candidates have a strictly larger
            logit than the positive; 0 = top-1), and for ``symmetric`` ``column_lse``,
            ``column_positive_logit``, ``column_rank``. No B x N tensor.
            (``multi_positive="mask"`` only.)

        ``memory_bank`` and ``guide`` run on the chunked PyTorch segment driver
        (``segments.py``) whatever ``backend`` says; ``return_stats`` alone runs the loss on
        ``backend`` and the statistics in one extra pass without gradients.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or (B,) with ``reduction="none"``;
        ``(loss, stats)`` with ``return_stats=True``.

    Example::

        >>> q, k = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = fastcl.info_nce(q, k, temperature=0.05, normalize=True)
    """
    if (backend == "auto" and positive is None and hard_negatives is None and labels is None and key_labels is None
            and multi_positive == MASK and not exclude_self and false_negative_margin is None
            and type(label_smoothing) is float and label_smoothing == 0.0 and memory_bank is None
            and sample_index is None and guide is None and type(guide_margin) is float
            and guide_margin_strategy == "absolute" and return_stats is False):
        loss = small_plain_call(query, key, temperature, normalize, symmetric, reduction)
        if loss is not None:
            _log.debug("fastcl: backend='auto' -> 'naive' (the plain loss, materialized)")
            return loss
    device_type = query.device.type if isinstance(query, torch.Tensor) else "cpu"
    cast, autocast = input_dtypes(device_type, query=query, key=key, hard_negatives=hard_negatives)
    query, key, hard_negatives = cast["query"], cast["key"], cast["hard_negatives"]
    options, positive, labels, key_labels, temperature = check_info_nce_args(
        query, key, positive, hard_negatives, temperature, normalize, symmetric, exclude_self,
        labels, key_labels, multi_positive, false_negative_margin, label_smoothing, reduction, backend,
    )
    bank, bank_labels, bank_indices, guide = extras.check_extras(
        query, key, options, memory_bank, sample_index, guide, guide_margin, guide_margin_strategy, return_stats,
        hard_negatives)
    if bank is not None or guide is not None:
        _log.debug("fastcl.info_nce: memory_bank / guide -> segment driver")
        return extras.driver_info_nce(query, key, hard_negatives, temperature, positive, labels, key_labels, options,
                                      bank, bank_labels, bank_indices, sample_index, guide, guide_margin,
                                      guide_margin_strategy, return_stats)
    loss = _info_nce_loss(query, key, hard_negatives, temperature, positive, labels, key_labels, options, backend,
                          device_type, autocast)
    if not return_stats:
        return loss
    return loss, extras.statistics(query, key, hard_negatives, temperature, positive, labels, key_labels, options)


def _info_nce_loss(query, key, hard_negatives, temperature, positive, labels, key_labels, options, backend,
                   device_type, autocast):
    hard = hard_negatives.shape[1] if hard_negatives is not None else 0
    chosen = resolve_backend(backend, query.device, logits=query.shape[0] * (key.shape[0] + hard),
                             normalized=options.normalize)
    if chosen in EXTRA_BACKENDS:
        EXTRA_BACKENDS[chosen](query, options, labels)  # what this GPU backend refuses
    with autocast_disabled(device_type, autocast):
        if chosen != "naive":
            return info_nce_op(query, key, hard_negatives, temperature, positive, labels, key_labels, options, chosen)
        if backend != "naive":  # auto's small calls (and torch.func): materialize the logits
            loss = dense_info_nce(query, key, positive, hard_negatives, temperature, labels, key_labels, options)
        else:
            loss = naive.info_nce_with_options(query, key, positive, hard_negatives, temperature, labels, key_labels,
                                               options)
    if hard_negatives is not None and hard_negatives.shape[1] == 0 and hard_negatives.requires_grad:
        loss = loss + hard_negatives.sum() * 0  # an empty hard-negative set gets an (empty) zero gradient, as on every path
    return loss


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *, backend: str = "auto",
              return_stats: bool = False):
    r"""CLIP loss: symmetric InfoNCE ``0.5 * (CE(rows) + CE(columns))`` of ``logit_scale * I @ T.T``.

    ``logit_scale`` is the multiplier (open_clip's ``logit_scale.exp()``), a float or scalar
    tensor that gets its gradient. Features are used as given (CLIP normalizes them in the
    model). Equals open_clip's ``ClipLoss``.

    Example::

        >>> loss = fastcl.clip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), model.logit_scale.exp())

    ``return_stats=True`` returns ``(loss, stats)`` as :func:`info_nce` (image rows: ``lse``,
    ``positive_logit``, ``rank``; text rows: ``column_*``), in logit units.
    """
    check_embeddings("image_features", image_features, "(B, D)", 2)
    check_embeddings("text_features", text_features, "(B, D)", 2)
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and text_features must have the same shape (B, D), got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    temperature = logit_scale_temperature(logit_scale)
    return info_nce(image_features, text_features, temperature=temperature, symmetric=True, backend=backend,
                    return_stats=return_stats)


def logit_scale_temperature(logit_scale):
    """The temperature 1 / logit_scale of CLIP's multiplier (a float or a scalar tensor, whose
    gradient flows), after checking the scale itself (the error names ``logit_scale``)."""
    logit_scale = check_scalar("logit_scale", logit_scale)
    if isinstance(logit_scale, torch.Tensor):
        # the temperature check would name "temperature": check the scale itself (CPU values
        # only; a GPU tensor would need a host sync, and compiled graphs skip value checks)
        if logit_scale.device.type == "cpu" and checks_values(logit_scale):
            value = float(logit_scale.detach().reshape(()))
            if not value > 0 or math.isinf(value):
                raise ValueError(f"logit_scale must be a finite value > 0, got {value}")
    elif not logit_scale > 0 or math.isinf(logit_scale):
        raise ValueError(f"logit_scale must be a finite value > 0, got {logit_scale}")
    return 1.0 / logit_scale


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature=0.5, *, normalize: bool = True, backend: str = "auto") -> torch.Tensor:
    r"""NT-Xent (SimCLR): the 2B views ``cat([z1, z2])`` against each other, self excluded.

    View a of sample i has view b of i as its positive and the other 2B - 2 views as negatives;
    the loss is the mean over the 2B anchors. Equals pytorch-metric-learning's ``NTXentLoss`` on
    ``cat([z1, z2])`` with labels ``cat([arange(B), arange(B)])``.

    Example::

        >>> loss = fastcl.nt_xent(projector(encoder(view1)), projector(encoder(view2)), temperature=0.5)
    """
    check_embeddings("z1", z1, "(B, D)", 2)
    check_embeddings("z2", z2, "(B, D)", 2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    check_same_device(z1=z1, z2=z2)
    batch = z1.shape[0]
    views = torch.cat([z1, z2], dim=0)
    index = torch.arange(batch, device=z1.device)
    positive = torch.cat([index + batch, index])
    return info_nce(views, views, positive=positive, temperature=temperature, normalize=normalize,
                    exclude_self=True, backend=backend)


class InfoNCELoss(nn.Module):
    r"""InfoNCE as a module; the options of :func:`fastcl.info_nce` are fixed at construction.

    With ``learnable_temperature=True`` the module owns ``logit_scale`` = log(1/temperature)
    (CLIP's parametrization, initialised from ``temperature``); the scale used is
    ``min(exp(logit_scale), max_scale)`` so it never exceeds 100 by default, and the parameter
    gets its gradient from the fused op.

    Example::

        >>> criterion = fastcl.InfoNCELoss(temperature=0.07, normalize=True, learnable_temperature=True)
        >>> loss = criterion(query_embeddings, key_embeddings)
    """

    def __init__(self, temperature: float = 0.07, *, learnable_temperature: bool = False, max_scale: float = 100.0,
                 normalize: bool = False, symmetric: bool = False, exclude_self: bool = False,
                 multi_positive: str = "mask", false_negative_margin: Optional[float] = None,
                 label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        temperature = check_temperature(temperature)
        if not max_scale > 0:
            raise ValueError(f"max_scale must be > 0, got {max_scale}")
        self.learnable_temperature = learnable_temperature
        self.max_scale = float(max_scale)
        if learnable_temperature and 1.0 / temperature > max_scale:
            raise ValueError(
                f"temperature={temperature} with learnable_temperature=True starts at scale 1/temperature = "
                f"{1.0 / temperature:g} > max_scale={max_scale:g}: the clamp would give the scale zero gradient and it "
                f"would never learn; pass temperature >= 1/max_scale = {1.0 / max_scale:g} or a larger max_scale"
            )
        if learnable_temperature:
            logit_scale = torch.tensor(math.log(1.0 / temperature))
            if logit_scale.exp() > self.max_scale:  # float32 rounding at temperature = 1/max_scale
                logit_scale = torch.nextafter(logit_scale, torch.tensor(-math.inf))
            self.logit_scale = nn.Parameter(logit_scale)
        else:
            self.temperature = temperature
        self.options = dict(normalize=normalize, symmetric=symmetric, exclude_self=exclude_self,
                            multi_positive=multi_positive, false_negative_margin=false_negative_margin,
                            label_smoothing=label_smoothing, reduction=reduction, backend=backend)

    def current_temperature(self):
        if self.learnable_temperature:
            return 1.0 / self.logit_scale.exp().clamp(max=self.max_scale)
        return self.temperature

    def forward(self, query: torch.Tensor, key: torch.Tensor, *, positive: Optional[torch.Tensor] = None,
                hard_negatives: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                key_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return info_nce(query, key, positive=positive, hard_negatives=hard_negatives,
                        temperature=self.current_temperature(), labels=labels, key_labels=key_labels, **self.options)

    def extra_repr(self) -> str:
        temperature = "learnable" if self.learnable_temperature else f"temperature={self.temperature}"
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{temperature}, {options}"
