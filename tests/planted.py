"""Planted data for learning checks, and a minimal training loop over the public model interface.

The planted dataset has ``K`` item clusters and ``K`` user groups; every user interacts only with items of its own
cluster. Every modality encodes the item's cluster (a per-modality centroid plus noise), so an item's content
tells which users want it, and a missing modality can be recovered from the observed one. The mask is laid out by
hand: in every cluster, the same number of items observe both modalities, miss the first, miss the second, or miss
both. In the new-item setting, the same number of items of every cluster and mask group is new.

Scores are judged by the *percentile* of a held-out item: the fraction of the user's candidate items (every item
but the user's training items and the held-out item itself) that score above it, ties counting half. Random
scores give 0.5 in expectation; scores that rank the user's cluster first give :func:`Planted.oracle_percentile`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from dgmrec.config import resolve_config
from dgmrec.data.dataset import RecDataset
from dgmrec.data.mmrec import make_new_item_split
from dgmrec.models import get_model_class
from dgmrec.models.base import ModelInput, Recommender
from dgmrec.training.sampler import NegativeSampler

#: mask groups of every cluster, as (observes modality 0, observes modality 1)
GROUPS = ((True, True), (False, True), (True, False), (False, False))


@dataclass
class Planted:
    """A planted dataset and its ground truth."""

    ds: RecDataset
    item_cluster: np.ndarray  # (n_items,)
    user_cluster: np.ndarray  # (n_users,)
    group: np.ndarray  # (n_items,) index into GROUPS

    def oracle_scores(self) -> np.ndarray:
        """1 for the items of the user's cluster, 0 otherwise: a ranking that knows the clusters and nothing else."""
        return (self.user_cluster[:, None] == self.item_cluster[None, :]).astype(np.float64)

    def oracle_percentile(self, pairs: np.ndarray, among: np.ndarray | None = None) -> float:
        return float(percentiles(self.oracle_scores(), self.ds.train_matrix(), pairs, among).mean())


def make_planted(n_clusters: int = 4, users_per_cluster: int = 30, items_per_group: int = 6,
                 modalities: Sequence[tuple[str, int]] = (("image", 12), ("text", 10)),
                 per_user: int = 10, n_valid: int = 2, n_test: int = 2, noise: float = 0.3,
                 new_per_group: int = 0, seed: int = 0, name: str = "planted") -> Planted:
    """Build the planted dataset (see the module docstring); ``new_per_group > 0`` gives the new-item setting.

    Items ``c * 4 * items_per_group + g * items_per_group + r`` belong to cluster ``c`` and mask group ``g``
    (``GROUPS[g]`` for the first two modalities; a third modality, if any, is always observed).
    """
    rng = np.random.default_rng(seed)
    n_groups = len(GROUPS)
    per_cluster = n_groups * items_per_group
    n_items = n_clusters * per_cluster
    n_users = n_clusters * users_per_cluster
    item_cluster = np.repeat(np.arange(n_clusters), per_cluster)
    group = np.tile(np.repeat(np.arange(n_groups), items_per_group), n_clusters)
    user_cluster = np.repeat(np.arange(n_clusters), users_per_cluster)
    features: dict[str, np.ndarray] = {}
    for m, dim in modalities:
        centroids = rng.normal(size=(n_clusters, dim))
        features[m] = (centroids[item_cluster] + noise * rng.normal(size=(n_items, dim))).astype(np.float32)
    train, valid, test = [], [], []
    for u in range(n_users):
        own = np.flatnonzero(item_cluster == user_cluster[u])
        chosen = rng.choice(own, size=per_user, replace=False)
        rows = np.stack([np.full(per_user, u), chosen], axis=1)
        n_train = per_user - n_valid - n_test
        train.append(rows[:n_train])
        valid.append(rows[n_train:n_train + n_valid])
        test.append(rows[n_train + n_valid:])
    observed = np.ones((n_items, len(modalities)), dtype=bool)
    for g, obs in enumerate(GROUPS):
        for j, flag in enumerate(obs[: len(modalities)]):
            observed[group == g, j] = flag
    ds = RecDataset(name=name, n_users=n_users, n_items=n_items, train=np.concatenate(train).astype(np.int64),
                    valid=np.concatenate(valid).astype(np.int64), test=np.concatenate(test).astype(np.int64),
                    features=features, observed=observed, source=f"planted(seed={seed})")
    if new_per_group:
        rank_in_group = np.arange(n_items) % items_per_group
        ds = make_new_item_split(ds, rank_in_group < new_per_group)
    return Planted(ds=ds, item_cluster=item_cluster, user_cluster=user_cluster, group=group)


def percentiles(scores: np.ndarray, train: sp.csr_matrix, pairs: np.ndarray,
                among: np.ndarray | None = None) -> np.ndarray:
    """Per pair ``(u, i)``: the share of ``u``'s candidates scoring above ``i`` (ties half); candidates are the
    items of ``among`` (bool mask; default all) but ``u``'s training items and ``i``."""
    out = np.empty(len(pairs))
    for row, (u, i) in enumerate(pairs):
        cand = np.ones(scores.shape[1], dtype=bool) if among is None else among.copy()
        cand[train.indices[train.indptr[u]:train.indptr[u + 1]]] = False
        cand[i] = False
        s = scores[u, cand]
        out[row] = ((s > scores[u, i]).sum() + 0.5 * (s == scores[u, i]).sum()) / cand.sum()
    return out


# ------------------------------------------------------------------------------------ training loop


def build(model: str, ds: RecDataset, seed: int = 0, **overrides: Any) -> Recommender:
    """A freshly initialised model (global torch seed ``seed``) with the shipped configuration + ``overrides``."""
    cfg, _ = resolve_config(model, ds.name, overrides=overrides)
    torch.manual_seed(seed)
    data = ModelInput.from_dataset(ds, imputation=str(cfg["missing_imputation"]))
    return get_model_class(model)(data, cfg)


def fit(model: Recommender, ds: RecDataset, epochs: int, lr: float = 0.01, batch_size: int = 256,
        seed: int = 0, max_batches: int | None = None) -> list[float]:
    """Train ``epochs`` epochs with Adam over ``optimizer_groups()``; returns every step's loss."""
    sampler = NegativeSampler(ds.train, ds.n_items, ds.new_items, seed=seed)
    opt = torch.optim.Adam(model.optimizer_groups(), lr=lr)
    losses = []
    for epoch in range(epochs):
        model.train()
        model.before_epoch(epoch)
        for step, batch in enumerate(sampler.epoch(batch_size, bool(model.config.get("use_neg_sampling", True)))):
            if max_batches is not None and step >= max_batches:
                break
            opt.zero_grad(set_to_none=True)
            out = model.loss(batch)
            if out.total.requires_grad:  # a model without trainable parameters (Content) has no gradient
                out.total.backward()
            opt.step()
            losses.append(float(out.total.detach()))
        model.after_epoch(epoch)
    return losses


def all_scores(model: Recommender, epoch: int | None = None) -> np.ndarray:
    """``(n_users, n_items)`` scores; ``epoch`` given: call ``before_evaluation(epoch)`` first (as the trainer)."""
    model.eval()
    with torch.no_grad():
        if epoch is not None:
            model.before_evaluation(epoch)
        model.prepare_eval()
        return model.score_users(torch.arange(model.n_users)).double().numpy()


def content_scores(planted: Planted, rows: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    """A content-only ranking through modality ``j``: the cosine between an item's row in ``rows`` and the mean
    *observed* row of the user's training items. Returns ``(scores (users x items), users that have a profile)``.

    With the imputed table every masked row is the same vector, so masked items tie (percentile 0.5); rows that
    carry the item's cluster rank them like the oracle.
    """
    ds = planted.ds
    x = np.asarray(ds.features[ds.modalities[j]], dtype=np.float64)
    obs = ds.observed[:, j]
    train = ds.train_matrix()
    profile = np.zeros((ds.n_users, x.shape[1]))
    has = np.zeros(ds.n_users, dtype=bool)
    for u in range(ds.n_users):
        items = train.indices[train.indptr[u]:train.indptr[u + 1]]
        items = items[obs[items]]
        if len(items):
            profile[u], has[u] = x[items].mean(0), True
    rows = np.asarray(rows, dtype=np.float64)
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-12)
    return profile @ unit.T, has
