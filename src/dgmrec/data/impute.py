"""Initial imputation of missing feature rows (done once, before any model sees the features).

Strategies (configuration key ``missing_imputation``); ``reference_items`` are the items whose observed rows
may serve as statistics or donors (the old items in the new-item setting, all items otherwise). Only observed
rows are ever read: whatever an unobserved row holds (the true feature, NaN, garbage) never reaches the output.

``zero``
    zeros (cosine kNN graphs treat zero rows as isolated).
``mean``
    the column mean over the observed reference rows.
``nn``
    nearest-neighbour imputation. For item ``i`` missing modality ``m`` and each modality ``s`` that ``i``
    observes, the ``k`` reference items observing both ``s`` and ``m`` whose ``s`` features are most
    cosine-similar to ``i``'s give the mean of their ``m`` features; with several observed modalities the
    per-source imputations are averaged (every observed modality contributes, none is preferred by its
    position). An item that observes no other modality (or whose sources have no donor) gets the mean.
``graph``
    training-free feature propagation over the item-item co-interaction graph (in the spirit of Malitesta et
    al., "Do we really need to drop items with missing modalities in multimodal recommendation?"). The
    graph links each item to the ``k`` items sharing the most *training* users with it (weight = number of
    shared users; ties to the lower id), computed sparsely in row blocks. Observed rows are clamped to their
    values; for ``steps`` Jacobi iterations, every missing row becomes the weighted average of its
    neighbours that hold a value (observed, or reached in an earlier iteration). Missing rows start empty
    rather than zero, so a row two hops from observed content is not pulled towards zero by still-empty
    neighbours. Rows never reached (no training interaction, as new items, or too far) get the mean.

``k`` is ``imputation_k`` and ``steps`` is ``imputation_steps`` in the configuration. No strategy builds a
dense items x items matrix: ``nn`` scores queries against donors in row blocks, ``graph`` keeps ``k``
neighbours per item.

:func:`prepare_features` is what models receive: :mod:`feature scaling <dgmrec.data.scaling>` first, with
statistics from observed reference rows, then imputation in the scaled space. Scaling first means the
imputed rows live where the model works (a standardised ``mean`` row is the origin; ``nn`` and ``graph``
average rows that are already comparable across modalities), and the imputed rows never enter the scaling
statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from dgmrec.data.dataset import RecDataset
from dgmrec.data.scaling import SCALINGS, FeatureScaler
from dgmrec.errors import ConfigError

IMPUTATIONS = ("zero", "mean", "nn", "graph")
_BLOCK_VALUES = 2**22  # similarity entries (nn) per block
_BLOCK_PATHS = 2**22  # user paths (graph) per block of co-occurrence rows


def _reference_rows(observed_j: np.ndarray, reference_items: np.ndarray | None) -> np.ndarray:
    """Observed rows among the reference items (all observed rows if that is empty)."""
    rows = observed_j.copy()
    if reference_items is not None and (rows & reference_items).any():
        rows &= reference_items
    return rows


def _mean_row(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    if not rows.any():
        return np.zeros(x.shape[1], dtype=np.float32)
    return x[rows].mean(axis=0, dtype=np.float64).astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_mean(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """For each query row: the mean of ``values`` over its ``k`` most cosine-similar ``keys`` rows."""
    qn, kn = _unit_rows(queries), _unit_rows(keys)
    kk = min(k, len(keys))
    out = np.empty((len(queries), values.shape[1]), dtype=np.float32)
    step = max(1, _BLOCK_VALUES // max(len(keys), values.shape[1]))
    for s in range(0, len(queries), step):
        sim = qn[s:s + step] @ kn.T
        nb = np.argpartition(-sim, kk - 1, axis=1)[:, :kk] if kk < len(keys) else np.broadcast_to(
            np.arange(kk), sim.shape)
        acc = np.zeros((len(sim), values.shape[1]), dtype=np.float64)
        for t in range(kk):
            acc += values[nb[:, t]]
        out[s:s + step] = acc / kk
    return out


def _nn_fill(clean: list[np.ndarray], observed: np.ndarray, j: int, donors: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of modality ``j`` imputed by ``nn`` (see the module notes) and the mask of the rows it filled."""
    n = observed.shape[0]
    acc = np.zeros((n, clean[j].shape[1]), dtype=np.float64)
    count = np.zeros(n)
    need = ~observed[:, j]
    for s in range(observed.shape[1]):
        if s == j:
            continue
        q = np.flatnonzero(need & observed[:, s])
        c = np.flatnonzero(donors & observed[:, s])
        if len(q) == 0 or len(c) == 0:
            continue
        acc[q] += knn_mean(clean[s][q], clean[s][c], clean[j][c], k)
        count[q] += 1
    filled = count > 0
    acc[filled] /= count[filled, None]
    return acc.astype(np.float32), filled


def cooccurrence_neighbours(train: sp.spmatrix, k: int) -> sp.csr_matrix:
    """Item x item graph: row ``i`` holds the ``k`` items sharing the most users with ``i`` in ``train``
    (users x items; weight = number of shared users, ties to the lower item id, no self-loops)."""
    ui = sp.csr_matrix(train, dtype=np.float32, copy=True)
    ui.data[:] = 1.0
    ui.sum_duplicates()
    ui.data[:] = 1.0
    iu = ui.T.tocsr()
    n = ui.shape[1]
    paths = np.cumsum(iu @ np.diff(ui.indptr).astype(np.float64))  # rows' co-occurrence work, cumulative
    rows, cols, vals = [], [], []
    start = 0
    while start < n:
        done = paths[start - 1] if start else 0.0
        end = max(start + 1, int(np.searchsorted(paths, done + _BLOCK_PATHS, side="right")))
        block = (iu[start:end] @ ui).tocoo()
        keep = block.col != block.row + start
        r, c, v = block.row[keep].astype(np.int64), block.col[keep].astype(np.int64), block.data[keep]
        # order by row, then count (descending), then column: one integer key (counts are whole numbers)
        top = int(v.max()) if len(v) else 0
        if (end - start) * (top + 1) * n < 2**62:
            order = np.argsort((r * (top + 1) + (top - v.astype(np.int64))) * n + c)
        else:
            order = np.lexsort((c, -v, r))
        r, c, v = r[order], c[order], v[order]
        first = np.cumsum(np.bincount(r, minlength=end - start)) - np.bincount(r, minlength=end - start)
        sel = np.arange(len(r)) - first[r] < k
        rows.append(r[sel] + start)
        cols.append(c[sel])
        vals.append(v[sel])
        start = end
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n),
                         dtype=np.float32)


def propagate(x: np.ndarray, known: np.ndarray, graph: sp.csr_matrix, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``graph`` propagation (see the module notes) of the ``known`` rows of ``x``.

    Returns the propagated copy (rows never reached are zero) and the mask of rows holding a value.
    """
    out = np.where(known[:, None], x, 0.0).astype(np.float32)
    has = known.copy()
    miss = np.flatnonzero(~known)
    sub = graph[miss]
    for _ in range(steps):
        den = sub @ has.astype(np.float32)
        num = sub @ out
        upd = den > 0
        out[miss[upd]] = num[upd] / den[upd, None]
        has[miss[upd]] = True
    return out, has


def impute_features(
    features: Mapping[str, np.ndarray],
    observed: np.ndarray,
    strategy: str = "mean",
    reference_items: np.ndarray | None = None,
    *,
    train: sp.spmatrix | None = None,
    k: int = 10,
    steps: int = 5,
) -> dict[str, np.ndarray]:
    """Float32 copies of ``features`` whose unobserved rows are filled by ``strategy`` (module notes).

    ``train`` (users x items training interactions) is needed by ``graph`` only.
    """
    if strategy not in IMPUTATIONS:
        raise ConfigError(f"key 'missing_imputation' must be one of {', '.join(IMPUTATIONS)}, got {strategy!r}",
                          source="missing_imputation")
    names = list(features)
    # unobserved rows zeroed up front: nothing below can read them
    clean = [np.where(observed[:, j, None], np.asarray(features[m], dtype=np.float32), 0.0).astype(np.float32)
             for j, m in enumerate(names)]
    graph = None
    if strategy == "graph":
        if train is None:
            raise ValueError("graph imputation needs the training interactions")
        graph = cooccurrence_neighbours(train, k)
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        x = clean[j]
        miss = ~observed[:, j]
        ref = _reference_rows(observed[:, j], reference_items)
        if strategy == "zero" or not miss.any():
            out[name] = x
            continue
        mean = _mean_row(x, ref)
        filled = np.zeros(len(x), dtype=bool)
        if strategy == "nn":
            values, filled = _nn_fill(clean, observed, j, ref, k)
            x[filled] = values[filled]
        elif strategy == "graph":
            assert graph is not None
            values, filled = propagate(x, observed[:, j], graph, steps)
            x[miss & filled] = values[miss & filled]
        x[miss & ~filled] = mean
        out[name] = x
    return out


@dataclass(frozen=True)
class FeatureOptions:
    """How features are prepared for the models: configuration keys ``missing_imputation``,
    ``imputation_k``, ``imputation_steps`` and ``feature_scaling`` (see ``configs/overall.yaml``)."""

    imputation: str = "mean"
    k: int = 10
    steps: int = 5
    scaling: str = "none"

    def __post_init__(self) -> None:
        if self.imputation not in IMPUTATIONS:
            raise ConfigError(f"key 'missing_imputation' must be one of {', '.join(IMPUTATIONS)}, "
                              f"got {self.imputation!r}", source="missing_imputation")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"key 'feature_scaling' must be one of {', '.join(SCALINGS)}, got {self.scaling!r}",
                              source="feature_scaling")
        if self.k < 1:
            raise ConfigError(f"key 'imputation_k' must be at least 1, got {self.k}", source="imputation_k")
        if self.steps < 1:
            raise ConfigError(f"key 'imputation_steps' must be at least 1, got {self.steps}",
                              source="imputation_steps")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FeatureOptions:
        """The options of a resolved configuration (absent keys take the defaults above)."""
        d = cls()
        return cls(imputation=str(config.get("missing_imputation", d.imputation)),
                   k=int(config.get("imputation_k", d.k)), steps=int(config.get("imputation_steps", d.steps)),
                   scaling=str(config.get("feature_scaling", d.scaling)))


def reference_items(ds: RecDataset) -> np.ndarray | None:
    """Items whose observed rows may give statistics: the old items in the new-item setting, else None (all)."""
    return None if ds.new_items is None else ~ds.new_items


def fit_scaler(ds: RecDataset, scaling: str) -> FeatureScaler:
    """The dataset's ``feature_scaling``, fitted on the observed rows of its reference items."""
    return FeatureScaler.fit(ds.features, ds.observed, scaling, reference_items(ds))


def prepare_features(ds: RecDataset, options: FeatureOptions | None = None) -> dict[str, np.ndarray]:
    """The features a model receives: scaled, then imputed (module notes)."""
    options = options or FeatureOptions()
    scaled = fit_scaler(ds, options.scaling).transform_all(ds.features)
    return impute_features(scaled, ds.observed, options.imputation, reference_items(ds),
                           train=ds.train_matrix() if options.imputation == "graph" else None,
                           k=options.k, steps=options.steps)
