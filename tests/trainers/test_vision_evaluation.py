"""Metrics and encoders of the vision trainers, on hand-made cases."""
import math

import pytest
import torch

from fastcl.trainers.vision_evaluation import (box_recall, knn_accuracy, linear_probe_accuracy, peak_memory,
                                               retrieval_accuracy, zero_shot_accuracy)
from fastcl.trainers.vision_models import CaptionTower, ProjectionHead, SmallResNet


def test_box_recall_hand_made():
    # canvas 112, one scale of side 56 with patch 14: a 4 x 4 grid, each patch 28 canvas pixels
    # (centres at 14, 42, 70, 98). The box (0, 0, 60, 60) holds the centres of patches 0, 1, 4, 5.
    boxes = torch.tensor([[0, 0, 60, 60], [0, 0, 60, 60], [80, 80, 112, 112]])
    selection = torch.tensor([[0, 1, 4, 5], [0, 2, 3, 15], [15, 14, 13, 12]])
    recall = box_recall([selection], [56], boxes, 14, 112, reduce=False)
    assert recall.tolist() == [1.0, 0.25, 1.0]
    assert box_recall([selection], [56], boxes, 14, 112) == pytest.approx(0.75)
    # two scales pool their counts: scale 28 (2 x 2, centres 28 and 84) puts patch 0 in the
    # first two boxes and patch 3 in the third
    coarse = torch.tensor([[1], [0], [0]])
    pooled = box_recall([selection, coarse], [56, 28], boxes, 14, 112, reduce=False)
    assert pooled.tolist() == [4 / 5, 2 / 5, 1 / 2]
    # a box that holds no patch centre is left out of the mean
    tiny = torch.tensor([[0, 0, 5, 5], [0, 0, 60, 60]])
    assert math.isnan(box_recall([selection[:2]], [56], tiny, 14, 112, reduce=False)[0])
    assert box_recall([selection[:2]], [56], tiny, 14, 112) == pytest.approx(0.25)


def test_knn_matches_a_brute_force_vote():
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 5, generator=generator), torch.randn(25, 5, generator=generator)
    train_labels, test_labels = torch.randint(0, 3, (60,), generator=generator), torch.randint(0, 3, (25,), generator=generator)
    k, temperature = 7, 0.1
    correct = 0
    for x, y in zip(test, test_labels):
        similarity = torch.nn.functional.cosine_similarity(x[None], train, dim=1)
        nearest = similarity.argsort(descending=True)[:k]
        votes = [float(sum(math.exp(similarity[j] / temperature) for j in nearest if train_labels[j] == c))
                 for c in range(3)]
        correct += int(max(range(3), key=votes.__getitem__) == int(y))
    assert knn_accuracy(train, train_labels, test, test_labels, k=k, temperature=temperature, chunk=4) == correct / 25


def test_probe_zero_shot_and_retrieval_on_separable_data():
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 8, generator=generator) * 4
    labels = torch.arange(200) % 4
    features = centres[labels] + torch.randn(200, 8, generator=generator) * 0.3
    assert linear_probe_accuracy(features[:150], labels[:150], features[150:], labels[150:]) == 1.0
    assert zero_shot_accuracy(features, centres, labels) > 0.95
    assert zero_shot_accuracy(features, centres[[1, 2, 3, 0]], labels) < 0.05
    queries = torch.eye(3)
    assert retrieval_accuracy(queries, torch.eye(3)) == 1.0
    assert retrieval_accuracy(queries, torch.eye(3), torch.tensor([0, 2, 1])) == pytest.approx(1 / 3)


def test_encoders_shapes_and_grad_cache_safe_norm():
    encoder = SmallResNet(widths=(8, 16), norm="group")
    x = torch.rand(6, 1, 28, 28)
    features = encoder(x)
    assert features.shape == (6, 16) and encoder.feature_dim == 16
    # group norm: a sample's features do not depend on the rest of its batch (GradCache exact)
    torch.testing.assert_close(encoder(x[:2]), features[:2], rtol=1e-5, atol=1e-6)
    assert ProjectionHead(16, 32, 8)(features).shape == (6, 8)
    with pytest.raises(ValueError, match="norm"):
        SmallResNet(norm="layer")


def test_bag_of_words_caption_tower():
    tower = CaptionTower(["a red bag", "a bag", "a blue shoe"], out_dim=4, kind="bow", bow_dim=3)
    ids = torch.tensor([2, 0, 0, 1])
    raw = tower.raw(ids)
    vocabulary = sorted({"a", "red", "bag", "blue", "shoe"})
    emb = {w: tower.embedding.weight[i] for i, w in enumerate(vocabulary)}
    torch.testing.assert_close(raw[0], (emb["a"] + emb["blue"] + emb["shoe"]) / 3)
    torch.testing.assert_close(raw[1], (emb["a"] + emb["red"] + emb["bag"]) / 3)
    torch.testing.assert_close(raw[3], (emb["a"] + emb["bag"]) / 2)
    assert tower(ids).shape == (4, 4)


def test_peak_memory_sees_a_large_allocation():
    seconds, peak = peak_memory(lambda: torch.ones(64 * 2**20 // 4).sum(), "cpu")
    assert seconds > 0
    assert math.isnan(peak) or peak > 32 * 2**20
