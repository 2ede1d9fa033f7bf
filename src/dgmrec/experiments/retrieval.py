"""Cross-modal retrieval of items with a masked modality (the paper's Table 3 analysis).

Protocol (ours; the paper does not define one): for every item ``i`` whose modality ``m`` is masked but whose
true feature is known, the query is the feature the model generates for ``(i, m)``; the candidates are the
true features of modality ``m`` of *all* items; cosine similarity ranks them and Hit@K = 1 when ``i`` itself
is among the top K (ties count against the query). ``rank`` is the share of the other items ranked at least as
high as ``i`` (0 = first, 0.5 = chance): it uses the whole ranking, so it separates methods long before Hit@10
does when few queries hit at all. Results are grouped by how many modalities the item misses.

Baselines. Next to the generated features, each imputation strategy of :mod:`dgmrec.data.impute` (``zero``,
``mean``, ``nn``, ``graph``; ``strategies``) supplies a query for every masked row, computed from the observed
rows only (``k = nn_k`` neighbours): ``nn`` finds the ``nn_k`` items most similar to ``i`` in each modality it
observes and averages their true ``m`` features (items missing every modality get the mean); ``graph``
propagates the observed features over the training co-interactions, so it also reaches items missing every
modality. A run trained with ``feature_scaling`` generates in the scaled space; the true features are scaled
the same way (``scaling``, statistics from the observed reference rows) before anything is compared.

Similarity. ``"cosine"`` (the default, as the specification recommends) compares the raw vectors;
``"centered"`` first subtracts the mean true feature of the modality's observed items from queries and
candidates. Pre-extracted features often share a large common component (TikTok's image features: mean-row
cosine 0.93 to every item), and queries that are averages or regressions sit close to it; centring removes
it for every method alike. ``chance`` is ``K / n_items`` for Hit@K and 0.5 for ``rank``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from dgmrec.data.impute import impute_features
from dgmrec.data.mmrec import load_features
from dgmrec.data.scaling import FeatureScaler
from dgmrec.errors import DataError


def _normalize(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float32), dim=1)


def target_ranks(queries: torch.Tensor, targets: np.ndarray, candidates: torch.Tensor,
                 chunk: int = 2048) -> np.ndarray:
    """0-based rank of ``targets[q]`` among the (normalised) ``candidates`` by cosine to query ``q``.

    The rank counts every other candidate scored at least as high as the target, so ties go against the
    query (a constant or all-zero query never scores a hit by tie-breaking).
    """
    qn = _normalize(queries)
    out = np.zeros(len(targets), dtype=np.int64)
    for s in range(0, len(targets), chunk):
        sim = qn[s:s + chunk] @ candidates.T
        t = torch.as_tensor(targets[s:s + chunk])
        own = sim.gather(1, t[:, None])
        out[s:s + chunk] = ((sim >= own).sum(dim=1) - 1).numpy()
    return out


SIMILARITIES = ("cosine", "centered")


def rank_scores(ranks: np.ndarray, ks: Sequence[int], n: int) -> dict[str, np.ndarray]:
    """Per-query ``hit@K`` (0/1) and ``rank`` (share of the other ``n - 1`` candidates at least as similar)."""
    out = {f"hit@{k}": (ranks < k).astype(np.float64) for k in ks}
    out["rank"] = ranks / max(1, n - 1)
    return out


class Candidates:
    """The true features of one modality as retrieval candidates under a similarity (see the module notes).

    ``score(queries, targets, ks)`` ranks each query's target among all candidates and returns
    :func:`rank_scores`.
    """

    def __init__(self, true_features: np.ndarray, observed: np.ndarray, similarity: str = "cosine") -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        true_features = np.asarray(true_features)
        has_truth = np.isfinite(true_features).all(axis=1)
        values = np.nan_to_num(true_features).astype(np.float32)
        self.shift = (values[observed & has_truth].mean(axis=0) if similarity == "centered"
                      else np.zeros(values.shape[1], dtype=np.float32))
        self.normed = _normalize(values - self.shift)
        self.has_truth = has_truth

    def score(self, queries: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
        ranks = target_ranks(torch.as_tensor(np.asarray(queries) - self.shift), targets, self.normed)
        return rank_scores(ranks, ks, self.normed.shape[0])


def cross_modal_retrieval(generated: dict[str, np.ndarray], observed: np.ndarray, modalities: Sequence[str],
                          truth: dict[str, np.ndarray], ks: Sequence[int] = (10, 20), nn_k: int = 10,
                          similarity: str = "cosine", *, strategies: Sequence[str] = ("nn",),
                          train: sp.spmatrix | None = None, reference_items: np.ndarray | None = None,
                          imputation_steps: int = 5, scaling: str = "none") -> dict[str, Any]:
    """Hit@K and mean rank of the generated features and of each imputation strategy, per modality and missing
    level (module notes). ``train`` (users x items) is needed by the ``graph`` strategy; ``reference_items``
    restricts the imputation statistics and donors (old items in the new-item setting)."""
    M = len(modalities)
    n = observed.shape[0]
    clean = {m: np.nan_to_num(np.asarray(truth[m], dtype=np.float32)) for m in modalities}
    scaler = FeatureScaler.fit(clean, observed, scaling, reference_items)
    truth_list = [scaler.transform(m, truth[m]) for m in modalities]  # rows without truth stay NaN
    known = {m: np.nan_to_num(t) for m, t in zip(modalities, truth_list, strict=True)}
    imputed = {s: impute_features(known, observed, s, reference_items, train=train, k=nn_k, steps=imputation_steps)
               for s in strategies}
    missing_count = (~observed).sum(axis=1)
    rows: list[dict[str, Any]] = []
    totals: dict[str, dict[str, list[np.ndarray]]] = {}

    def record(row: dict[str, Any], level: int, method: str, scores: dict[str, np.ndarray]) -> None:
        for key, v in scores.items():
            row[f"{method}_{key}"] = float(v.mean())
            totals.setdefault(str(level), {}).setdefault(f"{method}_{key}", []).append(v)

    for j, m in enumerate(modalities):
        cand = Candidates(truth_list[j], observed[:, j], similarity)
        items = np.flatnonzero(~observed[:, j] & cand.has_truth)
        if len(items) == 0:
            continue
        scores = {"generated": cand.score(generated[m][items], items, ks)}
        scores.update({s: cand.score(imputed[s][m][items], items, ks) for s in strategies})
        for level in range(1, M + 1):
            sel = missing_count[items] == level
            if not sel.any():
                continue
            row: dict[str, Any] = {"modality": m, "missing": level, "items": int(sel.sum())}
            for method, sc in scores.items():
                record(row, level, method, {key: v[sel] for key, v in sc.items()})
            rows.append(row)
    summary = {level: {key: float(np.concatenate(v).mean()) for key, v in d.items()}
               for level, d in totals.items()}
    return {"rows": rows, "by_missing_level": summary, "ks": list(ks), "nn_k": nn_k, "similarity": similarity,
            "methods": ["generated", *strategies], "imputation_steps": imputation_steps, "scaling": scaling,
            "chance": {**{f"hit@{k}": min(1.0, k / n) for k in ks}, "rank": 0.5}}


def load_truth(truth_dir: str | Path, modalities: Sequence[str], n_items: int) -> dict[str, np.ndarray]:
    truth_dir = Path(truth_dir)
    out = {}
    for m in modalities:
        path = truth_dir / f"{m}_feat.npy"
        if not path.is_file():
            raise DataError(f"no true features for modality '{m}' ({path.name})", source=str(truth_dir))
        x = load_features(path)
        if x.shape[0] != n_items:
            raise DataError(f"has {x.shape[0]} rows, the run's dataset {n_items}", source=str(path))
        out[m] = x
    return out
