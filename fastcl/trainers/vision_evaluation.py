"""Metrics of the vision trainers.

* :func:`linear_probe_accuracy` - scikit-learn logistic regression on frozen, standardized
  features (train split) scored on the test split.
* :func:`knn_accuracy` - weighted k-nearest-neighbour vote on cosine similarity
  (weights ``exp(cos / T)``, as the kNN monitor of InstDisc / SimCLR-style benchmarks).
* :func:`zero_shot_accuracy` - top-1 of image embeddings against one embedding per class.
* :func:`box_recall` - fraction of a box's high-res patches (centre inside the box) that the
  selection picked, pooled over scales.
* :func:`retrieval_accuracy` - top-1 of queries against candidates with a known match.
* :func:`peak_memory` - time and peak memory (CUDA allocator, or RSS high-water mark on CPU)
  of a callable.
"""
from __future__ import annotations

import gc
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.canvases import box_mask
from .engine import PeakMemory


@torch.no_grad()
def extract_features(encoder: Callable, images: torch.Tensor, batch_size: int = 512,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Features of ``images`` in batches (moved to ``device``, default the encoder's parameters'),
    float32 on the CPU. The caller sets eval mode."""
    if device is None:
        device = next((p.device for p in getattr(encoder, "parameters", lambda: [])()), torch.device("cpu"))
    out = [encoder(images[start:start + batch_size].to(device)).float().cpu()
           for start in range(0, len(images), batch_size)]
    return torch.cat(out)


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels, *, max_iter: int = 1000,
                          C: float = 1.0) -> float:
    """Logistic regression (lbfgs, multinomial) on standardized features: test accuracy.

    BLAS runs on one thread: on a shared machine, OpenBLAS's spinning threads made the fit 3x
    slower than one thread."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def numpy(x):
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    train_x, test_x = numpy(train_features).astype(np.float64), numpy(test_features).astype(np.float64)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs stopping at max_iter is the caller's budget
        scaler = StandardScaler().fit(train_x)
        model = LogisticRegression(max_iter=max_iter, C=C)
        model.fit(scaler.transform(train_x), numpy(train_labels))
        return float((model.predict(scaler.transform(test_x)) == numpy(test_labels)).mean())


@torch.no_grad()
def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN on cosine similarity: class score = sum over the k nearest training items of
    that class of ``exp(cos / temperature)``; returns top-1 accuracy on the test items."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train = F.normalize(train_features.float(), dim=-1)
    test = F.normalize(test_features.float(), dim=-1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk):
        similarity = test[start:start + chunk] @ train.T
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(top.shape[0], classes).scatter_add_(1, train_labels[index], (top / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start:start + chunk]).sum())
    return correct / test.shape[0]


@torch.no_grad()
def zero_shot_accuracy(image_embeddings: torch.Tensor, class_embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``argmax_c cos(image, class_c)``; embeddings (N, D) and (C, D)."""
    logits = F.normalize(image_embeddings.float(), dim=-1) @ F.normalize(class_embeddings.float(), dim=-1).T
    return float((logits.argmax(1) == labels).float().mean())


def box_recall(selection: Sequence[torch.Tensor], scales: Sequence[int], boxes: torch.Tensor, patch_size: int,
               canvas_side: int, reduce: bool = True):
    """Recall of the box's patches among the selected ones, pooled over scales.

    For image b: ``sum_s |selected_s(b) & box_s(b)| / sum_s |box_s(b)|`` where ``box_s(b)`` are
    the patches of scale s (side ``scales[s]``, grid ``scales[s] // patch_size``) whose centre
    lies in ``boxes[b]`` (top, left, bottom, right) in canvas pixels. Images whose box holds no
    patch centre are left out of the mean (NaN with ``reduce=False``).
    """
    hits = torch.zeros(boxes.shape[0], dtype=torch.float64)
    total = torch.zeros(boxes.shape[0], dtype=torch.float64)
    for index, side in zip(selection, scales):
        grid = side // patch_size
        inside = box_mask(boxes, grid, patch_size, side, canvas_side).flatten(1).cpu()
        hits += torch.gather(inside, 1, index.cpu()).sum(1)
        total += inside.sum(1)
    recall = torch.where(total > 0, hits / total.clamp(min=1), torch.full_like(total, float("nan")))
    if not reduce:
        return recall
    valid = recall[~recall.isnan()]
    return float(valid.mean()) if valid.numel() else float("nan")


@torch.no_grad()
def retrieval_accuracy(queries: torch.Tensor, candidates: torch.Tensor, targets: Optional[torch.Tensor] = None) -> float:
    """Top-1 accuracy of ``argmax_j cos(queries[i], candidates[j]) == targets[i]`` (default i)."""
    scores = F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
    if targets is None:
        targets = torch.arange(queries.shape[0], device=scores.device)
    return float((scores.argmax(1) == targets).float().mean())


def peak_memory(run: Callable[[], object], device: torch.device, repeats: int = 1):
    """(seconds per call (median), peak bytes beyond what was allocated before) of ``run()``.

    CUDA: the allocator's peak. CPU: the RSS high-water mark after resetting it through
    ``/proc/self/clear_refs`` (NaN where that is not allowed). One warm-up call runs first.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    sync()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory = PeakMemory(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    peak_mb = memory.peak_mb()
    return float(np.median(times)), float("nan") if peak_mb is None else max(0.0, peak_mb * 2**20)
