"""The full-ranking evaluation protocol.

Every item is scored for every evaluated user; the user's *training* items are masked (score -1e10; validation
items are not masked when testing); the top ``max(K)`` list is taken; users with no training interaction are
dropped. Metrics are averaged over users with at least one ground-truth item in the split.

A split may restrict the ranking to a set of *candidate* items (``SplitTruth.candidates``, a bool mask over
items; the cold-start protocol's cold and warm splits rank among new or old items only): non-candidates are
excluded like training items, and cut-offs larger than the number of candidates are capped at that number
(the metric keeps its name, e.g. ``recall@50`` over 30 candidates is Recall@30).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from dgmrec.evaluation.metrics import METRICS, metrics_from_hits, summarize

MASK_SCORE = -1e10


@dataclass
class SplitTruth:
    """Evaluated users of one split and their ground-truth items (CSR rows aligned with ``users``)."""

    users: np.ndarray
    truth: sp.csr_matrix  # (len(users), n_items) binary
    candidates: np.ndarray | None = None  # bool (n_items,): the items ranked (None: every item)

    @classmethod
    def from_pairs(cls, pairs: np.ndarray, train: sp.csr_matrix, candidates: np.ndarray | None = None) -> SplitTruth:
        """Users with a training interaction and a ground-truth pair; with ``candidates``, only pairs on them."""
        if candidates is not None and len(pairs):
            pairs = pairs[candidates[pairs[:, 1]]]
        n_users, n_items = train.shape
        in_train = np.asarray(train.getnnz(axis=1) > 0).ravel()
        keep = in_train[pairs[:, 0]] if len(pairs) else np.zeros(0, dtype=bool)
        pairs = pairs[keep]
        m = sp.csr_matrix((np.ones(len(pairs), dtype=np.float32), (pairs[:, 0], pairs[:, 1])),
                          shape=(n_users, n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        users = np.flatnonzero(np.diff(m.indptr) > 0)
        return cls(users=users, truth=m[users], candidates=candidates)


def rank_items(score_fn: Callable[[torch.Tensor], torch.Tensor], users: np.ndarray, exclude: sp.csr_matrix | None,
               k: int, batch_size: int = 4096, device: torch.device | str = "cpu",
               candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items and scores for ``users``, with the items of ``exclude`` (rows = all users) masked.

    ``candidates`` (bool over items) masks every other item too and caps ``k`` at the number of candidates.
    """
    non_candidates = None
    if candidates is not None:
        k = max(1, min(k, int(candidates.sum())))
        non_candidates = torch.as_tensor(np.flatnonzero(~candidates), dtype=torch.long, device=device)
    tops, scores = [], []
    with torch.no_grad():
        for start in range(0, len(users), batch_size):
            batch = users[start:start + batch_size]
            s = score_fn(torch.as_tensor(batch, dtype=torch.long, device=device)).float().contiguous()
            if exclude is not None:
                sub = exclude[batch].tocoo()
                s[torch.as_tensor(sub.row, dtype=torch.long, device=s.device),
                  torch.as_tensor(sub.col, dtype=torch.long, device=s.device)] = MASK_SCORE
            if non_candidates is not None:
                s[:, non_candidates.to(s.device)] = MASK_SCORE
            v, idx = torch.topk(s, min(k, s.shape[1]), dim=1)
            tops.append(idx.cpu().numpy())
            scores.append(v.cpu().numpy())
    if not tops:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return np.concatenate(tops), np.concatenate(scores)


def evaluate_ranking(topk: np.ndarray, truth: sp.csr_matrix, ks: Sequence[int],
                     metrics: Sequence[str] = METRICS) -> dict[str, np.ndarray]:
    """Per-user metric vectors of ranked lists ``topk`` against CSR ground truth rows.

    Cut-offs longer than the lists (fewer candidates than ``K``) are capped at the list length.
    """
    rows = np.repeat(np.arange(topk.shape[0]), topk.shape[1])
    hits = np.asarray(truth[rows, topk.ravel()]).reshape(topk.shape) > 0
    n_truth = np.diff(truth.indptr)
    width = topk.shape[1]
    if max(ks, default=0) <= width:
        return metrics_from_hits(hits, n_truth, ks, metrics)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        capped = metrics_from_hits(hits, n_truth, [min(k, width)], metrics)
        out.update({f"{key.split('@')[0]}@{k}": v for key, v in capped.items()})
    return out


@dataclass
class Evaluator:
    """Full-ranking evaluation of one dataset at cut-offs ``ks`` (default 10, 20, 50)."""

    train: sp.csr_matrix
    splits: dict[str, SplitTruth]
    ks: tuple[int, ...] = (10, 20, 50)
    metrics: tuple[str, ...] = METRICS
    batch_size: int = 4096

    @classmethod
    def from_pairs(cls, train: sp.csr_matrix, pairs: dict[str, np.ndarray], ks: Sequence[int] = (10, 20, 50),
                   metrics: Sequence[str] = METRICS, batch_size: int = 4096,
                   candidates: Mapping[str, np.ndarray] | None = None) -> Evaluator:
        """``candidates`` maps split names to the bool item mask they rank among (other splits: every item)."""
        cand = dict(candidates or {})
        return cls(train=train, splits={n: SplitTruth.from_pairs(p, train, cand.get(n)) for n, p in pairs.items()},
                   ks=tuple(ks), metrics=tuple(metrics), batch_size=batch_size)

    def evaluate(self, score_fn: Callable[[torch.Tensor], torch.Tensor], split: str,
                 device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Mean metrics and per-user vectors (aligned with ``splits[split].users``)."""
        st = self.splits[split]
        topk, _ = rank_items(score_fn, st.users, self.train, max(self.ks), self.batch_size, device, st.candidates)
        per_user = evaluate_ranking(topk, st.truth, self.ks, self.metrics)
        return summarize(per_user), per_user
