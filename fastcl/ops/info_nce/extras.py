"""The ``info_nce`` options served by the segment driver (``segments.py``): memory-bank
negatives, the guide mask (GIST) and ``return_stats``.

Routing rule: a call with ``memory_bank`` or ``guide`` runs entirely on the segment driver
(PyTorch ops, any device). A call with only ``return_stats`` runs the loss on the backend it
would take anyway and the statistics in one extra pass of the driver without gradients.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..common.checks import check_choice, check_embeddings, check_float_tensor
from .options import MASK
from .segments import PRIVATE, SHARED, Segment, SegmentOptions, run_segments, segmented_loss
from ..common.gradients import compute_dtype

GUIDE_STRATEGIES = ("absolute", "relative")


def check_extras(query, key, options, memory_bank, sample_index, guide, guide_margin, guide_margin_strategy,
                 return_stats, hard_negatives):
    """Validate the extra arguments; returns (bank tensor or None, bank labels, bank indices, guide pair)."""
    from ...memory_bank import MemoryBank

    bank = bank_labels = bank_indices = None
    uses_driver = memory_bank is not None or guide is not None
    if uses_driver or return_stats:
        if options.multi_positive != MASK:
            raise ValueError(f"memory_bank, guide and return_stats need multi_positive='mask', got {options.multi_positive!r}")
    if uses_driver:
        if options.label_smoothing:
            raise ValueError("label_smoothing is not supported with memory_bank or guide")
        if options.symmetric:
            raise ValueError("symmetric=True is not supported with memory_bank or guide")
    if memory_bank is not None:
        if isinstance(memory_bank, MemoryBank):
            bank, bank_labels, bank_indices = memory_bank.negatives(), memory_bank.filled_labels(), memory_bank.filled_indices()
        elif isinstance(memory_bank, torch.Tensor):
            check_float_tensor("memory_bank", memory_bank, "(M, D)", 2)
            bank = memory_bank
        else:
            raise TypeError(f"memory_bank must be a fastcl.MemoryBank or a (M, D) tensor, got {type(memory_bank).__name__}")
        if bank.shape[1] != query.shape[1]:
            raise ValueError(f"memory_bank must hold rows of width D = {query.shape[1]}, got {tuple(bank.shape)}")
        if bank.device != query.device:
            raise ValueError(f"memory_bank is on {bank.device}, the query on {query.device}")
    if sample_index is not None:
        if not isinstance(sample_index, torch.Tensor) or tuple(sample_index.shape) != (query.shape[0],) \
                or sample_index.is_floating_point():
            raise ValueError(f"sample_index must be an integer tensor of shape (B,) = ({query.shape[0]},)")
        if memory_bank is None:
            raise ValueError("sample_index excludes memory-bank entries of the same sample: pass memory_bank")
    if guide is not None:
        if not isinstance(guide, (tuple, list)) or len(guide) != 2:
            raise TypeError("guide must be a pair (guide_query (B, G), guide_key (N, G)) of the guide model's embeddings")
        guide_query, guide_key = guide
        check_embeddings("guide[0]", guide_query, "(B, G)", 2)
        check_embeddings("guide[1]", guide_key, "(N, G)", 2)
        if guide_query.shape[0] != query.shape[0] or guide_key.shape[0] != key.shape[0] or guide_query.shape[1] != guide_key.shape[1]:
            raise ValueError(f"guide must be ((B, G), (N, G)) = (({query.shape[0]}, G), ({key.shape[0]}, G)), got "
                             f"{tuple(guide_query.shape)} and {tuple(guide_key.shape)}")
        if memory_bank is not None or (hard_negatives is not None and hard_negatives.shape[1] > 0):
            raise ValueError("guide covers the keys only: it cannot be combined with memory_bank or hard_negatives")
    check_choice("guide_margin_strategy", guide_margin_strategy, GUIDE_STRATEGIES)
    if isinstance(guide_margin, bool) or not isinstance(guide_margin, (int, float)):
        raise TypeError(f"guide_margin must be a float, got {type(guide_margin).__name__}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    return bank, bank_labels, bank_indices, guide


def _prepare(x, dtype, normalize):
    x = x.to(dtype)
    return F.normalize(x, dim=-1) if normalize else x


def _directions(query, key, hard_negatives, positive, labels, key_labels, options, bank, bank_labels, bank_indices,
                sample_index, guide, differentiable: bool):
    """(row segments, column segments or None, positive) in the compute dtype."""
    dtype = compute_dtype(query)
    context = torch.enable_grad() if differentiable else torch.no_grad()
    with context:
        q = _prepare(query, dtype, options.normalize)
        k = _prepare(key, dtype, options.normalize)
        h = None
        if hard_negatives is not None and hard_negatives.shape[1] > 0:
            h = _prepare(hard_negatives, dtype, options.normalize)
    batch = q.shape[0]
    if positive is None:
        positive = torch.arange(batch, device=q.device)
    guide_q = guide_k = None
    if guide is not None:
        guide_q = F.normalize(guide[0].detach().to(dtype), dim=-1)
        guide_k = F.normalize(guide[1].detach().to(dtype), dim=-1)
    rows = [Segment(q, k, SHARED, labels, key_labels, exclude_diagonal=options.exclude_self,
                    guide_anchors=guide_q, guide_candidates=guide_k)]
    if h is not None:
        rows.append(Segment(q, h, PRIVATE))
    if bank is not None and bank.shape[0] > 0:
        # a copy where autograd may come back for it: the bank is pushed to right after the loss,
        # and a create_graph backward recomputes the loss from these rows (O(M * D), against the
        # O(B * M * D) of the loss itself)
        bank_values = bank.detach().clone() if differentiable and torch.is_grad_enabled() else bank.detach()
        scale = None
        if bank_values.dtype != dtype:
            bank_values = bank_values.to(dtype)
        if options.normalize:
            scale = 1.0 / bank_values.norm(dim=-1).clamp_min(1e-12)
        rows.append(Segment(q, bank_values, SHARED,
                            anchor_labels=labels if bank_labels is not None else None, candidate_labels=bank_labels,
                            anchor_ids=sample_index if bank_indices is not None else None, candidate_ids=bank_indices,
                            candidate_scale=scale))
    columns = None
    if options.symmetric:
        column_labels = key_labels[:batch] if key_labels is not None else None
        columns = [Segment(k[:batch], q, SHARED, column_labels, labels, exclude_diagonal=options.exclude_self)]
    return rows, columns, positive


def driver_info_nce(query, key, hard_negatives, temperature, positive, labels, key_labels, options, bank, bank_labels,
                    bank_indices, sample_index, guide, guide_margin, guide_margin_strategy, return_stats):
    """The loss (and stats) of a call with a memory bank or a guide, on the segment driver."""
    rows, _, positive = _directions(query, key, hard_negatives, positive, labels, key_labels, options, bank,
                                    bank_labels, bank_indices, sample_index, guide, differentiable=True)
    segment_options = SegmentOptions(positive, options.margin, float(guide_margin), guide_margin_strategy == "relative")
    temperature = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature), dtype=torch.float64)
    return segmented_loss(rows, segment_options, temperature, options.reduction, return_stats)


@torch.no_grad()
def statistics(query, key, hard_negatives, temperature, positive, labels, key_labels, options) -> dict:
    """Per-anchor lse, positive_logit, rank (and the column_* ones of a symmetric loss)."""
    rows, columns, positive = _directions(query, key, hard_negatives, positive, labels, key_labels, options, None,
                                          None, None, None, None, differentiable=False)
    inv_temperature = 1.0 / float(temperature.detach().reshape(()) if isinstance(temperature, torch.Tensor) else temperature)
    _, _, stats = run_segments(rows, SegmentOptions(positive, options.margin), inv_temperature, stats=True)
    if columns is not None:
        column_positive = torch.arange(query.shape[0], device=query.device)
        _, _, column_stats = run_segments(columns, SegmentOptions(column_positive, options.margin), inv_temperature,
                                          stats=True)
        stats.update({f"column_{name}": value for name, value in column_stats.items()})
    return stats
