"""Triton kernel for the CML scan (see :mod:`.chunked` for its contract): one program owns
BLOCK_B rows, walks over their W sampled negatives (dense rows or item-table rows by index,
read in place) and keeps the running minimum, its index and the impostor count on chip.
Nothing of size B x W is written."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked import ScanStatistics

BLOCK_B = 32


@triton.jit
def cml_scan_kernel(
    users_ptr, positives_ptr, negatives_ptr, indices_ptr,
    positive_distance_ptr, closest_distance_ptr, closest_ptr, impostors_ptr,
    batch, window, dim, margin,
    INDEXED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_valid = rows < batch
    positive = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_valid[:, None] & (d < dim)[None, :]
        u = tl.load(users_ptr + rows[:, None] * dim + d[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.load(positives_ptr + rows[:, None] * dim + d[None, :], mask=mask, other=0.0).to(tl.float32)
        positive += tl.sum((u - p) * (u - p), axis=1)
    threshold = margin + positive
    best = tl.full((BLOCK_B,), float("inf"), dtype=tl.float32)
    best_k = tl.zeros((BLOCK_B,), dtype=tl.int64)
    has_nan = tl.zeros((BLOCK_B,), dtype=tl.int1)
    count = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for k in range(0, window):
        if INDEXED:
            item = tl.load(indices_ptr + rows * window + k, mask=row_valid, other=0)
        else:
            item = rows * window + k
        distance = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = row_valid[:, None] & (d < dim)[None, :]
            u = tl.load(users_ptr + rows[:, None] * dim + d[None, :], mask=mask, other=0.0).to(tl.float32)
            n = tl.load(negatives_ptr + item[:, None] * dim + d[None, :], mask=mask, other=0.0).to(tl.float32)
            distance += tl.sum((u - n) * (u - n), axis=1)
        is_nan = distance != distance
        first_nan = is_nan & ~has_nan
        better = (distance < best) & ~has_nan
        best_k = tl.where(first_nan | better, k, best_k)
        best = tl.where(better, distance, best)
        has_nan = has_nan | is_nan
        count += tl.where((threshold - distance) > 0, 1.0, 0.0)
    best = tl.where(has_nan, float("nan"), best)
    tl.store(positive_distance_ptr + rows, positive, mask=row_valid)
    tl.store(closest_distance_ptr + rows, best, mask=row_valid)
    tl.store(closest_ptr + rows, best_k, mask=row_valid)
    tl.store(impostors_ptr + rows, count, mask=row_valid)


def triton_scan(users, positives, negatives, negative_indices, item_table, margin: float) -> ScanStatistics:
    """The scan on the GPU (or in the interpreter); statistics in float32."""
    batch, dim = users.shape
    device = users.device
    u, p = users.detach().contiguous(), positives.detach().contiguous()
    if negatives is None:
        source, indices, indexed = item_table.detach().contiguous(), negative_indices.contiguous(), True
        window = indices.shape[1]
    else:
        source, indices, indexed = negatives.detach().contiguous(), u, False
        window = negatives.shape[1]
    outputs = [torch.empty(batch, dtype=torch.float32, device=device) for _ in range(2)]
    closest = torch.empty(batch, dtype=torch.int64, device=device)
    impostors = torch.empty(batch, dtype=torch.float32, device=device)
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    cml_scan_kernel[(triton.cdiv(batch, BLOCK_B),)](
        u, p, source, indices, outputs[0], outputs[1], closest, impostors, batch, window, dim, float(margin),
        INDEXED=indexed, BLOCK_B=BLOCK_B, BLOCK_D=block_d,
    )
    return ScanStatistics(outputs[0], outputs[1], closest, impostors)
