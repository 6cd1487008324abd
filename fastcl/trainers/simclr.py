"""SimCLR (Chen et al., ICML'20): two augmented views per image, NT-Xent, a small ResNet.

Data: Fashion-MNIST train images (60k, 28 x 28), scikit-learn digits when the Debian package is
missing, the synthetic patterns for ``--data synthetic``. Views:
:class:`~.data.augment.SimCLRAugment` (kornia: random resized crop, flip, brightness/contrast
jitter, blur, noise), drawn inside the step from the engine's per-step seed, so ``--loss fused``
and ``--loss naive`` see the same views. Model: :class:`~.vision_models.SmallResNet` (GroupNorm
by default, so GradCache is exact) and SimCLR's 2-layer projection head. Loss: NT-Xent through
:func:`fastcl.nt_xent` (τ = 0.5): the other 2B - 2 views of the batch are the negatives; under
torchrun every rank's views are. Optimizer: the engine's AdamW (LARS is not offered).

Evaluation: a logistic-regression linear probe and a weighted kNN on the frozen encoder features
h = f(x) (before the head, as the paper probes), fitted on a fixed slice of 10000 training images
and scored on the 10000 test images; the slices do not move with ``--seed``. Baselines:
``random_init`` (the same encoder untrained: the ``before`` evaluation) and ``raw_pixels`` (the
same probe and kNN on the pixels).

Defaults: 2000 steps of batch 256 (8.5 epochs, 6-7 minutes on one CPU thread). The paper's
claim (the representation beats the input under a linear probe) needs them: at 300 steps the
probe stayed at raw pixels' level; a stronger crop (area 0.08) or a weaker one (0.4), no pixel
noise, lr 2e-3 and tau 0.2 measured no better at 1000 steps (docs/trainers.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

import fastcl

from . import losses, vision_peers
from .config import TrainConfig, option
from .data.augment import SimCLRAugment
from .data.fashion_mnist import load_images
from .engine import Method
from .vision_evaluation import extract_features, knn_accuracy, linear_probe_accuracy
from .vision_models import ProjectionHead, SmallResNet

DEFAULT_STEPS = 2000  # 6-7 min on one CPU thread; 300 stopped short of raw pixels (probe 0.792 vs 0.7975)
EVALUATION_SEED = 0  # picks the fixed slices of Fashion-MNIST the probe and kNN fit and score on
# The benchmark's run (python -m fastcl.bench trainers adds --loss / --grad-cache) and its
# largest-batch search (the batch doubles until a run needs more than the memory cap).
BENCH_ARGS = ["--data", "auto", "--steps", "6", "--batch-size", "256", "--eval-train", "2000", "--eval-test", "1000"]
# other libraries run inside this trainer: label -> extra options (the bench suite runs them)
BENCH_PEERS = {peer: ["--peer", peer] for peer in ("pytorch-metric-learning", "lightly")}
BENCH_BATCH_ARGS = ["--data", "auto", "--steps", "2", "--eval-train", "200", "--eval-test", "200"]


@dataclass
class Config(TrainConfig):
    min_batch_size = 2  # in-batch negatives only: a batch of 1 has none
    temperature: float = option(0.5, "NT-Xent temperature (the paper's 0.5 for small images)")
    batch_size: int = option(256, "global batch of images (2x as many views); 1024+ with --grad-cache")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    warmup_steps: int = option(10, "linear warm-up steps")
    width: int = option(16, "ResNet width of the first stage (stages: width, 2 width, 4 width)")
    stem_stride: int = option(2, "stride of the ResNet stem (2: 14 x 14 feature maps, 4x cheaper than 1)")
    blocks: int = option(1, "basic blocks per ResNet stage")
    norm: Literal["group", "batch"] = option("group", "group: batch-independent (GradCache exact); batch: SimCLR's BatchNorm")
    hidden_dim: int = option(256, "projection head hidden width")
    projection_dim: int = option(128, "projection head output width (the loss's embedding)")
    crop_scale: float = option(0.2, "smallest area fraction of the random resized crop")
    flip: float = option(0.5, "probability of a horizontal flip")
    jitter: float = option(0.4, "brightness and contrast jitter strength (SimCLR's colour jitter on grayscale)")
    jitter_p: float = option(0.8, "probability of the brightness / contrast jitter")
    blur_p: float = option(0.5, "probability of a 3 x 3 Gaussian blur")
    noise_p: float = option(0.5, "probability of additive Gaussian pixel noise (std 0.05)")
    train_limit: Optional[int] = option(None, "train on a fixed random slice of this many images")
    eval_train: int = option(10000, "training images the probe and kNN fit on (a fixed slice of the train split)")
    eval_test: int = option(10000, "test images the probe and kNN are scored on (10000: the whole test split)")
    knn_k: int = option(20, "neighbours of the kNN vote")
    peer: Literal["none", "pytorch-metric-learning", "lightly"] = option(
        "none", "benchmark only: NT-Xent from a peer library (its NTXentLoss) instead of fastcl")

    def __post_init__(self):
        super().__post_init__()
        for name in ("temperature", "width", "blocks", "hidden_dim", "projection_dim", "eval_train", "eval_test", "knn_k"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)!r}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        for name in ("flip", "jitter_p", "blur_p", "noise_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a probability in [0, 1], got {getattr(self, name)!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"--jitter must be in [0, 1), got {self.jitter!r}")


class SimCLRModel(nn.Module):
    """Encoder f and projection head g: ``forward(images) = g(f(images))``; ``features`` = f."""

    def __init__(self, config: Config, in_channels: int = 1):
        super().__init__()
        widths = (config.width, 2 * config.width, 4 * config.width)
        self.encoder = SmallResNet(in_channels, widths, config.blocks, config.norm, config.stem_stride)
        self.head = ProjectionHead(self.encoder.feature_dim, config.hidden_dim, config.projection_dim,
                                   batch_norm=config.norm == "batch")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, loss: str) -> torch.Tensor:
    """NT-Xent of the 2B views: :func:`fastcl.nt_xent`, or with every rank's views as negatives."""
    if not losses.distributed_active():
        return fastcl.nt_xent(z1, z2, temperature=temperature, backend=losses.backend_for(loss, z1.device))
    batch = z1.shape[0]
    views = torch.cat([z1, z2])
    index = torch.arange(batch, device=z1.device)
    # local view i's positive is local view i +- B; the gathered keys put this rank's first
    return losses.info_nce(views, views, positive=torch.cat([index + batch, index]), temperature=temperature,
                           normalize=True, exclude_self=True, loss=loss)


class ImageRows(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def probe_metrics(train_x, train_y, test_x, test_y, k: int, max_iter: int = 1000):
    return {"linear_probe_accuracy": linear_probe_accuracy(train_x, train_y, test_x, test_y, max_iter=max_iter),
            "knn_accuracy": knn_accuracy(train_x, train_y, test_x, test_y, k=k)}


def build(config: Config) -> Method:
    data = load_images(config.data, train_limit=config.train_limit, seed=config.seed,
                       synthetic_train=config.synthetic_size or 512)
    # the probe's images do not move with --seed: every seed's rows are scored on the same sets
    evaluation = load_images(config.data, train_limit=config.eval_train, test_limit=config.eval_test,
                             seed=EVALUATION_SEED)
    augment = SimCLRAugment(crop_scale=(config.crop_scale, 1.0), flip=config.flip, brightness=config.jitter,
                            contrast=config.jitter, jitter_p=config.jitter_p, blur_p=config.blur_p,
                            noise_p=config.noise_p)
    model = SimCLRModel(config, data.train_images.shape[1])
    first = {}

    def encode_inputs(batch):
        # drawn from the global generator, which the engine seeds per step
        return augment.two_views(batch), {}

    peer_loss = None
    if config.peer == "pytorch-metric-learning":
        peer_loss = vision_peers.pml_nt_xent(config.temperature)
    elif config.peer == "lightly":
        peer_loss = vision_peers.lightly_nt_xent(config.temperature)

    def representation_loss(z1, z2):
        if peer_loss is not None:
            return peer_loss(z1, z2)
        return nt_xent(z1, z2, config.temperature, config.loss)

    def evaluate(trained: SimCLRModel):
        device = next(trained.parameters()).device
        train_x = extract_features(trained.features, evaluation.train_images, device=device)
        test_x = extract_features(trained.features, evaluation.test_images, device=device)
        metrics = probe_metrics(train_x, evaluation.train_labels, test_x, evaluation.test_labels, config.knn_k)
        first.setdefault("metrics", metrics)
        return metrics

    def baselines():
        flat_train = evaluation.train_images.flatten(1)
        flat_test = evaluation.test_images.flatten(1)
        return {"random_init": dict(first.get("metrics", {})),
                # 784 standardized pixels converge slowly: lbfgs stops at 300 iterations
                "raw_pixels": probe_metrics(flat_train, evaluation.train_labels, flat_test, evaluation.test_labels,
                                            config.knn_k, max_iter=300)}

    return Method(model=model, train_data=ImageRows(data.train_images), collate=torch.stack,
                  encode_inputs=encode_inputs, representation_loss=representation_loss, evaluate=evaluate,
                  baselines=baselines, goal_metric="linear_probe_accuracy",
                  data_source=f"{data.source}: {len(data.train_images)} training images, probe/kNN "
                              f"{len(evaluation.train_images)} train / {len(evaluation.test_images)} test",
                  extra={"evaluation": f"{data.source} test split", "encoder_parameters":
                         sum(p.numel() for p in model.encoder.parameters())})

