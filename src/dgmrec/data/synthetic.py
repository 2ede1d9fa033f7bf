"""A small synthetic multimodal dataset with planted structure (the demo's and the tests' data).

Users and items have latent factors; each modality of an item is ``general projection of the shared item
factor + a modality-specific factor projection + noise``; interactions are drawn from the user-item
affinities. Everything is deterministic given the seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dgmrec.data.dataset import RecDataset
from dgmrec.data.masks import generate_missing_mask
from dgmrec.data.raw import chronological_labels


def make_synthetic(
    n_users: int = 600,
    n_items: int = 400,
    modalities: Sequence[tuple[str, int]] = (("image", 64), ("text", 48), ("audio", 32)),
    latent_dim: int = 16,
    interactions_per_user: int = 20,
    missing_ratio: float = 0.6,
    noise: float = 0.1,
    seed: int = 0,
    name: str = "synthetic",
) -> RecDataset:
    """Generate a dataset whose interactions follow the item factors that the features encode.

    ``missing_ratio`` of the items lose modalities with the reference recipe (:func:`generate_missing_mask`).
    The features of masked items keep their true values, so retrieval experiments have ground truth.
    """
    rng = np.random.default_rng(seed)
    user_f = rng.normal(size=(n_users, latent_dim))
    item_f = rng.normal(size=(n_items, latent_dim))
    popularity = rng.normal(scale=0.5, size=n_items)
    features: dict[str, np.ndarray] = {}
    for _name, dim in modalities:
        general = item_f @ rng.normal(size=(latent_dim, dim)) / np.sqrt(latent_dim)
        specific = rng.normal(size=(n_items, 4)) @ rng.normal(size=(4, dim)) / 2.0
        features[_name] = (general + 0.5 * specific + noise * rng.normal(size=(n_items, dim))).astype(np.float32)
    logits = user_f @ item_f.T / np.sqrt(latent_dim) * 2.5 + popularity
    users, items = [], []
    for u in range(n_users):
        p = np.exp(logits[u] - logits[u].max())
        p /= p.sum()
        k = int(min(n_items - 1, max(5, rng.poisson(interactions_per_user))))
        chosen = rng.choice(n_items, size=k, replace=False, p=p)
        users.append(np.full(k, u))
        items.append(chosen)
    u_arr = np.concatenate(users).astype(np.int64)
    i_arr = np.concatenate(items).astype(np.int64)
    labels = chronological_labels(u_arr, rng.random(len(u_arr)))
    pairs = np.stack([u_arr, i_arr], axis=1)
    train, valid, test = (pairs[labels == k] for k in range(3))
    counts = np.bincount(train[:, 1], minlength=n_items)
    observed = generate_missing_mask(counts, len(modalities), missing_ratio, seed=seed + 1225)
    return RecDataset(name=name, n_users=n_users, n_items=n_items, train=train, valid=valid, test=test,
                      features=features, observed=observed, source=f"synthetic(seed={seed})")
