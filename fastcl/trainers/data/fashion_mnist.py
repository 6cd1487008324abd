"""Offline image data for the vision trainers: Fashion-MNIST, scikit-learn digits, synthetic.

* **Fashion-MNIST** (Debian ``dataset-fashion-mnist``): 60k train + 10k test grayscale 28 x 28
  images of 10 clothing classes, read straight from the gzip IDX files under
  ``/usr/share/datasets/fashion-mnist`` (or ``$FASHION_MNIST_DIR``) by :func:`read_idx`.
* **digits** (``sklearn.datasets.load_digits``): 1797 images of 8 x 8 handwritten digits, the
  small real fallback when the Debian package is missing; split 70/30 with a fixed seed.
* **synthetic**: :func:`synthetic_images`, 10 classes of noisy geometric patterns (bars, rings,
  crosses, ...) generated from a seed, for tests and smoke runs that must not depend on any file.

:func:`load_images` picks one of them from ``--data {real,synthetic,auto}`` and returns an
:class:`ImageData` that says which source it used. Pixels are float32 in [0, 1], shape (N, 1, S, S).
"""
from __future__ import annotations

import gzip
import os
import struct
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: The Fashion-MNIST class names, in label order.
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SYNTHETIC_CLASSES = ("horizontal bar", "vertical bar", "diagonal bar", "cross", "ring",
                     "square", "checkerboard", "dot", "triangle", "frame")

# IDX type codes (the third byte of the magic number) -> numpy dtype, big-endian.
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class ImageData(NamedTuple):
    """Train and test images of one source.

    train_images, test_images: (N, 1, S, S) float32 in [0, 1].
    train_labels, test_labels: (N,) int64 in [0, len(class_names)).
    class_names: one name per label, as used in captions and prompts.
    source: "fashion-mnist", "digits" or "synthetic".
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: Tuple[str, ...]
    source: str


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip-compressed when the name ends in ``.gz``) into a numpy array.

    Format: a 4-byte magic ``0 0 type ndim``, ``ndim`` big-endian uint32 sizes, then the data.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (magic {data[:4]!r})")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    count = int(np.prod(shape)) if shape else 1
    start = 4 + 4 * ndim
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {shape} of {dtype}, but {len(data) - start} data bytes follow")
    return np.frombuffer(data, dtype=dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_dir() -> str:
    return os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR)


def fashion_mnist_available(directory: Optional[str] = None) -> bool:
    directory = directory or fashion_mnist_dir()
    return all(os.path.exists(os.path.join(directory, f"{split}-{kind}.gz"))
               for split in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def load_fashion_mnist(split: str = "train", directory: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the ``train`` or ``test`` split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = directory or fashion_mnist_dir()
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels in {split}")
    return images, labels


def load_digits_split(seed: int = 0, test_fraction: float = 0.3):
    """scikit-learn's digits as ((train_images, train_labels), (test_images, test_labels)),
    images (N, 8, 8) float in [0, 1], split with a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(round(len(labels) * (1 - test_fraction)))
    train, test = order[:cut], order[cut:]
    return (images[train], labels[train]), (images[test], labels[test])


def _pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of synthetic class ``label``: a jittered geometric pattern."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    shift_y, shift_x = rng.uniform(-0.15, 0.15, size=2)
    y, x = y - shift_y, x - shift_x
    width = rng.uniform(0.15, 0.25)
    r = np.sqrt(x * x + y * y)
    if label == 0:
        image = np.abs(y) < width
    elif label == 1:
        image = np.abs(x) < width
    elif label == 2:
        image = np.abs(x - y) < width * 1.4
    elif label == 3:
        image = (np.abs(x) < width) | (np.abs(y) < width)
    elif label == 4:
        image = np.abs(r - 0.6) < width
    elif label == 5:
        image = (np.abs(x) < 0.55) & (np.abs(y) < 0.55)
    elif label == 6:
        image = ((np.floor((x + 1) * 2) + np.floor((y + 1) * 2)) % 2) == 0
    elif label == 7:
        image = r < width * 1.8
    elif label == 8:
        image = (y > -0.6) & (y < 0.6) & (np.abs(x) < (y + 0.6) * 0.6)
    else:
        image = (np.maximum(np.abs(x), np.abs(y)) > 0.7 - width) & (np.maximum(np.abs(x), np.abs(y)) < 0.75)
    image = image.astype(np.float32) * rng.uniform(0.6, 1.0)
    image += rng.normal(0.0, 0.1, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0)


def synthetic_images(count: int, size: int = 28, seed: int = 0, num_classes: int = 10):
    """``count`` synthetic images (count, size, size) float32 in [0, 1] and their labels.

    Class c is a geometric pattern (:data:`SYNTHETIC_CLASSES`) with random shift, width,
    intensity and Gaussian pixel noise; labels cycle through the classes in a shuffled order.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(SYNTHETIC_CLASSES)}], got {num_classes}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % num_classes).astype(np.int64)
    images = np.stack([_pattern(int(label), size, rng) for label in labels])
    return images, labels


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    return tensor.float()[:, None]


def _limit(images, labels, limit: Optional[int], seed: int):
    """The first ``limit`` items of a fixed random permutation (a class-mixed slice)."""
    if limit is None or limit >= len(labels):
        return images, labels
    order = np.random.default_rng(seed).permutation(len(labels))[:limit]
    return images[order], labels[order]


def load_images(data: str = "auto", *, train_limit: Optional[int] = None, test_limit: Optional[int] = None,
                seed: int = 0, image_size: Optional[int] = None, synthetic_train: int = 512,
                synthetic_test: int = 256) -> ImageData:
    """Images for a vision trainer.

    Args:
        data: ``"real"`` (Fashion-MNIST, or digits if the Debian files are missing),
            ``"synthetic"``, ``"auto"`` (real when present, else synthetic; digits always are),
            or a source by name: ``"fashion-mnist"``, ``"digits"``.
        train_limit, test_limit: keep a fixed random slice of that many items.
        seed: seeds the slices, the digits split and the synthetic generator.
        image_size: resize (bilinear, antialiased) to this side; default the source's own.
        synthetic_train, synthetic_test: sizes of the synthetic splits.
    """
    choices = ("real", "synthetic", "auto", "fashion-mnist", "digits")
    if data not in choices:
        raise ValueError(f"data must be one of {choices}, got {data!r}")
    if data in ("real", "auto", "fashion-mnist") and fashion_mnist_available():
        (train_x, train_y), (test_x, test_y) = load_fashion_mnist("train"), load_fashion_mnist("test")
        names, source = FASHION_MNIST_CLASSES, "fashion-mnist"
    elif data == "fashion-mnist":
        raise FileNotFoundError(f"Fashion-MNIST not found in {fashion_mnist_dir()} "
                                "(apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR)")
    elif data in ("real", "auto", "digits"):
        (train_x, train_y), (test_x, test_y) = load_digits_split(seed)
        names, source = DIGIT_CLASSES, "digits"
    else:
        train_x, train_y = synthetic_images(synthetic_train, seed=seed)
        test_x, test_y = synthetic_images(synthetic_test, seed=seed + 1)
        names, source = SYNTHETIC_CLASSES, "synthetic"
    train_x, train_y = _limit(train_x, train_y, train_limit, seed)
    test_x, test_y = _limit(test_x, test_y, test_limit, seed + 1)
    train_images, test_images = _to_tensor(train_x), _to_tensor(test_x)
    if image_size is not None and image_size != train_images.shape[-1]:
        train_images = resize(train_images, image_size)
        test_images = resize(test_images, image_size)
    return ImageData(train_images, torch.as_tensor(train_y, dtype=torch.int64), test_images,
                     torch.as_tensor(test_y, dtype=torch.int64), tuple(names), source)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size), bilinear with antialiasing, clamped to [0, 1]."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0.0, 1.0)


def class_balanced_indices(labels: torch.Tensor, per_class: int, seed: int = 0) -> List[int]:
    """Up to ``per_class`` indices of each label, from a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    counts, chosen = {}, []
    for index in order.tolist():
        label = int(labels[index])
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            chosen.append(index)
    return chosen
