"""CLIP (Radford et al., ICML'21) on Fashion-MNIST images with generated captions.

No image-caption pairs ship offline, so each training image is paired with a caption generated
from its class (:func:`~.data.captions.clip_captions`: 6 templates x 3 synonyms x 4 attribute
words per class, e.g. "a product shot of a lace-up running shoe"), drawn anew each time.

Model: an image tower (:class:`~.vision_models.SmallResNet` + linear projection, or the
pretrained EfficientNet-Lite0 with ``--image-encoder efficientnet_lite0``) and a text tower:
frozen pretrained MiniLM-L6 features of every caption (computed once, offline) with a trainable
2-layer projection, or a trainable bag of words (``--text-encoder bow``, the default for
synthetic data so smoke runs need no model files). Both outputs are L2-normalized; a learnable
``logit_scale`` starts at log(1/0.07) and is clamped to <= log(100) after every step, as CLIP's.
Loss: the symmetric InfoNCE of :func:`fastcl.clip_loss` (every rank's pairs under torchrun).

Evaluation: zero-shot top-1 on the test split with one prompt per class ("a photo of a
sneaker"); baseline ``untrained``: the same towers before training (also ``before``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import losses, vision_peers
from .config import TrainConfig, option
from .data.captions import class_prompts, clip_captions, sample_caption_ids
from .data.fashion_mnist import load_images
from .engine import Method
from .vision_evaluation import extract_features, zero_shot_accuracy
from .vision_models import CaptionTower, ImageEncoder, SmallResNet, caption_encoder_kind, efficientnet_lite0

DEFAULT_STEPS = 200
BENCH_ARGS = ["--data", "auto", "--steps", "6", "--batch-size", "256", "--eval-test", "2000"]
# other libraries run inside this trainer: label -> extra options (the bench suite runs them)
BENCH_PEERS = {"open_clip ClipLoss": ["--peer", "open_clip"]}
BENCH_BATCH_ARGS = ["--data", "auto", "--steps", "2", "--eval-test", "200"]
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class Config(TrainConfig):
    min_batch_size = 2  # in-batch negatives only: a batch of 1 has none
    batch_size: int = option(256, "global batch of (image, caption) pairs")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    warmup_steps: int = option(10, "linear warm-up steps")
    image_encoder: Literal["cnn", "efficientnet_lite0"] = option(
        "cnn", "cnn: a small ResNet trained from scratch; efficientnet_lite0: pretrained on ImageNet (64 px, RGB)")
    text_encoder: Literal["auto", "minilm", "bow"] = option(
        "auto", "minilm: frozen pretrained MiniLM features + trainable MLP; bow: trainable bag of words; auto: minilm on real data, bow on synthetic")
    width: int = option(16, "ResNet width of the first stage (cnn; stages: width, 2 width, 4 width)")
    stem_stride: int = option(2, "stride of the ResNet stem (cnn; 2: 14 x 14 feature maps, 4x cheaper than 1)")
    embed_dim: int = option(128, "shared embedding width")
    init_temperature: float = option(0.07, "initial temperature: logit_scale starts at log(1 / this)")
    train_limit: Optional[int] = option(None, "train on a fixed random slice of this many images")
    eval_test: int = option(10000, "test images of the zero-shot evaluation")
    peer: Literal["none", "open_clip"] = option("none", "benchmark only: open_clip's ClipLoss instead of fastcl")

    def __post_init__(self):
        super().__post_init__()
        for name in ("width", "embed_dim", "init_temperature", "eval_test"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)!r}")


class CLIPModel(nn.Module):
    """Image and text towers with CLIP's learnable logit scale.

    ``forward(images=...)`` gives normalized image embeddings, ``forward(caption_ids=...)``
    normalized text embeddings (one of the two per call, as GradCache encodes each input alone).
    """

    def __init__(self, image_tower: nn.Module, text_tower: CaptionTower, init_temperature: float):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def forward(self, images: Optional[torch.Tensor] = None, caption_ids: Optional[torch.Tensor] = None):
        if (images is None) == (caption_ids is None):
            raise ValueError("pass exactly one of images= and caption_ids=")
        if images is not None:
            return F.normalize(self.image_tower(images), dim=-1)
        return F.normalize(self.text_tower(caption_ids), dim=-1)


def image_tower(config: Config, channels: int) -> nn.Module:
    if config.image_encoder == "efficientnet_lite0":
        return ImageEncoder(efficientnet_lite0(pretrained=True), 1280, config.embed_dim, input_size=64, channels=3)
    backbone = SmallResNet(channels, (config.width, 2 * config.width, 4 * config.width), stem_stride=config.stem_stride)
    return ImageEncoder(backbone, backbone.feature_dim, config.embed_dim)


class LabelledImages(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


def collate(items):
    images, labels = zip(*items)
    return {"images": torch.stack(images), "labels": torch.stack(labels)}


def build(config: Config) -> Method:
    data = load_images(config.data, train_limit=config.train_limit, test_limit=config.eval_test, seed=config.seed,
                       synthetic_train=config.synthetic_size or 512)
    captions, ids_per_class = clip_captions(data.class_names)
    prompts = class_prompts(data.class_names)
    prompt_ids = torch.arange(len(captions), len(captions) + len(prompts))
    text_kind = caption_encoder_kind(config.text_encoder, data.source != "synthetic")
    model = CLIPModel(image_tower(config, data.train_images.shape[1]),
                      CaptionTower(captions + prompts, config.embed_dim, kind=text_kind), config.init_temperature)
    first = {}
    # CLIP's recipe: no weight decay on the logit scale, biases and norm weights
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 and p.requires_grad]

    def encode_inputs(batch):
        # the caption of each image is drawn from the global generator, seeded per step
        caption_ids = sample_caption_ids(batch["labels"].cpu(), ids_per_class).to(batch["labels"].device)
        return ({"images": batch["images"]}, {"caption_ids": caption_ids}), {}

    peer_loss = vision_peers.open_clip_loss() if config.peer == "open_clip" else None

    def representation_loss(image_features, text_features):
        if peer_loss is not None:
            return peer_loss(image_features, text_features, model.logit_scale.exp())
        return losses.clip_loss(image_features, text_features, model.logit_scale.exp(), loss=config.loss)

    def after_step(trained: CLIPModel):
        with torch.no_grad():
            trained.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def evaluate(trained: CLIPModel):
        device = trained.logit_scale.device
        images = extract_features(lambda x: trained(images=x), data.test_images, device=device)
        classes = trained(caption_ids=prompt_ids.to(device)).float().cpu()
        metrics = {"zero_shot_accuracy": zero_shot_accuracy(images, classes, data.test_labels),
                   "logit_scale": float(trained.logit_scale.exp())}
        first.setdefault("metrics", metrics)
        return metrics

    def baselines():
        return {"untrained": dict(first.get("metrics", {}))}

    return Method(model=model, train_data=LabelledImages(data.train_images, data.train_labels), collate=collate,
                  encode_inputs=encode_inputs, representation_loss=representation_loss, evaluate=evaluate,
                  baselines=baselines, after_step=after_step, goal_metric="zero_shot_accuracy",
                  parameters=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                  data_source=f"{data.source}: {len(data.train_images)} training images with generated captions "
                              f"({len(captions)} distinct), text encoder {text_kind}, image encoder {config.image_encoder}; "
                              f"zero-shot on {len(data.test_images)} test images",
                  extra={"prompts": prompts, "captions": len(captions)})

