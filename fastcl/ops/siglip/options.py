"""SigLIP's backends and argument checks (the shared checks are in :mod:`..common.checks`).

GPU backends: Triton only. The native CUDA kernels cover InfoNCE; SigLIP's chunked path already
runs on any CUDA device, and its Triton kernel is a single pass.
"""
from __future__ import annotations

from ..common.checks import (BACKENDS, check_choice, check_embeddings, check_same_device, check_scalar,
                             check_scalar_device)
from ..common.gpu import check_triton_device, triton_installed

# GPU backends of this op: name -> the check of what it refuses
EXTRA_BACKENDS = {"triton": check_triton_device} if triton_installed() else {}


def check_siglip_args(image_features, text_features, logit_scale, logit_bias, backend: str):
    """Checks every argument; returns (logit_scale, logit_bias) as floats or scalar tensors."""
    check_embeddings("image_features", image_features, "(B, D)", 2)
    check_embeddings("text_features", text_features, "(B, D)", 2)
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and text_features must have the same shape (B, D), got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.dtype != text_features.dtype:
        raise TypeError(f"image_features and text_features must have the same dtype, got {image_features.dtype} and {text_features.dtype}")
    check_same_device(image_features=image_features, text_features=text_features)
    logit_scale = check_scalar("logit_scale", logit_scale)
    logit_bias = check_scalar("logit_bias", logit_bias)
    check_scalar_device("logit_scale", logit_scale, image_features)
    check_scalar_device("logit_bias", logit_bias, image_features)
    check_choice("backend", backend, BACKENDS)
    return logit_scale, logit_bias
