"""SigLIP sigmoid loss (Zhai et al.), chunked: no B x B tensor.

    L = -(1/B) sum_ij log sigmoid(y_ij (t x_i.y_j + b)),  y = +1 on the diagonal, -1 elsewhere

``logit_scale`` is the multiplier t (open_clip passes ``logit_scale.exp()``), ``logit_bias`` the
bias b; floats or scalar tensors (tensors get their gradients). Equals open_clip's ``SigLipLoss``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..common.backends import resolve_backend
from ..common.checks import autocast_disabled, input_dtypes
from . import naive
from .op import siglip_op
from .options import EXTRA_BACKENDS, check_siglip_args

__all__ = ["siglip_loss", "SigLipLoss"]



def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                backend: str = "auto", return_stats: bool = False):
    r"""SigLIP loss of paired (B, D) image and text features.

    ``return_stats=True`` returns ``(loss, stats)``: per image row ``lse`` (log-sum-exp of its
    logits ``logit_scale * x_i . y_j + logit_bias``), ``positive_logit`` (j = i) and ``rank``
    (texts with a strictly larger logit than its own; 0 = top-1), per text the ``column_*``
    ones; one extra pass without gradients, no B x B tensor.

    Example::

        >>> loss = fastcl.siglip_loss(img, txt, model.logit_scale.exp(), model.logit_bias)
    """
    device_type = image_features.device.type if isinstance(image_features, torch.Tensor) else "cpu"
    cast, autocast = input_dtypes(device_type, image_features=image_features, text_features=text_features)
    image_features, text_features = cast["image_features"], cast["text_features"]
    logit_scale, logit_bias = check_siglip_args(image_features, text_features, logit_scale, logit_bias, backend)
    batch = image_features.shape[0]
    chosen = resolve_backend(backend, image_features.device, EXTRA_BACKENDS, logits=batch * batch)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    if chosen in EXTRA_BACKENDS:
        EXTRA_BACKENDS[chosen](image_features)
    with autocast_disabled(device_type, autocast):
        if chosen == "naive":
            loss = naive.siglip_loss(image_features, text_features, logit_scale, logit_bias)
        else:  # every other backend runs in the fastcl::siglip_forward custom op
            loss = siglip_op(image_features, text_features, logit_scale, logit_bias, chosen)
    if not return_stats:
        return loss
    return loss, _statistics(image_features, text_features, logit_scale, logit_bias)


def _statistics(image_features, text_features, logit_scale, logit_bias) -> dict:
    from ..info_nce import pair_statistics

    scale = float(logit_scale.detach().reshape(())) if isinstance(logit_scale, torch.Tensor) else float(logit_scale)
    bias = float(logit_bias.detach().reshape(())) if isinstance(logit_bias, torch.Tensor) else float(logit_bias)
    stats = pair_statistics(image_features, text_features, 1.0 / scale)
    for name in ("lse", "positive_logit", "column_lse", "column_positive_logit"):
        stats[name] = stats[name] + bias
    return stats


class SigLipLoss(nn.Module):
    r"""SigLIP sigmoid loss with its learnable scale and bias (initialised to log 10 and -10).

    Example::

        >>> criterion = fastcl.SigLipLoss()
        >>> loss = criterion(image_features, text_features)
    """

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0, backend: str = "auto"):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.backend = backend

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return siglip_loss(image_features, text_features, self.logit_scale.exp(), self.logit_bias, backend=self.backend)
