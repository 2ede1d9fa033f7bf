"""Top-K ranking metrics computed from ranked lists and ground-truth sets, one value per user.

Definitions (``hits[r]`` = 1 if the item at rank ``r`` (1-based) is relevant, ``G`` = number of relevant items):

* Recall@K = sum_{r<=K} hits[r] / G
* Precision@K = sum_{r<=K} hits[r] / K
* Hit@K = 1 if any hit in the top K
* NDCG@K = DCG/IDCG with DCG = sum_{r<=K} hits[r]/log2(r+1), IDCG = sum_{r<=min(G,K)} 1/log2(r+1)
* MAP@K = (1/min(G,K)) * sum_{r<=K} hits[r] * Precision@r
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("recall", "ndcg", "precision", "map", "hit")


def metrics_from_hits(hits: np.ndarray, n_truth: np.ndarray, ks: Sequence[int],
                      metrics: Sequence[str] = METRICS) -> dict[str, np.ndarray]:
    """Per-user metric vectors keyed like ``"recall@20"`` from a hit matrix and ground-truth sizes."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    hits = hits.astype(np.float64)
    n_truth = np.asarray(n_truth, dtype=np.float64)
    kmax = hits.shape[1]
    ranks = np.arange(1, kmax + 1, dtype=np.float64)
    discount = 1.0 / np.log2(ranks + 1.0)
    cum_hits = np.cumsum(hits, axis=1)
    dcg = np.cumsum(hits * discount, axis=1)
    ideal = np.cumsum(discount)
    prec_at = cum_hits / ranks
    ap_cum = np.cumsum(hits * prec_at, axis=1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        if k > kmax:
            raise ValueError(f"K={k} exceeds the ranked list length {kmax}")
        c = cum_hits[:, k - 1]
        if "recall" in metrics:
            out[f"recall@{k}"] = c / n_truth
        if "ndcg" in metrics:
            idcg = ideal[np.minimum(n_truth, k).astype(np.int64) - 1]
            out[f"ndcg@{k}"] = dcg[:, k - 1] / idcg
        if "precision" in metrics:
            out[f"precision@{k}"] = c / k
        if "map" in metrics:
            out[f"map@{k}"] = ap_cum[:, k - 1] / np.minimum(n_truth, k)
        if "hit" in metrics:
            out[f"hit@{k}"] = (c > 0).astype(np.float64)
    return out


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean of every per-user vector."""
    return {k: float(np.mean(v)) if len(v) else 0.0 for k, v in per_user.items()}
