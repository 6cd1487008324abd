"""Data, augmentation, caption and canvas pieces of the vision trainers (SimCLR, CLIP, PS3)."""
import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcl.trainers.data import captions as cap
from fastcl.trainers.data.augment import SimCLRAugment
from fastcl.trainers.data.canvases import CanvasDataset, box_mask, box_overlap, make_canvas, patch_boxes
from fastcl.trainers.data.fashion_mnist import (FASHION_MNIST_CLASSES, fashion_mnist_available, load_images,
                                                read_idx, synthetic_images)


def _write_idx(path, array: np.ndarray, code: int):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    _write_idx(str(tmp_path / "x-idx3-ubyte.gz"), images, 0x08)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "x-idx3-ubyte.gz")), images)
    values = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    _write_idx(str(tmp_path / "y.gz"), values, 0x0C)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "y.gz")), values)


def test_read_idx_rejects_bad_files(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x00" * 3)  # 3 bytes for 10
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(str(path))
    with gzip.open(path, "wb") as handle:
        handle.write(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(str(path))


@pytest.mark.skipif(not fashion_mnist_available(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_slices():
    data = load_images("real", train_limit=100, test_limit=50)
    assert data.source == "fashion-mnist" and data.class_names == FASHION_MNIST_CLASSES
    assert data.train_images.shape == (100, 1, 28, 28) and data.test_images.shape == (50, 1, 28, 28)
    assert 0 <= float(data.train_images.min()) and float(data.train_images.max()) <= 1
    assert set(data.train_labels.tolist()) <= set(range(10))


def test_digits_and_synthetic_sources():
    digits = load_images("digits", image_size=16)
    assert digits.source == "digits" and digits.train_images.shape[1:] == (1, 16, 16)
    assert len(digits.train_labels) + len(digits.test_labels) == 1797
    one, two = synthetic_images(40, seed=3), synthetic_images(40, seed=3)
    np.testing.assert_array_equal(one[0], two[0])
    assert sorted(set(one[1].tolist())) == list(range(10))
    with pytest.raises(ValueError, match="data must be one of"):
        load_images("cifar")


def test_augmentation_is_deterministic_under_a_seed():
    images = load_images("synthetic", synthetic_train=16, synthetic_test=1).train_images
    augment = SimCLRAugment()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second, other = augment(images, seed=7), augment(images, seed=7), augment(images, seed=8)
    assert torch.equal(torch.get_rng_state(), state), "a seeded call must leave the global generator alone"
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    assert first.shape == images.shape and float(first.min()) >= 0 and float(first.max()) <= 1
    # unseeded calls follow the global generator
    torch.manual_seed(5)
    a = augment(images)
    torch.manual_seed(5)
    assert torch.equal(a, augment(images))
    view1, view2 = augment.two_views(images, seed=1)
    assert not torch.allclose(view1, view2)


def test_clip_captions_name_their_class():
    captions, per_class = cap.clip_captions(FASHION_MNIST_CLASSES)
    assert len(set(captions)) == len(captions)
    for c, ids in enumerate(per_class):
        synonyms, attributes = cap.FASHION_DESCRIPTIONS[FASHION_MNIST_CLASSES[c]]
        assert len(ids) >= 20
        assert all(any(s in captions[i] for s in synonyms) for i in ids)
    labels = torch.tensor([0, 7, 7, 9])
    ids = cap.sample_caption_ids(labels, per_class, torch.Generator().manual_seed(0))
    assert all(int(i) in per_class[int(c)] for i, c in zip(ids, labels))
    assert cap.class_prompts(["bag"]) == ["a photo of a bag"]


def test_region_captions():
    assert cap.region_caption("sneaker", (0, 0, 100, 100), 1512) == "a sneaker at the top left"
    assert cap.region_caption("bag", (700, 700, 800, 800), 1512) == "a bag in the center"
    assert cap.region_caption("bag", (1400, 10, 1500, 60), 1512) == "a bag at the bottom left"
    table = cap.all_region_captions(["a", "b"])
    assert table[cap.region_caption_id(1, (0, 1400, 50, 1500), 1512)] == "a b at the top right"


def test_canvas_boxes_match_pasted_items():
    data = load_images("synthetic", synthetic_train=32, synthetic_test=1)
    rng = np.random.default_rng(0)
    for _ in range(5):
        canvas = make_canvas(data.train_images, data.train_labels, 300, rng, items=(2, 4))
        covered = torch.zeros(300, 300, dtype=torch.bool)
        assert 2 <= len(canvas.boxes) <= 4
        for box, source, label, caption in zip(canvas.boxes.tolist(), canvas.items, canvas.labels,
                                               canvas.caption_ids):
            top, left, bottom, right = box
            assert bottom - top == right - left and 0 <= top and bottom <= 300 and 0 <= left and right <= 300
            expected = F.interpolate(data.train_images[source][None], size=(bottom - top, right - left),
                                     mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
            torch.testing.assert_close(canvas.image[:, top:bottom, left:right], expected, rtol=0, atol=0)
            assert not covered[top:bottom, left:right].any(), "items overlap"
            covered[top:bottom, left:right] = True
            assert int(label) == int(data.train_labels[source])
            assert int(caption) == cap.region_caption_id(int(label), box, 300)
        assert float(canvas.image[:, ~covered].abs().max()) == 0.0, "pixels outside every box"
        assert len(set(canvas.caption_ids.tolist())) == len(canvas.caption_ids)


def test_canvas_dataset_is_reproducible_and_collates():
    data = load_images("synthetic", synthetic_train=32, synthetic_test=1)
    dataset = CanvasDataset(data.train_images, data.train_labels, 6, 224, seed=1)
    first, again = dataset[3], dataset[3]
    assert all(torch.equal(first[k], again[k]) for k in first)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    assert batch["image"].shape == (4, 1, 224, 224) and batch["boxes"].shape == (4, 4, 4)
    target = batch["target"]
    assert torch.equal(batch["box"], batch["boxes"][torch.arange(4), target])
    assert torch.equal(batch["caption_id"], batch["caption_ids"][torch.arange(4), target])


def test_box_mask_and_overlap_by_hand():
    # canvas 56 px, scale 28 -> patch 14 of the scale covers 28 canvas pixels: a 2 x 2 grid
    cells = patch_boxes(2, 14, 28, 56)
    assert cells.tolist() == [[0, 0, 28, 28], [0, 28, 28, 56], [28, 0, 56, 28], [28, 28, 56, 56]]
    boxes = torch.tensor([[0, 0, 15, 15], [10, 10, 56, 40]])
    # centres are at 14 and 42: box 0 holds centre (14, 14); box 1 holds (14, 14), (42, 14)
    assert box_mask(boxes, 2, 14, 28, 56).flatten(1).tolist() == [[True, False, False, False],
                                                                   [True, False, True, False]]
    overlap = box_overlap(boxes, cells.float())
    torch.testing.assert_close(overlap[0], torch.tensor([225 / 784, 0, 0, 0]))
    torch.testing.assert_close(overlap[1], torch.tensor([18 * 18 / 784, 18 * 12 / 784, 28 * 18 / 784, 28 * 12 / 784]))
