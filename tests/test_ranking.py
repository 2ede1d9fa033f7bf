"""Full ranking in bounded memory: item chunks merge into the whole-catalogue top-K, ties by item id."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dgmrec.config import resolve_config
from dgmrec.evaluation.protocol import MASK_SCORE, Evaluator, rank_items, top_k
from dgmrec.models import build_model
from dgmrec.training.trainer import Trainer, seed_everything


def reference_ranking(scores: np.ndarray, exclude: sp.csr_matrix | None, k: int) -> np.ndarray:
    """Each row's items by decreasing score, equal scores by increasing item id (a lexicographic sort)."""
    s = scores.copy()
    if exclude is not None:
        s[exclude.nonzero()] = MASK_SCORE
    ids = np.arange(s.shape[1])
    return np.stack([np.lexsort((ids, -row))[:k] for row in s])


def test_top_k_takes_the_lowest_ids_among_tied_scores_where_torch_topk_does_not():
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (64, 100)).float()  # many ties at every cut-off
    _, torch_idx = torch.topk(scores, 20, dim=1)
    v, idx = top_k(scores, 20)
    want = reference_ranking(scores.numpy(), None, 20)
    assert np.array_equal(idx.numpy(), want)
    assert torch.equal(v, scores.gather(1, idx))
    assert not np.array_equal(np.sort(torch_idx.numpy(), 1), np.sort(want, 1))  # plain topk picks others


@pytest.mark.parametrize("seed", range(6))
def test_chunked_ranking_equals_the_whole_catalogue_ranking_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items = 37, int(rng.integers(20, 300))
    k = int(rng.integers(1, 50))
    scores = torch.as_tensor(rng.integers(0, 4, (n_users, n_items)).astype(np.float32))
    exclude = sp.random(n_users, n_items, density=0.3, random_state=seed, format="csr")
    exclude.data[:] = 1.0
    calls: list[slice | None] = []

    def score(users: torch.Tensor, items: slice | None = None) -> torch.Tensor:
        calls.append(items)
        return scores[users] if items is None else scores[users][:, items]

    users = np.arange(n_users)
    whole, whole_scores = rank_items(score, users, exclude, k, batch_size=8)
    assert all(c is None for c in calls)
    calls.clear()
    chunked, chunked_scores = rank_items(score, users, exclude, k, batch_size=8, block=8 * 7)
    assert any(isinstance(c, slice) for c in calls)  # the catalogue was really split
    want = reference_ranking(scores.numpy(), exclude, min(k, n_items))
    assert np.array_equal(whole, want) and np.array_equal(chunked, want)
    assert np.array_equal(whole_scores, chunked_scores)


def test_score_users_item_slices_are_columns_of_the_full_scores(small2):
    seed_everything(0)
    cfg, _ = resolve_config("LightGCN", small2.name)
    model = build_model("LightGCN", small2, cfg)
    model.eval()
    model.prepare_eval()
    users = torch.arange(7)
    full = model.score_users(users)
    torch.testing.assert_close(model.score_users(users, slice(30, 95)), full[:, 30:95], rtol=0, atol=1e-6)


def test_evaluation_in_item_chunks_gives_the_same_metrics(small2, tmp_path):
    seed_everything(0)
    cfg, _ = resolve_config("MFBPR", small2.name, overrides={"epochs": 2, "learning_rate": 0.05})
    model = build_model("MFBPR", small2, cfg)
    Trainer(model, small2, cfg, tmp_path, progress=False).fit()
    model.eval()
    model.prepare_eval()
    pairs = {"valid": small2.valid}
    whole = Evaluator.from_pairs(small2.train_matrix(), pairs).evaluate(model.score_users, "valid")
    chunked = Evaluator.from_pairs(small2.train_matrix(), pairs)
    chunked.block = 64 * 50  # all users in one batch -> item chunks of 50 items (the largest k)
    slices: list[slice] = []

    def score(users: torch.Tensor, items: slice | None = None) -> torch.Tensor:
        slices.append(items)
        return model.score_users(users, items)

    got = chunked.evaluate(score, "valid")
    assert len(slices) == -(-small2.n_items // 50)
    assert got[0] == whole[0]
    for name, vector in whole[1].items():
        assert np.array_equal(vector, got[1][name])
