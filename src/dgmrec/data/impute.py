"""Initial imputation of missing feature rows (done once, before any model sees the features)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dgmrec.errors import ConfigError

IMPUTATIONS = ("mean", "zero")


def impute_features(
    features: Mapping[str, np.ndarray],
    observed: np.ndarray,
    strategy: str = "mean",
    reference_items: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Return copies of ``features`` whose unobserved rows are filled.

    ``mean``: the column mean over observed rows that are also in ``reference_items`` (the old items in the
    new-item setting; all items otherwise). ``zero``: zeros (cosine kNN graphs treat zero rows as isolated).
    """
    if strategy not in IMPUTATIONS:
        raise ConfigError(f"unknown imputation {strategy!r}; known: {', '.join(IMPUTATIONS)}",
                          source="missing_imputation")
    out: dict[str, np.ndarray] = {}
    for j, (name, x) in enumerate(features.items()):
        x = np.array(x, dtype=np.float32, copy=True)
        miss = ~observed[:, j]
        if strategy == "zero":
            x[miss] = 0.0
        else:
            ref = observed[:, j].copy()
            if reference_items is not None:
                ref &= reference_items
            if not ref.any():
                ref = observed[:, j]
            x[miss] = _mean_of_rows(x, ref)
        out[name] = x
    return out


def _mean_of_rows(x: np.ndarray, rows: np.ndarray, block: int = 16384) -> np.ndarray:
    """Float64 column mean of the rows selected by the mask ``rows``, gathered in blocks (no full-size copy)."""
    idx = np.flatnonzero(rows)
    total = np.zeros(x.shape[1], dtype=np.float64)
    for start in range(0, len(idx), block):
        total += x[idx[start:start + block]].sum(axis=0, dtype=np.float64)
    return (total / len(idx)).astype(np.float32)
