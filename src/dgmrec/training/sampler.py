"""Vectorised BPR sampling: shuffled training pairs with one uniformly drawn negative each."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dgmrec.models.base import Batch


class NegativeSampler:
    """Draws negatives uniformly from the items that occur in training, excluding new items.

    A negative is re-drawn (vectorised, all offending rows at once) while it is a training item of its user.
    All randomness comes from a dedicated :class:`torch.Generator`, whose state is checkpointed.
    """

    def __init__(self, train_pairs: np.ndarray, n_items: int, new_items: np.ndarray | None = None,
                 seed: int = 0, device: torch.device | str = "cpu") -> None:
        pairs = np.unique(train_pairs, axis=0)
        self.pairs = torch.as_tensor(pairs, dtype=torch.long)
        self.n_items = n_items
        keys = pairs[:, 0].astype(np.int64) * n_items + pairs[:, 1]
        self.keys = torch.as_tensor(np.sort(keys), dtype=torch.long)
        cand = np.unique(pairs[:, 1])
        if new_items is not None:
            cand = cand[~new_items[cand]]
        self.candidates = torch.as_tensor(cand, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.device = torch.device(device)
        # pairs all share the original duplicates-free order; the raw file's duplicates are dropped
        self.train_pairs = torch.as_tensor(train_pairs, dtype=torch.long)

    def _is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        q = users * self.n_items + items
        pos = torch.searchsorted(self.keys, q).clamp_max(len(self.keys) - 1)
        return self.keys[pos] == q

    def sample_negatives(self, users: torch.Tensor) -> torch.Tensor:
        n_cand = len(self.candidates)
        neg = self.candidates[torch.randint(n_cand, (len(users),), generator=self.generator)]
        bad = self._is_positive(users, neg)
        for _ in range(1000):
            if not bad.any():
                break
            idx = torch.nonzero(bad).squeeze(1)
            neg[idx] = self.candidates[torch.randint(n_cand, (len(idx),), generator=self.generator)]
            bad[idx] = self._is_positive(users[idx], neg[idx])
        return neg

    def epoch(self, batch_size: int, with_negatives: bool = True) -> Iterator[Batch]:
        """Batches of one epoch over the training pairs (the raw list, shuffled)."""
        perm = torch.randperm(len(self.train_pairs), generator=self.generator)
        for start in range(0, len(perm), batch_size):
            chunk = self.train_pairs[perm[start:start + batch_size]]
            users, pos = chunk[:, 0], chunk[:, 1]
            neg = self.sample_negatives(users) if with_negatives else pos
            yield Batch(users.to(self.device), pos.to(self.device), neg.to(self.device))

    def n_batches(self, batch_size: int) -> int:
        return (len(self.train_pairs) + batch_size - 1) // batch_size

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
