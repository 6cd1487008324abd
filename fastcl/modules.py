"""``nn.Module`` wrappers around the functional losses."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .ops.info_nce import info_nce
from .ops.info_nce.options import check_temperature
from .ops.siglip import siglip_loss


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
