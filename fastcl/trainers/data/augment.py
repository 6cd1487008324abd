"""SimCLR views of grayscale images with kornia (no torchvision).

The pipeline follows SimCLR's (random resized crop, flip, colour jitter, blur) as it fits
single-channel images: colour jitter becomes brightness and contrast jitter, and Gaussian pixel
noise is added as the grayscale stand-in for colour distortion's strength.

Randomness: kornia draws from torch's global generator. :class:`SimCLRAugment` ``(images, seed=s)``
runs under ``torch.random.fork_rng`` seeded with ``s``, so a view depends only on the images and
the seed and the caller's random stream is left untouched; without ``seed`` it consumes the
global stream like any other torch op (the engine seeds it once per run).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn


class SimCLRAugment(nn.Module):
    """Random views of (B, C, S, S) images in [0, 1].

    Args:
        size: output side (default: the input's).
        crop_scale: area range of the random resized crop (SimCLR: (0.08, 1); 28-pixel images
            keep more: (0.2, 1)).
        flip: probability of a horizontal flip.
        brightness, contrast: jitter strengths (factors drawn from [1 - s, 1 + s]).
        jitter_p: probability of the jitter.
        blur_p, blur_sigma: probability and sigma range of a 3 x 3 Gaussian blur.
        noise_p, noise_std: probability and std of additive Gaussian noise.
    """

    def __init__(self, size: Optional[int] = None, *, crop_scale: Tuple[float, float] = (0.2, 1.0), flip: float = 0.5,
                 brightness: float = 0.4, contrast: float = 0.4, jitter_p: float = 0.8, blur_p: float = 0.5,
                 blur_sigma: Tuple[float, float] = (0.1, 1.5), noise_p: float = 0.5, noise_std: float = 0.05):
        super().__init__()
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        self.size = size
        self.crop_scale = tuple(crop_scale)
        self._built_for = None
        self.options = dict(flip=flip, brightness=brightness, contrast=contrast, jitter_p=jitter_p, blur_p=blur_p,
                            blur_sigma=tuple(blur_sigma), noise_p=noise_p, noise_std=noise_std)
        self.pipeline = None

    def _build(self, side: int):
        import kornia.augmentation as K

        o = self.options
        self.pipeline = nn.Sequential(
            K.RandomResizedCrop((side, side), scale=self.crop_scale),
            K.RandomHorizontalFlip(p=o["flip"]),
            K.ColorJiggle(brightness=o["brightness"], contrast=o["contrast"], p=o["jitter_p"]),
            K.RandomGaussianBlur((3, 3), o["blur_sigma"], p=o["blur_p"]),
            K.RandomGaussianNoise(std=o["noise_std"], p=o["noise_p"]),
        )
        self._built_for = side

    def forward(self, images: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        side = self.size or images.shape[-1]
        if self._built_for != side:
            self._build(side)
        with torch.no_grad():
            if seed is None:
                return self.pipeline(images).clamp_(0.0, 1.0)
            devices = [images.device] if images.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                return self.pipeline(images).clamp_(0.0, 1.0)

    def two_views(self, images: torch.Tensor, seed: Optional[int] = None):
        """Two independent views of each image (the second seeded with ``seed + 1``)."""
        return self(images, seed), self(images, None if seed is None else seed + 1_000_003)
