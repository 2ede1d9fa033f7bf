"""Feature scaling per modality, and the scale numbers ``dgmrec data check`` reports.

Modalities come at very different scales (raw audio embeddings with row norms in the thousands next to
unit-norm text embeddings), and every loss that compares or reconstructs features inherits that scale.
``feature_scaling`` (configuration key) puts them on one footing before any model sees them:

``none``
    the features as stored (default; today's numbers).
``standardize``
    per dimension ``(x - mean) / std``, both taken over the observed rows of the reference (old) items;
    a dimension with zero spread keeps scale 1.
``l2``
    every row divided by its L2 norm (no statistics; an all-zero row stays zero).

Scaling is applied to every row, observed or not: unobserved rows are replaced by the imputation that
follows (see :mod:`dgmrec.data.impute`), and applying the same map to rows that hold the true feature keeps
the retrieval experiment's ground truth in the space the model works in. :meth:`FeatureScaler.inverse`
maps rows back to the stored space (``l2`` restores the modality's mean observed row norm).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from dgmrec.errors import ConfigError

SCALINGS = ("none", "standardize", "l2")
_CHUNK_VALUES = 2**22  # floats per chunk of the float64 accumulations


def _chunks(x: np.ndarray, rows: np.ndarray) -> Iterator[np.ndarray]:
    """Float64 copies of ``x[rows]`` in chunks of at most ``_CHUNK_VALUES`` values."""
    idx = np.flatnonzero(rows)
    step = max(1, _CHUNK_VALUES // max(1, x.shape[1]))
    for s in range(0, len(idx), step):
        yield np.asarray(x[idx[s:s + step]], dtype=np.float64)


def column_moments(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation of ``x[rows]``; zeros when no row is selected."""
    n = int(rows.sum())
    d = x.shape[1]
    if n == 0:
        return np.zeros(d), np.zeros(d)
    total = np.zeros(d)
    for c in _chunks(x, rows):
        total += c.sum(axis=0)
    mean = total / n
    sq = np.zeros(d)
    for c in _chunks(x, rows):
        sq += ((c - mean) ** 2).sum(axis=0)
    return mean, np.sqrt(sq / n)


def mean_row_norm(x: np.ndarray, rows: np.ndarray) -> float:
    """Mean L2 norm of the rows ``x[rows]`` (0 when none is selected)."""
    n = int(rows.sum())
    if n == 0:
        return 0.0
    return float(sum(np.linalg.norm(c, axis=1).sum() for c in _chunks(x, rows)) / n)


def feature_scales(features: Mapping[str, np.ndarray], observed: np.ndarray) -> dict[str, dict[str, float]]:
    """Scale of each modality over its observed rows: mean row L2 norm and mean per-dimension std."""
    out = {}
    for j, (name, x) in enumerate(features.items()):
        rows = observed[:, j]
        out[name] = {"mean_row_norm": mean_row_norm(x, rows),
                     "mean_dim_std": float(column_moments(x, rows)[1].mean()) if rows.any() else 0.0}
    return out


def _reference_rows(observed: np.ndarray, j: int, reference_items: np.ndarray | None) -> np.ndarray:
    """Observed rows of modality ``j`` among the reference items (all observed rows if that is empty)."""
    rows = observed[:, j].copy()
    if reference_items is not None and (rows & reference_items).any():
        rows &= reference_items
    return rows


@dataclass
class FeatureScaler:
    """A fitted ``feature_scaling`` (see the module notes): per modality a shift and a scale."""

    method: str = "none"
    shift: dict[str, np.ndarray] = field(default_factory=dict)
    scale: dict[str, np.ndarray] = field(default_factory=dict)
    norm: dict[str, float] = field(default_factory=dict)  # l2: mean observed row norm (for inverse)

    @classmethod
    def fit(cls, features: Mapping[str, np.ndarray], observed: np.ndarray, method: str = "none",
            reference_items: np.ndarray | None = None) -> FeatureScaler:
        """Statistics over the observed rows of ``reference_items`` (old items in the new-item setting)."""
        if method not in SCALINGS:
            raise ConfigError(f"key 'feature_scaling' must be one of {', '.join(SCALINGS)}, got {method!r}",
                              source="feature_scaling")
        scaler = cls(method=method)
        for j, (name, x) in enumerate(features.items()):
            rows = _reference_rows(observed, j, reference_items)
            if method == "standardize":
                mean, std = column_moments(x, rows)
                scaler.shift[name] = mean.astype(np.float32)
                scaler.scale[name] = np.where(std > 1e-12, std, 1.0).astype(np.float32)
            elif method == "l2":
                scaler.norm[name] = mean_row_norm(x, rows)
        return scaler

    def transform(self, name: str, x: np.ndarray) -> np.ndarray:
        """A float32 copy of ``x`` (rows of modality ``name``) in the scaled space."""
        x = np.array(x, dtype=np.float32, copy=True)
        if self.method == "standardize":
            x -= self.shift[name]
            x /= self.scale[name]
        elif self.method == "l2":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                x = np.where(norms > 0, x / norms, x).astype(np.float32)
        return x

    def transform_all(self, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: self.transform(name, x) for name, x in features.items()}

    def inverse(self, name: str, x: np.ndarray) -> np.ndarray:
        """Rows of the scaled space back in the stored space (``l2``: rescaled to the mean observed norm)."""
        x = np.array(x, dtype=np.float32, copy=True)
        if self.method == "standardize":
            x = x * self.scale[name] + self.shift[name]
        elif self.method == "l2":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                x = np.where(norms > 0, x / norms * self.norm[name], x).astype(np.float32)
        return x
