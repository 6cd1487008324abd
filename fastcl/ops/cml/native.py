"""CML's scan through the native CPU kernel (csrc/cpu/cml.cpp): one pass, parallel over rows."""
from __future__ import annotations

from typing import Optional

import torch

from ..._native import typed_kernel
from ..common.blocks import block_rows_for
from ..common.gradients import compute_dtype
from .chunked import BLOCK_ELEMENTS, ScanStatistics


def native_scan(users, positives, negatives: Optional[torch.Tensor], negative_indices: Optional[torch.Tensor],
                item_table: Optional[torch.Tensor], margin: float) -> ScanStatistics:
    """The scan in C++ (one pass, parallel over rows). float32/float64 data go in as they are;
    other dtypes are widened, the item table once, dense negatives one row block at a time."""
    dtype = compute_dtype(users)
    batch, dim = users.shape
    u = users.detach().to(dtype).contiguous()
    p = positives.detach().to(dtype).contiguous()
    kernel = typed_kernel("cml_scan", dtype)
    positive_distance = torch.empty(batch, dtype=dtype)
    closest_distance = torch.empty(batch, dtype=dtype)
    closest = torch.empty(batch, dtype=torch.int64)
    impostors = torch.empty(batch, dtype=dtype)
    common = dict(margin=margin, dim=dim, num_threads=torch.get_num_threads())
    if negatives is None:
        table = item_table.detach().to(dtype).contiguous()
        indices = negative_indices.contiguous()
        window = indices.shape[1]
        kernel(users=u.data_ptr(), positives=p.data_ptr(), negatives=table.data_ptr(), indices=indices.data_ptr(),
               rows=batch, window=window, positive_distance_out=positive_distance.data_ptr(),
               closest_distance_out=closest_distance.data_ptr(), closest_out=closest.data_ptr(),
               impostors_out=impostors.data_ptr(), **common)
        return ScanStatistics(positive_distance, closest_distance, closest, impostors)
    window = negatives.shape[1]
    dense = negatives.detach()
    same = dense.dtype == dtype and dense.is_contiguous()
    step = batch if same else min(batch, block_rows_for(window * dim, 1, BLOCK_ELEMENTS))
    for row0 in range(0, batch, step):
        row1 = min(batch, row0 + step)
        block = dense[row0:row1] if same else dense[row0:row1].to(dtype).contiguous()
        kernel(users=u[row0:].data_ptr(), positives=p[row0:].data_ptr(), negatives=block.data_ptr(), indices=0,
               rows=row1 - row0, window=window, positive_distance_out=positive_distance[row0:].data_ptr(),
               closest_distance_out=closest_distance[row0:].data_ptr(), closest_out=closest[row0:].data_ptr(),
               impostors_out=impostors[row0:].data_ptr(), **common)
    return ScanStatistics(positive_distance, closest_distance, closest, impostors)
