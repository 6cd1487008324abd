"""PS3 (Shi et al., 2025): encode a low-res view plus only the high-res patches a caption needs.

Data: canvases (:mod:`~.data.canvases`, side ``--canvas-side``, 448 by default on CPU, 1512 as
in the issue with ``--canvas-side 1512 --low-res 378``) holding 2-4 Fashion-MNIST items at random
positions and sizes; each training canvas comes with the region caption of one of its items
("a sneaker at the top left") and that item's box.

Model: :class:`fastcl.SelectivePatchEncoder` (a small ViT shared by both passes): low-res pass,
top-down saliency from the caption's text features, top-k patches per scale under the budget
(``--budget-fraction`` of the largest scale's patches, split across the scales ``canvas_side/2``
and ``canvas_side`` by patch count), only those patches cut out (:func:`fastcl.gather_patches`)
and encoded against the cached low-res K/V. The caption's text features come from
:class:`~.vision_models.CaptionTower` (frozen MiniLM + MLP, or a bag of words on synthetic data).

Loss, as PS3: SigLIP (:func:`fastcl.siglip_loss`, learnable scale and bias initialised to 10 and
-10) between the caption embedding and the *local* feature: the tokens (low-res and selected
high-res) averaged with weights = the fraction of each token's patch covered by the box, then a
linear projection; plus ``--bce-weight`` x the BCE of every scale's selection logits against the
box (patches whose centre lies in it). The BCE rides along as an extra column of the image
representation so that GradCache replays it exactly.

Evaluation on held-out canvases, every item's caption in turn: ``box_recall`` (fraction of the
box's high-res patches among the selected ones), ``retrieval_accuracy`` (caption -> region: the
caption's embedding retrieves, among the local features of all (canvas, item) pairs, one of an
item with the same caption), time and peak memory of a forward+backward. Baselines of the same
trained weights: ``low_res_only`` (local features from the low-res tokens alone) and
``full_high_res`` (every patch of the largest scale through the ViT: accuracy, time, memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastcl

from . import losses
from .config import TrainConfig, option
from .data.canvases import CanvasDataset, box_mask, box_overlap, patch_boxes, selected_cells
from .data.captions import all_region_captions
from .data.fashion_mnist import load_images
from .engine import Method
from .evaluation import progress
from .vision_evaluation import box_recall, peak_memory, retrieval_accuracy
from .vision_models import CaptionTower, caption_encoder_kind

DEFAULT_STEPS = 200
BENCH_ARGS = ["--data", "auto", "--steps", "6", "--batch-size", "16", "--eval-canvases", "8"]
# other libraries run inside this trainer: label -> extra options (the bench suite runs them)
BENCH_PEERS = {"full high-res ViT": ["--encoder", "full"]}
# PS3's memory axis is the canvas side (bench_canvas_step), not the batch
BENCH_BATCH_ARGS = ["--data", "auto", "--steps", "2", "--eval-canvases", "2"]


@dataclass
class Config(TrainConfig):
    batch_size: int = option(32, "global batch of (canvas, region caption) pairs")
    lr: float = option(5e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    warmup_steps: int = option(10, "linear warm-up steps")
    canvas_side: int = option(448, "canvas side in pixels (the largest high-res scale); the issue's 1512 fits on a GPU")
    low_res: int = option(112, "side of the low-res view (a multiple of --patch-size)")
    patch_size: int = option(14, "ViT patch size")
    budget_fraction: float = option(0.25, "high-res tokens per canvas, as a fraction of the largest scale's patches")
    dim: int = option(96, "ViT width")
    depth: int = option(4, "ViT blocks")
    heads: int = option(4, "attention heads")
    embed_dim: int = option(128, "shared embedding width of the SigLIP loss")
    text_encoder: Literal["auto", "minilm", "bow"] = option(
        "auto", "minilm: frozen MiniLM features + MLP; bow: trainable bag of words; auto: minilm on real data, bow on synthetic")
    bce_weight: float = option(1.0, "weight of the selection BCE against the caption's box")
    items_min: int = option(2, "fewest items per canvas")
    items_max: int = option(4, "most items per canvas")
    train_canvases: int = option(20000, "training canvases (generated on the fly from (seed, index))")
    eval_canvases: int = option(48, "held-out canvases (every item's caption is evaluated)")
    timing_batch: int = option(2, "canvases of the forward+backward time and memory measurement")
    source_limit: Optional[int] = option(None, "paste items from a fixed slice of this many source images")
    encoder: Literal["selective", "full"] = option(
        "selective", "selective: PS3; full: every high-res patch of the largest scale (the baseline PS3 avoids; no selection BCE)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("canvas_side", "low_res", "patch_size", "dim", "depth", "heads", "embed_dim",
                     "train_canvases", "eval_canvases", "timing_batch", "items_min"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)!r}")
        if not 0 < self.budget_fraction <= 1:
            raise ValueError(f"--budget-fraction must be in (0, 1], got {self.budget_fraction}")
        if self.items_max < self.items_min:
            raise ValueError(f"--items-max ({self.items_max}) must be >= --items-min ({self.items_min})")
        if self.low_res % self.patch_size or self.canvas_side % (2 * self.patch_size):
            raise ValueError(f"--low-res and --canvas-side / 2 must be multiples of --patch-size ({self.patch_size}), "
                             f"got {self.low_res} and {self.canvas_side}")

    @property
    def scales(self):
        return (self.canvas_side // 2, self.canvas_side)

    @property
    def budget(self) -> int:
        return max(1, int(self.budget_fraction * (self.canvas_side // self.patch_size) ** 2))


class PS3Model(nn.Module):
    """Selective patch encoder, caption tower, image projection, SigLIP scale and bias.

    ``forward(caption_ids=...)``: normalized caption embeddings (B, E).
    ``forward(images=, caption_ids=, boxes=)``: (B, E + 1): the normalized local feature of each
    caption's box, and in the last column that row's selection BCE against the box.
    """

    def __init__(self, config: Config, captions, text_kind: str, in_chans: int):
        super().__init__()
        self.config = config
        self.text = CaptionTower(captions, config.embed_dim, kind=text_kind)
        self.encoder = fastcl.SelectivePatchEncoder(
            patch_size=config.patch_size, low_res=config.low_res, scales=config.scales, budget=config.budget,
            in_chans=in_chans, dim=config.dim, depth=config.depth, heads=config.heads, score_dim=64,
            text_dim=self.text.input_dim,
            # the middle and last blocks (the encoder's own default indexes block -1 when depth = 1)
            score_layers=sorted({max(0, config.depth // 2 - 1), config.depth - 1}))
        # selection is always top-down (the caption's text): the bottom-up prompt stays unused, and
        # frozen so that DDP does not wait for its gradient
        self.encoder.prompt.requires_grad_(False)
        self.image_projection = nn.Linear(config.dim, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, images: Optional[torch.Tensor] = None, caption_ids: Optional[torch.Tensor] = None,
                boxes: Optional[torch.Tensor] = None):
        if caption_ids is None:
            raise ValueError("caption_ids is required")
        if images is None:
            return F.normalize(self.text(caption_ids), dim=-1)
        if boxes is None:
            raise ValueError("boxes is required with images")
        if self.config.encoder == "full":
            local = self.full_high_res(images, boxes)
            return torch.cat([local, local.new_zeros(local.shape[0], 1)], dim=1)
        out = self.encoder(images, self.text.raw(caption_ids))
        local = self.local_feature(out.low_res_tokens, boxes, out.tokens, out.positions)
        bce = self.selection_bce(out.scores, boxes)
        return torch.cat([F.normalize(self.image_projection(local), dim=-1), bce[:, None].to(local.dtype)], dim=1)

    # -- pieces shared with the evaluation ---------------------------------------------------------
    def low_res_weights(self, boxes):
        grid = self.encoder.grid
        cells = patch_boxes(grid, self.config.patch_size, self.config.low_res, self.config.canvas_side)
        return box_overlap(boxes, cells.to(boxes.device))

    def local_feature(self, low_tokens, boxes, high_tokens=None, positions=None, high_scales=None):
        """Box-overlap-weighted mean of the low-res tokens and of the given high-res tokens
        (``positions`` per scale, of ``high_scales``, default the encoder's)."""
        weights = [self.low_res_weights(boxes)]
        tokens = [low_tokens]
        if high_tokens is not None:
            tokens.append(high_tokens)
            for where, side in zip(positions, high_scales or self.config.scales):
                cells = selected_cells(where, side // self.config.patch_size, self.config.patch_size, side,
                                       self.config.canvas_side)
                weights.append(box_overlap(boxes, cells))
        weight = torch.cat(weights, dim=1).to(low_tokens.dtype)
        pooled = torch.einsum("bn,bnd->bd", weight, torch.cat(tokens, dim=1))
        return pooled / weight.sum(1, keepdim=True).clamp(min=1e-6)

    def selection_bce(self, scores, boxes):
        """(B,) mean over scales of the per-patch BCE of the selection logits against the box."""
        terms = []
        for score, side in zip(scores, self.config.scales):
            target = box_mask(boxes, score.shape[-1], self.config.patch_size, side, self.config.canvas_side)
            terms.append(F.binary_cross_entropy_with_logits(score.float(), target.float(), reduction="none").flatten(1).mean(1))
        return torch.stack(terms).mean(0)

    def full_high_res(self, images, boxes):
        """The baseline: every patch of the largest scale through the same ViT (against the
        low-res K/V, as the selected ones are); returns the normalized local features."""
        encoder = self.encoder
        low, cache, _ = encoder.encode_low_res(images)
        side = encoder.scales[-1]
        grid = side // encoder.patch_size
        every = torch.arange(grid * grid, device=images.device).expand(images.shape[0], -1)
        tokens, positions = encoder.embed(images, every, side)
        high = encoder.encode_selected(tokens + encoder.scale_residual[-1], cache)
        local = self.local_feature(encoder.norm(low), boxes, encoder.norm(high), [positions], [side])
        return F.normalize(self.image_projection(local), dim=-1)


def siglip(image_features, text_features, scale, bias, loss: str):
    backend = losses.backend_for(loss, image_features.device)
    if losses.distributed_active():
        return fastcl.distributed.siglip_loss(image_features, text_features, scale, bias, backend=backend)
    return fastcl.siglip_loss(image_features, text_features, scale, bias, backend=backend)


def evaluation_pairs(dataset: CanvasDataset):
    """Every (canvas, item) of the held-out canvases: canvas indices, boxes, caption ids."""
    canvases, boxes, captions = [], [], []
    for index in range(len(dataset)):
        canvas, _ = dataset.canvas(index)
        for box, caption in zip(canvas.boxes, canvas.caption_ids):
            canvases.append(index)
            boxes.append(box)
            captions.append(caption)
    return torch.tensor(canvases), torch.stack(boxes), torch.stack(captions)


def build(config: Config) -> Method:
    data = load_images(config.data, train_limit=config.source_limit, seed=config.seed)
    captions = all_region_captions(data.class_names)
    text_kind = caption_encoder_kind(config.text_encoder, data.source != "synthetic")
    model = PS3Model(config, captions, text_kind, data.train_images.shape[1])
    items = (config.items_min, config.items_max)
    train = CanvasDataset(data.train_images, data.train_labels, config.train_canvases, config.canvas_side,
                          seed=config.seed, items=items)
    held_out = CanvasDataset(data.test_images, data.test_labels, config.eval_canvases, config.canvas_side,
                             seed=config.seed + 1, items=items)
    pair_canvas, pair_boxes, pair_captions = evaluation_pairs(held_out)
    images = torch.stack([held_out.canvas(i)[0].image for i in range(len(held_out))])
    # The baselines are ablations of the trained weights: each evaluation refills these dicts, and
    # baselines() hands the engine the dicts themselves, so metrics.json shows the final values.
    sections = {"low_res_only": {}, "full_high_res": {}}

    def encode_inputs(batch):
        return ({"images": batch["image"], "caption_ids": batch["caption_id"], "boxes": batch["box"]},
                {"caption_ids": batch["caption_id"]}), {}

    def representation_loss(local, text):
        features, bce = local[:, :-1], local[:, -1]
        return siglip(features, text, model.logit_scale.exp(), model.logit_bias, config.loss) + config.bce_weight * bce.mean()

    def evaluate(trained: PS3Model):
        device = trained.logit_scale.device
        selective, low_only, full, recalls = [], [], [], []
        chunk = 16
        for start in progress(range(0, len(pair_canvas), chunk), "evaluating held-out canvases"):
            canvas = images[pair_canvas[start:start + chunk]].to(device)
            boxes = pair_boxes[start:start + chunk].to(device)
            caption = pair_captions[start:start + chunk].to(device)
            out = trained.encoder(canvas, trained.text.raw(caption))
            recalls.append(box_recall(out.selection, config.scales, boxes, config.patch_size, config.canvas_side,
                                      reduce=False))
            local = trained.local_feature(out.low_res_tokens, boxes, out.tokens, out.positions)
            selective.append(F.normalize(trained.image_projection(local), dim=-1).float().cpu())
            low = trained.local_feature(out.low_res_tokens, boxes)
            low_only.append(F.normalize(trained.image_projection(low), dim=-1).float().cpu())
            full.append(trained.full_high_res(canvas, boxes).float().cpu())
        text = trained(caption_ids=pair_captions.to(device)).float().cpu()
        same = pair_captions[:, None] == pair_captions[None, :]

        def accuracy(candidates):
            scores = text @ torch.cat(candidates).T
            return float(same[torch.arange(len(text)), scores.argmax(1)].float().mean())

        recall = torch.cat(recalls)
        metrics = {"box_recall": float(recall[~recall.isnan()].mean()), "retrieval_accuracy": accuracy(selective)}
        timing_images = images[:config.timing_batch].to(device)
        timing_boxes = pair_boxes[:config.timing_batch].to(device)
        timing_text = pair_captions[:config.timing_batch].to(device)
        with torch.enable_grad():
            seconds, peak = peak_memory(lambda: trained(images=timing_images, caption_ids=timing_text,
                                                        boxes=timing_boxes).sum().backward(), device)
            full_seconds, full_peak = peak_memory(lambda: trained.full_high_res(timing_images, timing_boxes).sum().backward(),
                                                  device)
        trained.zero_grad(set_to_none=True)
        metrics.update(step_time_ms=seconds * 1e3, peak_memory_mb=peak / 2**20)
        sections["low_res_only"].clear()
        sections["low_res_only"].update(retrieval_accuracy=accuracy(low_only))
        sections["full_high_res"].clear()
        sections["full_high_res"].update(retrieval_accuracy=accuracy(full), step_time_ms=full_seconds * 1e3,
                                         peak_memory_mb=full_peak / 2**20,
                                         time_ratio=full_seconds / seconds if seconds else float("nan"))
        return metrics

    def baselines():
        return sections

    grids = [side // config.patch_size for side in config.scales]
    return Method(model=model, train_data=train, collate=torch.utils.data.default_collate,
                  encode_inputs=encode_inputs, representation_loss=representation_loss, evaluate=evaluate,
                  baselines=baselines, goal_metric="box_recall",
                  data_source=f"{data.source} items on {config.canvas_side}px canvases ({config.train_canvases} training, "
                              f"{len(held_out)} held-out with {len(pair_canvas)} captions), text encoder {text_kind}",
                  extra={"budget": config.budget, "patches": [g * g for g in grids],
                         "budget_split": fastcl.budget_split(config.budget, [g * g for g in grids]),
                         "low_res_tokens": (config.low_res // config.patch_size) ** 2})



def bench_canvas_step(side: int, encoder: str):
    """One forward + backward of one ``side`` x ``side`` canvas through PS3's model with the
    ``encoder`` ("selective" or "full"), as a callable: the bench suite's largest-canvas search
    (``fastcl.bench.suites.trainers``) grows the side while its peak memory fits the cap."""
    low_res = max(14, (side // 4) // 14 * 14)
    config = Config(data="synthetic", canvas_side=side, low_res=low_res, encoder=encoder)
    model = PS3Model(config, all_region_captions([str(i) for i in range(10)]), "bow", 1)
    images = torch.rand(1, 1, side, side)
    boxes = torch.tensor([[side // 4, side // 4, side // 2, side // 2]])
    ids = torch.tensor([0])
    return lambda: model(images=images, caption_ids=ids, boxes=boxes).sum().backward()
