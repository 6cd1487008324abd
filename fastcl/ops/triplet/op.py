"""``fastcl::triplet_hardest_negatives``: the blocked search as a custom op with a fake (shape)
implementation, so ``torch.compile`` traces one opaque op. It returns indices (no gradient):
the loss built on them is plain differentiable PyTorch (:mod:`.chunked`)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..._tracing import lazy_dynamo_disable
from .chunked import hardest_negatives


@torch.library.custom_op("fastcl::triplet_hardest_negatives", mutates_args=())
def hardest_negatives_op(anchor: Tensor, positive: Tensor) -> Tensor:
    return hardest_negatives(anchor, positive)


@hardest_negatives_op.register_fake
def _(anchor: Tensor, positive: Tensor) -> Tensor:
    return anchor.new_empty((anchor.shape[0],), dtype=torch.int64)


lazy_dynamo_disable(hardest_negatives_op)  # an eager call must not import torch._dynamo
