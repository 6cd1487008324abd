"""What the recommendation methods (``cml``, ``ccn``) share: top-N evaluation over all items,
GAUC, and the baselines trained in the same run (popularity, a short torch BPR-MF)."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.movielens import ImplicitSplit
from .engine import fit
from .evaluation import auc, retrieval_metrics


def topn_metrics(scores: torch.Tensor, split: ImplicitSplit, ks: Sequence[int] = (10, 50), ndcg_k: int = 10) -> Dict[str, float]:
    """recall@k and NDCG@k of each test user's held-out item, ranked against every item the user
    has not interacted with in training (training items are excluded, as in the CML paper).

    ``scores``: (num_users, num_items), higher = recommended first."""
    scores = scores.detach().double().clone()
    train_items = split.train_items_of()
    users = torch.as_tensor(split.test_user)
    for u in split.test_user.tolist():
        scores[u, torch.as_tensor(train_items[u])] = -math.inf
    metrics = retrieval_metrics(scores[users], torch.as_tensor(split.test_item), ks=ks, ndcg_k=ndcg_k)
    return {k: v for k, v in metrics.items() if not k.startswith("mrr")}


def popularity_scores(split: ImplicitSplit) -> torch.Tensor:
    """Every user gets the items ranked by their number of training positives."""
    counts = torch.as_tensor(np.bincount(split.train_item, minlength=split.num_items), dtype=torch.float64)
    return counts.unsqueeze(0).expand(split.num_users, -1)


class MatrixFactorization(nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int):
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.items = nn.Embedding(num_items, dim)
        self.item_bias = nn.Embedding(num_items, 1)
        for table in (self.users, self.items):
            nn.init.normal_(table.weight, std=0.1)
        nn.init.zeros_(self.item_bias.weight)

    def scores(self) -> torch.Tensor:
        return self.users.weight @ self.items.weight.T + self.item_bias.weight.T


def train_bpr_mf(split: ImplicitSplit, dim: int = 64, epochs: int = 30, batch_size: int = 1024, lr: float = 5e-3,
                 weight_decay: float = 1e-5, seed: int = 0) -> MatrixFactorization:
    """BPR-MF (Rendle et al., 2009): one uniformly sampled negative per training positive,
    -log sigmoid(x_ui - x_uj) with L2 on the rows used, Adam."""
    generator = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = MatrixFactorization(split.num_users, split.num_items, dim)
    torch.random.set_rng_state(torch_state)  # leave the caller's random stream as it was
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    users = torch.as_tensor(split.train_user)
    items = torch.as_tensor(split.train_item)
    per_epoch = math.ceil(len(users) / batch_size)
    order = torch.empty(0, dtype=torch.long)

    def compute_gradients(step: int) -> torch.Tensor:
        nonlocal order
        position = step % per_epoch
        if position == 0:
            order = torch.randperm(len(users), generator=generator)
        index = order[position * batch_size:(position + 1) * batch_size]
        u, i = users[index], items[index]
        j = torch.randint(0, split.num_items, (len(index),), generator=generator)
        eu, ei, ej = model.users(u), model.items(i), model.items(j)
        difference = (eu * (ei - ej)).sum(-1) + (model.item_bias(i) - model.item_bias(j)).squeeze(-1)
        loss = -F.logsigmoid(difference).mean()
        loss = loss + weight_decay * (eu.square().sum() + ei.square().sum() + ej.square().sum()) / len(index)
        loss.backward()
        return loss

    fit(range(epochs * per_epoch), optimizer, compute_gradients)
    return model


def gauc(users: Sequence[int], labels: Sequence[float], scores: Sequence[float]) -> float:
    """Group AUC (Zhou et al., DIN): each user's AUC over its impressions (scikit-learn's),
    averaged with weights = the user's number of impressions; users whose impressions are all
    clicks or all non-clicks are skipped."""
    users, labels, scores = np.asarray(users), np.asarray(labels), np.asarray(scores)
    order = np.argsort(users, kind="stable")
    users, labels, scores = users[order], labels[order], scores[order]
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    total, weight = 0.0, 0
    for first, last in zip(bounds[:-1], bounds[1:]):
        value = auc(labels[first:last], scores[first:last])
        if not math.isnan(value):
            total += value * (last - first)
            weight += last - first
    return total / weight if weight else math.nan


def ctr_metrics(users: Sequence[int], labels: Sequence[float], scores: Sequence[float]) -> Dict[str, float]:
    return {"auc": auc(labels, scores), "gauc": gauc(users, labels, scores)}


__all__: List[str] = ["topn_metrics", "popularity_scores", "train_bpr_mf", "MatrixFactorization", "gauc", "ctr_metrics"]
