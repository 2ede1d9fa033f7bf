"""Cross-modal retrieval of items with a masked modality (the paper's Table 3 analysis).

Protocol (ours; the paper does not define one): for every item ``i`` whose modality ``m`` is masked but whose
true feature is known, the query is the feature the model generates for ``(i, m)``; the candidates are the
true features of modality ``m`` of *all* items; cosine similarity ranks them and Hit@K = 1 when ``i`` itself
is among the top K (ties count against the query). ``rank`` is the share of the other items ranked at least as
high as ``i`` (0 = first, 0.5 = chance): it uses the whole ranking, so it separates methods long before Hit@10
does when few queries hit at all. Results are grouped by how many modalities the item misses. The nearest-neighbour
baseline (items missing exactly one modality) finds the ``nn_k`` items most similar to ``i`` in its observed
modalities (mean cosine over them, among items that observe ``m`` and those modalities) and averages their
true ``m`` features as the query.

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
import torch
import torch.nn.functional as F

from dgmrec.data.mmrec import load_features
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


def nn_imputation_queries(items: np.ndarray, target: int, observed: np.ndarray, truth: list[np.ndarray],
                          nn_k: int = 10, chunk: int = 1024) -> np.ndarray:
    """NN-imputed features of ``target`` modality for ``items`` (each missing exactly that modality)."""
    _n, M = observed.shape
    sources = [j for j in range(M) if j != target]
    normed = {j: _normalize(np.nan_to_num(truth[j])) for j in sources}
    cand = observed[:, target] & observed[:, sources].all(axis=1)
    cand_idx = torch.as_tensor(np.flatnonzero(cand))
    tgt = torch.as_tensor(np.nan_to_num(truth[target]), dtype=torch.float32)[cand_idx]
    out = np.zeros((len(items), truth[target].shape[1]), dtype=np.float32)
    for s in range(0, len(items), chunk):
        rows = torch.as_tensor(items[s:s + chunk])
        sim = sum(normed[j][rows] @ normed[j][cand_idx].T for j in sources) / len(sources)
        nb = torch.topk(sim, min(nn_k, sim.shape[1]), dim=1).indices
        out[s:s + chunk] = tgt[nb].mean(dim=1).numpy()
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
                          truth: dict[str, np.ndarray], ks: Sequence[int] = (10, 20),
                          nn_k: int = 10, similarity: str = "cosine") -> dict[str, Any]:
    """Hit@K and mean rank of generated features (and of the NN baseline) per modality and missing level."""
    M = len(modalities)
    n = observed.shape[0]
    truth_list = [truth[m] for m in modalities]
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
        gen = cand.score(generated[m][items], items, ks)
        for level in range(1, M + 1):
            sel = missing_count[items] == level
            if not sel.any():
                continue
            row: dict[str, Any] = {"modality": m, "missing": level, "items": int(sel.sum())}
            record(row, level, "generated", {key: v[sel] for key, v in gen.items()})
            if level == 1:
                nn_items = items[sel]
                queries = nn_imputation_queries(nn_items, j, observed, truth_list, nn_k)
                record(row, level, "nn", cand.score(queries, nn_items, ks))
            rows.append(row)
    summary = {level: {key: float(np.concatenate(v).mean()) for key, v in d.items()}
               for level, d in totals.items()}
    return {"rows": rows, "by_missing_level": summary, "ks": list(ks), "nn_k": nn_k, "similarity": similarity,
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
