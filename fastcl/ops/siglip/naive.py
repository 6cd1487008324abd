"""Reference SigLIP loss: materializes the B x B logits (float64-capable)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common.gradients import compute_dtype

__all__ = ["siglip_loss"]


def siglip_loss(image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
    """SigLIP: -(1/B) sum_ij log sigmoid(y_ij (t x_i.y_j + b)), y = +1 on the diagonal, -1 elsewhere."""
    dtype = compute_dtype(image_features)
    x = image_features.to(dtype)
    y = text_features.to(dtype)
    logits = logit_scale * (x @ y.T) + logit_bias
    signs = 2 * torch.eye(x.shape[0], dtype=dtype, device=x.device) - 1
    return -F.logsigmoid(signs * logits).sum() / x.shape[0]
