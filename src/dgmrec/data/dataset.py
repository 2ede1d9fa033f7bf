"""The in-memory dataset every model and experiment works on.

A :class:`RecDataset` holds contiguous integer ids, the three interaction splits, one raw feature matrix per
modality (rows of unobserved items may hold the true feature, NaN, or anything: the ``observed`` mask is the
only source of truth), the observed mask and, in the new-item setting, the set of new items. A dataset may
have no modality at all (models that use no features train on it), and may carry the original ids of its
users and items (``user_ids.csv`` / ``item_ids.csv`` of a folder) to translate between them and the internal
indices.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    user_ids, item_ids:
        Optional ``(n_users,)`` / ``(n_items,)`` string arrays: the original id of each internal index.
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
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
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
        for kind, ids, n in (("user", self.user_ids, self.n_users), ("item", self.item_ids, self.n_items)):
            if ids is not None and ids.shape != (n,):
                raise DataError(f"{kind} id map has {len(ids)} entries for {n} {kind}s", source=src)

    # ---------------------------------------------------------------- raw ids
    def user_index(self, ids: Iterable[object], source: str = "users", *, original: bool = True) -> np.ndarray:
        """Internal indices of users given by original id (by index when ``original`` is false or the dataset
        has no user id map); an unknown id is a :class:`DataError` naming it."""
        return _lookup(ids, self.user_ids if original else None, self.n_users, "user", source)

    def item_index(self, ids: Iterable[object], source: str = "items", *, original: bool = True) -> np.ndarray:
        """Internal indices of items given by original id (by index without an item id map)."""
        return _lookup(ids, self.item_ids if original else None, self.n_items, "item", source)

    def user_labels(self, index: np.ndarray) -> np.ndarray:
        """The original ids of internal user indices (the indices themselves without a user id map)."""
        return np.asarray(index) if self.user_ids is None else self.user_ids[np.asarray(index, dtype=np.int64)]

    def item_labels(self, index: np.ndarray) -> np.ndarray:
        """The original ids of internal item indices (the indices themselves without an item id map)."""
        return np.asarray(index) if self.item_ids is None else self.item_ids[np.asarray(index, dtype=np.int64)]

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


def _lookup(ids: Iterable[object], table: np.ndarray | None, n: int, kind: str, source: str) -> np.ndarray:
    wanted = list(ids)
    if table is None:
        out = []
        for v in wanted:
            text = str(v).strip()
            if not text.lstrip("-").isdigit() or not 0 <= int(text) < n:
                raise DataError(f"unknown {kind} {str(v).strip()!r} (internal {kind} indices are 0..{n - 1})",
                                source=source)
            out.append(int(text))
        return np.asarray(out, dtype=np.int64)
    index = {str(v): i for i, v in enumerate(table)}
    unknown = [v for v in wanted if str(v).strip() not in index]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise DataError(f"unknown {kind} {str(unknown[0]).strip()!r}{more}", source=source)
    return np.asarray([index[str(v).strip()] for v in wanted], dtype=np.int64)
