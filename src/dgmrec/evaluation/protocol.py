"""The full-ranking evaluation protocol.

Every item is scored for every evaluated user; the user's *training* items are masked (score -1e10; validation
items are not masked when testing); the top ``max(K)`` list is taken; users with no training interaction are
dropped. Metrics are averaged over users with at least one ground-truth item in the split.

Ranked lists order items by decreasing score and, among equal scores, by increasing item id, so they are the
same however the work is split. Scores are computed for blocks of at most ``block`` (user, item) pairs: users
in batches and, when a batch times the catalogue exceeds the block, items in chunks whose top-K lists are
merged, so memory stays bounded for any number of items.

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
BLOCK = 2**26  # (user, item) scores held at once: 256 MB of float32


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


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` largest scores and their columns: by decreasing score, equal scores by increasing column.

    :func:`torch.topk` alone picks among equal scores in an order that depends on the row length and ``k``;
    here rows whose ``k``-th score is shared by a column left out take the lowest tied columns instead.
    """
    k = min(k, scores.shape[1])
    v, idx = torch.topk(scores, k, dim=1)
    kth = v[:, -1:]
    open_ties = torch.nonzero(((scores == kth).sum(1) > (v == kth).sum(1)) & ~kth.isnan().squeeze(1)).squeeze(1)
    if len(open_ties):
        sub, t = scores[open_ties], kth[open_ties]
        tied = sub == t
        wanted = k - (sub > t).sum(1, keepdim=True)  # tied columns that fit into the list
        chosen = (sub > t) | (tied & (tied.cumsum(1) <= wanted))
        cols = torch.nonzero(chosen)[:, 1].view(len(open_ties), k)  # k per row, in column order
        idx[open_ties], v[open_ties] = cols, sub.gather(1, cols)
    return _ordered(v, idx, k)


def _ordered(v: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` of each row's (score, id) pairs by decreasing score, then increasing id."""
    by_id = idx.argsort(dim=1)
    v, idx = v.gather(1, by_id), idx.gather(1, by_id)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return v.gather(1, order), idx.gather(1, order)


def rank_items(score_fn: Callable[..., torch.Tensor], users: np.ndarray, exclude: sp.csr_matrix | None,
               k: int, batch_size: int = 4096, device: torch.device | str = "cpu", n_items: int | None = None,
               block: int = BLOCK, candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items and scores for ``users``, with the items of ``exclude`` (rows = all users) masked.

    ``score_fn(users)`` scores every item; when a batch of users times ``n_items`` (default: the columns of
    ``exclude``) exceeds ``block``, it is called as ``score_fn(users, items)`` with ``items`` a slice of item
    ids (as :meth:`Recommender.score_users` accepts) and the chunks' top-``k`` lists are merged. Lists follow the
    module's order (equal scores: lower item id first), so chunked and whole-catalogue ranking agree.
    ``candidates`` (bool over items) masks every other item too and caps ``k`` at the number of candidates.
    """
    others = None
    if candidates is not None:
        k = max(1, min(k, int(candidates.sum())))
        others = np.flatnonzero(~candidates)
    if n_items is None and exclude is not None:
        n_items = exclude.shape[1]
    tops, scores = [], []
    with torch.no_grad():
        for start in range(0, len(users), batch_size):
            batch = users[start:start + batch_size]
            u = torch.as_tensor(batch, dtype=torch.long, device=device)
            masked = exclude[batch].tocoo() if exclude is not None else None
            chunk = n_items if n_items is None else max(k, block // max(1, len(batch)))
            if n_items is None or chunk >= n_items:
                v, idx = top_k(_masked(score_fn(u), masked, 0, others), k)
            else:
                v, idx = _chunked_top_k(score_fn, u, masked, k, n_items, chunk, others)
            tops.append(idx.cpu().numpy())
            scores.append(v.cpu().numpy())
    if not tops:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return np.concatenate(tops), np.concatenate(scores)


def _masked(s: torch.Tensor, masked: sp.coo_matrix | None, offset: int,
            others: np.ndarray | None = None) -> torch.Tensor:
    """Float32 scores of columns ``offset..`` with the masked (row, item) pairs, and every column of the items
    ``others`` (the non-candidates), set to :data:`MASK_SCORE`."""
    s = s.float().contiguous()
    if masked is not None:
        inside = (masked.col >= offset) & (masked.col < offset + s.shape[1])
        s[torch.as_tensor(masked.row[inside], dtype=torch.long, device=s.device),
          torch.as_tensor(masked.col[inside] - offset, dtype=torch.long, device=s.device)] = MASK_SCORE
    if others is not None:
        cols = others[(others >= offset) & (others < offset + s.shape[1])] - offset
        s[:, torch.as_tensor(cols, dtype=torch.long, device=s.device)] = MASK_SCORE
    return s


def _chunked_top_k(score_fn: Callable[..., torch.Tensor], users: torch.Tensor, masked: sp.coo_matrix | None, k: int,
                   n_items: int, chunk: int, others: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` over all items from the top-``k`` lists of item chunks (the order is total, so they merge)."""
    best_v = best_i = None
    for a in range(0, n_items, chunk):
        b = min(n_items, a + chunk)
        v, idx = top_k(_masked(score_fn(users, slice(a, b)), masked, a, others), k)
        idx = idx + a
        if best_v is None or best_i is None:
            best_v, best_i = v, idx
        else:
            best_v, best_i = _ordered(torch.cat([best_v, v], 1), torch.cat([best_i, idx], 1), k)
    assert best_v is not None and best_i is not None
    return best_v, best_i


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
    block: int = BLOCK  # (user, item) scores computed at once (see rank_items)

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
        topk, _ = rank_items(score_fn, st.users, self.train, max(self.ks), self.batch_size, device,
                             block=self.block, candidates=st.candidates)
        per_user = evaluate_ranking(topk, st.truth, self.ks, self.metrics)
        return summarize(per_user), per_user
