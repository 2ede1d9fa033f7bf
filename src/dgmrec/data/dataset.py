"""The in-memory dataset every model and experiment works on.

A :class:`RecDataset` holds contiguous integer ids, the three interaction splits, one raw feature matrix per
modality (rows of unobserved items may hold the true feature, NaN, or anything: the ``observed`` mask is the
only source of truth), the observed mask and, in the new-item setting, the set of new items.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from dgmrec.data.scaling import feature_scales
from dgmrec.errors import DataError

SETTINGS = ("missing", "new-items")


@dataclass
class RecDataset:
    """Interactions, modality features and the observed mask of one dataset.

    Parameters
    ----------
    name:
        Dataset name (the stem of the ``.inter`` file); selects shipped per-dataset configurations.
    n_users, n_items:
        Number of users and items; ids are ``0..n-1``.
    train, valid, test:
        ``(n, 2)`` int64 arrays of ``(user, item)`` pairs.
    features:
        Modality name -> ``(n_items, d_m)`` float32 matrix, in modality order.
    observed:
        ``(n_items, M)`` bool, ``observed[i, m]`` is True when modality ``m`` of item ``i`` is available.
    new_items:
        Bool ``(n_items,)`` marking items unseen in training (new-item setting), or None.
    setting:
        ``"missing"`` or ``"new-items"``.
    test_new_only:
        In the new-item setting, the test pairs whose item is new (a second, harder test set).
    """

    name: str
    n_users: int
    n_items: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    features: dict[str, np.ndarray]
    observed: np.ndarray
    new_items: np.ndarray | None = None
    setting: str = "missing"
    test_new_only: np.ndarray | None = None
    source: str = ""
    _train_csr: sp.csr_matrix | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        src = self.source or self.name
        for split in ("train", "valid", "test"):
            pairs = getattr(self, split)
            if pairs.ndim != 2 or pairs.shape[1] != 2:
                raise DataError(f"{split} pairs must have shape (n, 2), got {pairs.shape}", source=src)
            if len(pairs) and (pairs.min() < 0 or pairs[:, 0].max() >= self.n_users
                               or pairs[:, 1].max() >= self.n_items):
                raise DataError(f"{split} has user or item ids out of range", source=src)
        if self.setting not in SETTINGS:
            raise DataError(f"unknown setting {self.setting!r}; known: {', '.join(SETTINGS)}", source=src)
        if len(self.features) < 1:
            raise DataError("no modality features", source=src)
        if self.observed.shape != (self.n_items, len(self.features)):
            raise DataError(
                f"observed mask has shape {self.observed.shape}, expected ({self.n_items}, {len(self.features)})",
                source=src,
            )
        for name, x in self.features.items():
            if x.ndim != 2 or x.shape[0] != self.n_items:
                raise DataError(f"feature '{name}' has shape {x.shape}, expected ({self.n_items}, d)", source=src)
        if self.new_items is not None and self.new_items.shape != (self.n_items,):
            raise DataError("new_items must be a bool vector over items", source=src)

    # ----------------------------------------------------------------- derived
    @property
    def modalities(self) -> list[str]:
        return list(self.features)

    @property
    def n_modalities(self) -> int:
        return len(self.features)

    def train_matrix(self) -> sp.csr_matrix:
        """Binary user x item training matrix (duplicates collapsed)."""
        if self._train_csr is None:
            m = sp.csr_matrix(
                (np.ones(len(self.train), dtype=np.float32), (self.train[:, 0], self.train[:, 1])),
                shape=(self.n_users, self.n_items),
            )
            m.data[:] = 1.0
            m.sum_duplicates()
            m.data[:] = 1.0
            self._train_csr = m
        return self._train_csr

    def split_pairs(self, split: str) -> np.ndarray:
        if split == "test_new":
            if self.test_new_only is None:
                raise DataError("this dataset has no new-item test set")
            return self.test_new_only
        if split not in ("train", "valid", "test"):
            raise DataError(f"unknown split {split!r}")
        return getattr(self, split)

    @property
    def missing_count(self) -> np.ndarray:
        """Number of missing modalities per item."""
        return (~self.observed).sum(axis=1)

    def select_modalities(self, names: list[str]) -> RecDataset:
        """A view restricted to ``names`` (in that order); the mask follows."""
        unknown = [n for n in names if n not in self.features]
        if unknown:
            raise DataError(
                f"unknown modality {unknown[0]!r}; this dataset has: {', '.join(self.features)}",
                source="--modalities",
            )
        if len(set(names)) != len(names):
            raise DataError("a modality is listed twice", source="--modalities")
        idx = [self.modalities.index(n) for n in names]
        return replace(
            self,
            features={n: self.features[n] for n in names},
            observed=self.observed[:, idx].copy(),
            _train_csr=None,
        )

    def statistics(self) -> dict[str, object]:
        """Summary numbers of the dataset, as printed by ``dgmrec data check``."""
        n_inter = len(self.train) + len(self.valid) + len(self.test)
        miss = self.missing_count
        stats: dict[str, object] = {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": n_inter,
            "train": len(self.train),
            "valid": len(self.valid),
            "test": len(self.test),
            "sparsity": round(1.0 - n_inter / max(1, self.n_users * self.n_items), 6),
            "modalities": {n: int(x.shape[1]) for n, x in self.features.items()},
            "missing_per_modality": {
                n: int((~self.observed[:, j]).sum()) for j, n in enumerate(self.modalities)
            },
            "items_by_missing_count": {int(k): int((miss == k).sum()) for k in range(self.n_modalities + 1)},
            # per modality over observed rows: mean row L2 norm and mean per-dimension std
            "feature_scale": {n: {k: float(f"{v:.6g}") for k, v in sc.items()}
                              for n, sc in feature_scales(self.features, self.observed).items()},
            "setting": self.setting,
        }
        if self.new_items is not None:
            stats["new_items"] = int(self.new_items.sum())
            if self.test_new_only is not None:
                stats["test_new_only"] = len(self.test_new_only)
        return stats
