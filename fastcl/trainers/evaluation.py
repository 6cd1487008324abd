"""Metrics shared by the methods: rank correlation, retrieval (recall@k, MRR@k, NDCG@k),
probes on frozen embeddings (k-NN, linear) and AUC. Inputs are tensors or arrays; outputs floats."""
from __future__ import annotations

import math
from typing import Dict, Iterable, Sequence

import numpy as np
import torch


def progress(iterable, description: str, total=None):
    """``iterable`` with a progress bar on stderr (tqdm, when installed) for long evaluations."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, total=total, leave=False, dynamic_ncols=True, unit="batch")


def spearman(predicted: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman rank correlation (scipy's, ties averaged)."""
    from scipy.stats import spearmanr

    predicted, gold = np.asarray(predicted, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if predicted.shape != gold.shape or predicted.ndim != 1:
        raise ValueError(f"predicted and gold must be 1-D of the same length, got {predicted.shape} and {gold.shape}")
    return float(spearmanr(predicted, gold).statistic)


def rank_of_relevant(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's relevant candidate (number of candidates scored strictly higher)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    relevant = torch.as_tensor(relevant, dtype=torch.long)
    if scores.dim() != 2 or relevant.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (queries, candidates) and relevant (queries,), got {tuple(scores.shape)} and {tuple(relevant.shape)}")
    positive = scores.gather(1, relevant[:, None])
    return (scores > positive).sum(1)


def retrieval_metrics(scores: torch.Tensor, relevant: torch.Tensor, ks: Iterable[int] = (1, 5, 20),
                      mrr_k: int = 10, ndcg_k: int = 10) -> Dict[str, float]:
    """recall@k (relevant in the top k), MRR@k and NDCG@k for one relevant candidate per query."""
    ranks = rank_of_relevant(scores, relevant).double()
    out = {f"recall@{k}": float((ranks < k).double().mean()) for k in ks}
    out[f"mrr@{mrr_k}"] = float(torch.where(ranks < mrr_k, 1.0 / (ranks + 1), torch.zeros_like(ranks)).mean())
    out[f"ndcg@{ndcg_k}"] = float(torch.where(ranks < ndcg_k, 1.0 / torch.log2(ranks + 2), torch.zeros_like(ranks)).mean())
    return out


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20) -> float:
    """Cosine k-NN classification accuracy (majority vote) on frozen embeddings."""
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(n_neighbors=min(k, len(train_x)), metric="cosine")
    classifier.fit(np.asarray(train_x), np.asarray(train_y))
    return float(classifier.score(np.asarray(test_x), np.asarray(test_y)))


def linear_probe_accuracy(train_x, train_y, test_x, test_y, max_iter: int = 1000) -> float:
    """Accuracy of a logistic-regression probe trained on frozen (standardized) embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    probe.fit(np.asarray(train_x), np.asarray(train_y))
    return float(probe.score(np.asarray(test_x), np.asarray(test_y)))


def auc(labels, scores) -> float:
    """ROC AUC (scikit-learn); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, np.asarray(scores)))
