"""PS3 canvases: large images holding a few small items, each with a region caption and a box.

A canvas of side S (e.g. 1512) is black; ``items`` images (Fashion-MNIST, digits or synthetic)
are resized (bilinear, antialiased) to squares of side ``size_range * S`` and pasted at random
positions without overlapping one another. Each item gets its box (top, left, bottom, right) in
canvas pixels (bottom/right exclusive: the item covers ``canvas[top:bottom, left:right]``) and
its region caption, e.g. "a sneaker at the top left" (:mod:`.captions`). No two items of one
canvas share a caption, so a caption names exactly one box.

Canvases are generated on the fly from (seed, index) so a dataset of any length costs no
memory, and the same index always gives the same canvas.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .captions import region_caption_id


class Canvas(NamedTuple):
    """image (C, S, S) float32; boxes (n, 4) int64 (top, left, bottom, right); labels (n,);
    caption_ids (n,) region-caption ids (:func:`.captions.all_region_captions` order);
    items (n,) indices of the pasted source images."""

    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    caption_ids: torch.Tensor
    items: torch.Tensor


def _overlaps(box, boxes, gap: int) -> bool:
    top, left, bottom, right = box
    return any(top < b[2] + gap and b[0] < bottom + gap and left < b[3] + gap and b[1] < right + gap for b in boxes)


def make_canvas(images: torch.Tensor, labels: torch.Tensor, side: int, rng: np.random.Generator, *,
                items: Tuple[int, int] = (2, 4), size_range: Tuple[float, float] = (0.12, 0.3), gap: int = 2,
                attempts: int = 200) -> Canvas:
    """One canvas from source ``images`` (N, C, h, w) in [0, 1] and their ``labels`` (N,).

    Draws the item count in ``[items[0], items[1]]``, then for each item a source image, a side
    in ``size_range`` (fraction of ``side``) and a position, retried until it overlaps no
    earlier box (``gap`` pixels apart) and its caption is new on this canvas.
    """
    if images.dim() != 4 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"images must be (N, C, h, w) with one label each, got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    if not 0 < size_range[0] <= size_range[1] < 1:
        raise ValueError(f"size_range must satisfy 0 < low <= high < 1, got {size_range}")
    if not 1 <= items[0] <= items[1]:
        raise ValueError(f"items must be (low, high) with 1 <= low <= high, got {items}")
    canvas = torch.zeros(images.shape[1], side, side)
    wanted = int(rng.integers(items[0], items[1] + 1))
    boxes, kinds, captions, sources = [], [], [], []
    for _ in range(attempts):
        if len(boxes) == wanted:
            break
        source = int(rng.integers(len(labels)))
        size = int(round(side * rng.uniform(*size_range)))
        top, left = (int(v) for v in rng.integers(0, side - size + 1, size=2))
        box = (top, left, top + size, left + size)
        caption = region_caption_id(int(labels[source]), box, side)
        if _overlaps(box, boxes, gap) or caption in captions:
            continue
        item = F.interpolate(images[source:source + 1].float(), size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)[0].clamp(0.0, 1.0)
        canvas[:, top:top + size, left:left + size] = item
        boxes.append(box)
        kinds.append(int(labels[source]))
        captions.append(caption)
        sources.append(source)
    return Canvas(canvas, torch.tensor(boxes, dtype=torch.int64).view(-1, 4), torch.tensor(kinds, dtype=torch.int64),
                  torch.tensor(captions, dtype=torch.int64), torch.tensor(sources, dtype=torch.int64))


class CanvasDataset(torch.utils.data.Dataset):
    """``count`` canvases of side ``side``; item i is built from ``(seed, i)``.

    Each item is a dict of tensors that the default collate stacks: ``image`` (C, S, S),
    ``boxes`` (max_items, 4) padded with -1, ``labels``, ``caption_ids`` (max_items,) padded
    with -1, ``count`` (number of real items), and the caption a training step uses:
    ``target`` (index of one item, drawn from the same seed), ``box`` and ``caption_id`` of it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, count: int, side: int, *, seed: int = 0,
                 items: Tuple[int, int] = (2, 4), size_range: Tuple[float, float] = (0.12, 0.3)):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.images, self.labels = images, labels
        self.count, self.side, self.seed = count, side, seed
        self.items, self.size_range = tuple(items), tuple(size_range)

    def __len__(self):
        return self.count

    def canvas(self, index: int) -> Tuple[Canvas, int]:
        rng = np.random.default_rng((self.seed, index))
        canvas = make_canvas(self.images, self.labels, self.side, rng, items=self.items, size_range=self.size_range)
        return canvas, int(rng.integers(len(canvas.labels)))

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(index)
        canvas, target = self.canvas(index)
        pad = self.items[1] - len(canvas.labels)
        return {
            "image": canvas.image,
            "boxes": F.pad(canvas.boxes, (0, 0, 0, pad), value=-1),
            "labels": F.pad(canvas.labels, (0, pad), value=-1),
            "caption_ids": F.pad(canvas.caption_ids, (0, pad), value=-1),
            "count": torch.tensor(len(canvas.labels)),
            "target": torch.tensor(target),
            "box": canvas.boxes[target],
            "caption_id": canvas.caption_ids[target],
        }


def patch_boxes(grid: int, patch_size: int, scale_side: int, canvas_side: int) -> torch.Tensor:
    """(grid * grid, 4) float boxes (top, left, bottom, right) in canvas pixels of the patches
    of one scale: the canvas resized to ``scale_side`` is cut into ``patch_size`` patches, so
    patch (r, c) covers canvas rows ``[r, r + 1) * patch_size * canvas_side / scale_side``."""
    step = patch_size * canvas_side / scale_side
    edges = torch.arange(grid + 1, dtype=torch.float64) * step
    rows = torch.stack([edges[:-1], edges[1:]], -1)
    top_bottom = rows[:, None].expand(grid, grid, 2)
    left_right = rows[None, :].expand(grid, grid, 2)
    return torch.stack([top_bottom[..., 0], left_right[..., 0], top_bottom[..., 1], left_right[..., 1]], -1).view(-1, 4)


def box_mask(boxes: torch.Tensor, grid: int, patch_size: int, scale_side: int, canvas_side: int) -> torch.Tensor:
    """(B, grid, grid) bool: patches whose centre lies inside ``boxes`` (B, 4) of canvas pixels."""
    cells = patch_boxes(grid, patch_size, scale_side, canvas_side).to(boxes.device)
    centre_y = (cells[:, 0] + cells[:, 2]) / 2
    centre_x = (cells[:, 1] + cells[:, 3]) / 2
    b = boxes.to(torch.float64)[:, None]
    inside = (centre_y >= b[..., 0]) & (centre_y < b[..., 2]) & (centre_x >= b[..., 1]) & (centre_x < b[..., 3])
    return inside.view(-1, grid, grid)


def box_overlap(boxes: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """(B, M) fraction of each cell covered by each box (B, 4); cells (M, 4) shared by the
    batch or (B, M, 4) per image, all (top, left, bottom, right) in canvas pixels."""
    b = boxes.to(cells.dtype)[:, None]
    height = (torch.minimum(b[..., 2], cells[..., 2]) - torch.maximum(b[..., 0], cells[..., 0])).clamp(min=0)
    width = (torch.minimum(b[..., 3], cells[..., 3]) - torch.maximum(b[..., 1], cells[..., 1])).clamp(min=0)
    area = (cells[..., 2] - cells[..., 0]) * (cells[..., 3] - cells[..., 1])
    return height * width / area


def selected_cells(positions: torch.Tensor, grid: int, patch_size: int, scale_side: int,
                   canvas_side: int) -> torch.Tensor:
    """(B, K, 4) canvas-pixel boxes of selected patches given their (B, K, 2) (row, col)."""
    cells = patch_boxes(grid, patch_size, scale_side, canvas_side).to(positions.device)
    return cells[positions[..., 0] * grid + positions[..., 1]]


def stack_masks(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.flatten(1) for m in masks], dim=1)
