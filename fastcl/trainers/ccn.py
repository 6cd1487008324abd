"""Collaborative Contrastive Network (CCN, Gao et al. 2024) on MovieLens-100k impression pages.

Pages: each user's ratings cut into pages of the items rated within one time window (``--window``
seconds, at most ``--page-length`` items); rating >= 4 is a click, lower a non-click. The page's
first click is its trigger item (the item the user came from) and leaves the page's targets;
pages without a click have no trigger (a zero embedding). A CTR model (user, item embeddings +
an MLP over [user, target, trigger, page-context mean, target * trigger]) predicts each
target's click, trained with BCE + lambda * the collaborative contrastive loss over each page's
item embeddings (co-clicked and co-non-clicked items attract, mono-click pairs repel; with
``--trigger-hadamard`` through the trigger's Hadamard product, CCN's collaborative module), a
documented reconstruction (see fastcl.ops.collaborative). On MovieLens the Hadamard form did
not help (many pages have no click, hence no trigger), so it is off by default.
Evaluation: AUC and GAUC (impression-weighted per-user AUC, scikit-learn) on each user's latest
pages (a time split); the lambda = 0 ablation (BCE only, same batches, steps, schedule and
initialization) is trained in the same run (section ``lambda_0``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .config import TrainConfig, option
from .data import choose
from .data import movielens
from .engine import BatchOrder, Method, Stage, fit, linear_schedule, step_seed, total_steps_of
from .recommendation import ctr_metrics

DEFAULT_STEPS = 400
BENCH_ARGS = ["--data", "auto", "--steps", "20", "--ablation", "false"]


@dataclass
class Config(TrainConfig):
    grad_cache_supported: ClassVar[bool] = False  # no encoders: the embeddings are the parameters
    dim: int = option(32, "embedding dimension")
    hidden: int = option(128, "width of the MLP's first layer (the second is half)")
    contrastive_weight: float = option(0.5, "lambda: weight of the collaborative contrastive loss (0: the backbone alone)")
    temperature: float = option(0.2, "tau of the collaborative contrastive loss")
    trigger_hadamard: bool = option(False, "contrast items through the trigger's Hadamard product (CCN's collaborative module; pages without a click have no trigger)")
    window: int = option(3600, "seconds: ratings within this time of a page's first one share the page")
    page_length: int = option(20, "at most this many items per page")
    batch_size: int = option(128, "global batch of pages")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(1e-5, "AdamW weight decay")
    ablation: bool = option(True, "also train the lambda = 0 model in the same run (section lambda_0)")

    def __post_init__(self):
        super().__post_init__()
        if self.contrastive_weight < 0:
            raise ValueError(f"--contrastive-weight must be >= 0, got {self.contrastive_weight}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if self.page_length < 2:
            raise ValueError(f"--page-length must be at least 2, got {self.page_length}")


class CTRModel(nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int, hidden: int):
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.items = nn.Embedding(num_items + 1, dim, padding_idx=num_items)  # the last row: padding / no trigger
        self.mlp = nn.Sequential(nn.Linear(5 * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(),
                                 nn.Linear(hidden // 2, 1))
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)
        with torch.no_grad():
            self.items.weight[num_items].zero_()

    def forward(self, users, items, mask, trigger):
        """(click logits (P, L), item embeddings (P, L, D), trigger embeddings (P, D))."""
        e = self.items(items)
        t = self.items(trigger)
        u = self.users(users)
        weights = mask.unsqueeze(-1).to(e.dtype)
        context = (e * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        length = items.shape[1]
        expand = lambda x: x.unsqueeze(1).expand(-1, length, -1)  # noqa: E731
        features = torch.cat([expand(u), e, expand(t), expand(context), e * t.unsqueeze(1)], dim=-1)
        return self.mlp(features).squeeze(-1), e, t


def trigger_pages(pages: movielens.Pages) -> movielens.Pages:
    """The trigger (first click) leaves its page's targets: it is where the user came from."""
    mask = pages.mask.copy()
    has = pages.trigger != pages.pad
    positions = np.argmax(pages.clicks & pages.mask, axis=1)
    mask[np.flatnonzero(has), positions[has]] = False
    kept = mask.sum(1) >= 1
    out = movielens.Pages(pages.items, pages.clicks, mask, pages.user, pages.trigger, pages.time, pages.num_users,
                          pages.num_items)
    return out.subset(np.flatnonzero(kept))


def load_pages(config: Config):
    def cut(ratings):
        split = movielens.time_split(movielens.pages(ratings, config.window, config.page_length))
        return tuple(trigger_pages(p) for p in split)

    return choose(config.data, lambda: cut(movielens.load_ml100k()),
                  lambda: cut(movielens.synthetic_ratings(seed=config.seed)),
                  f"MovieLens-100k (recbole's copy) pages of {config.window} s, rating >= 4 = click, per-user time split")


def collate_pages(pages: movielens.Pages):
    def collate(indices):
        index = np.asarray(indices)
        return {"users": torch.as_tensor(pages.user[index]), "items": torch.as_tensor(pages.items[index]),
                "mask": torch.as_tensor(pages.mask[index]), "clicks": torch.as_tensor(pages.clicks[index]),
                "trigger": torch.as_tensor(pages.trigger[index])}

    return collate


def page_loss(batch, model, config: Config, contrastive_weight: float, loss_kind: str) -> torch.Tensor:
    logits, e, t = model(batch["users"], batch["items"], batch["mask"], batch["trigger"])
    mask = batch["mask"]
    bce = F.binary_cross_entropy_with_logits(logits[mask].float(), batch["clicks"][mask].float())
    if not contrastive_weight:
        return bce
    contrastive = losses.collaborative_contrastive_loss(
        e, batch["clicks"], mask, trigger=t if config.trigger_hadamard else None, temperature=config.temperature,
        loss=loss_kind)
    return bce + contrastive_weight * contrastive


@torch.no_grad()
def evaluate_pages(model: CTRModel, pages: movielens.Pages, batch: int = 512):
    model.eval()
    collate = collate_pages(pages)
    users, labels, scores = [], [], []
    for start in range(0, len(pages), batch):
        data = collate(range(start, min(len(pages), start + batch)))
        logits, _, _ = model(data["users"], data["items"], data["mask"], data["trigger"])
        mask = data["mask"]
        scores.append(logits[mask].float().numpy())
        labels.append(data["clicks"][mask].numpy())
        users.append(data["users"].unsqueeze(1).expand_as(mask)[mask].numpy())
    return ctr_metrics(np.concatenate(users), np.concatenate(labels), np.concatenate(scores))


def train_ablation(config: Config, train_pages: movielens.Pages, test_pages: movielens.Pages, initial_state,
                   total_steps: int):
    """The lambda = 0 model: the engine's recipe (AdamW, linear decay, the same batch order and
    initialization, per-step seeds, :func:`~.engine.fit`) with BCE alone, on one process."""
    model = CTRModel(train_pages.num_users, train_pages.num_items, config.dim, config.hidden)
    model.load_state_dict(initial_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = BatchOrder(len(train_pages), config.batch_size, config.seed)
    collate = collate_pages(train_pages)

    def compute_gradients(step: int) -> torch.Tensor:
        torch.manual_seed(step_seed(config.seed, step, 0))
        loss = page_loss(collate(order.indices(step)), model, config, 0.0, config.loss)
        loss.backward()
        return loss

    state = torch.random.get_rng_state()
    model.train()
    fit(range(total_steps), optimizer, compute_gradients,
        scheduler=linear_schedule(optimizer, config.warmup_steps, total_steps))
    torch.random.set_rng_state(state)
    return evaluate_pages(model, test_pages)


def build(config: Config) -> Method:
    (train_pages, test_pages), real, source = load_pages(config)
    model = CTRModel(train_pages.num_users, train_pages.num_items, config.dim, config.hidden)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    collate = collate_pages(train_pages)

    def baselines():
        if not config.ablation:
            return {}
        steps = total_steps_of(config, [Stage("train", range(len(train_pages)), collate)], DEFAULT_STEPS)
        return {"lambda_0": train_ablation(config, train_pages, test_pages, initial_state, steps)}

    return Method(model=model, train_data=range(len(train_pages)), collate=collate,
                  loss=lambda batch, model: page_loss(batch, model, config, config.contrastive_weight, config.loss),
                  evaluate=lambda model: evaluate_pages(model, test_pages), baselines=baselines, goal_metric="auc",
                  data_source=f"{source}; {len(train_pages)} training pages ({int(train_pages.mask.sum())} impressions), "
                              f"{len(test_pages)} test pages",
                  extra={"train_pages": len(train_pages), "test_pages": len(test_pages),
                         "train_impressions": int(train_pages.mask.sum()), "test_impressions": int(test_pages.mask.sum()),
                         "click_rate": float(train_pages.clicks[train_pages.mask].mean())})
