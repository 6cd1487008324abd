"""The collaborative contrastive loss through the native CPU kernel (csrc/cpu/collaborative.cpp:
one page at a time, parallel over pages), with the contract of :mod:`.chunked`'s implementations."""
from __future__ import annotations

from typing import Optional

import torch

from ..._native import typed_kernel
from ..common.gradients import compute_dtype
from .naive import NORM_EPS


def native_pages(items, clicks, mask, trigger: Optional[torch.Tensor], weights, temperature: float, normalize: bool,
                 compute_grads: bool):
    dtype = compute_dtype(items)
    pages, length, dim = items.shape
    e = items.detach().to(dtype).contiguous()
    t = trigger.detach().to(dtype).contiguous() if trigger is not None else None
    labels = clicks.to(torch.int64).contiguous()
    valid = mask.to(torch.uint8).contiguous()
    w = weights.to(dtype).contiguous()
    losses = torch.empty(pages, length, dtype=dtype)
    d_items = torch.zeros(pages, length, dim, dtype=dtype) if compute_grads else None
    d_trigger = torch.empty(pages, dim, dtype=dtype) if compute_grads and t is not None else None
    kernel = typed_kernel("collaborative_pages", dtype)
    kernel(items=e.data_ptr(), clicks=labels.data_ptr(), mask=valid.data_ptr(), trigger=t.data_ptr() if t is not None else 0,
           weights=w.data_ptr(), pages=pages, length=length, dim=dim, temperature=temperature, normalize=normalize,
           eps=NORM_EPS, with_grad=compute_grads, losses_out=losses.data_ptr(),
           d_items_out=d_items.data_ptr() if d_items is not None else 0,
           d_trigger_out=d_trigger.data_ptr() if d_trigger is not None else 0, num_threads=torch.get_num_threads())
    if d_items is not None:
        d_items = d_items.to(items.dtype)
    if d_trigger is not None:
        d_trigger = d_trigger.to(trigger.dtype)
    return losses, d_items, d_trigger
