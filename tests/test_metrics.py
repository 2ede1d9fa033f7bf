"""Metrics and the full-ranking protocol against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dgmrec.evaluation.metrics import metrics_from_hits
from dgmrec.evaluation.protocol import Evaluator, SplitTruth, evaluate_ranking, rank_items


def test_metrics_hand_computed():
    # one user, ranked list hits at ranks 1 and 3, 4 relevant items in total
    hits = np.array([[1, 0, 1, 0, 0]], dtype=bool)
    m = metrics_from_hits(hits, np.array([4]), ks=[2, 5])
    assert m["recall@2"][0] == pytest.approx(1 / 4)
    assert m["recall@5"][0] == pytest.approx(2 / 4)
    assert m["precision@5"][0] == pytest.approx(2 / 5)
    assert m["hit@2"][0] == 1.0
    dcg5 = 1 / math.log2(2) + 1 / math.log2(4)
    idcg5 = sum(1 / math.log2(r + 1) for r in range(1, 5))
    assert m["ndcg@5"][0] == pytest.approx(dcg5 / idcg5)
    idcg2 = 1 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@2"][0] == pytest.approx(1 / idcg2)
    # AP@5 = (P@1 + P@3) / min(4, 5) = (1 + 2/3) / 4
    assert m["map@5"][0] == pytest.approx((1 + 2 / 3) / 4)
    assert m["map@2"][0] == pytest.approx(1 / 2)


def test_no_hits_and_single_truth():
    hits = np.array([[0, 0, 0], [0, 1, 0]], dtype=bool)
    m = metrics_from_hits(hits, np.array([1, 1]), ks=[3])
    assert m["recall@3"].tolist() == [0.0, 1.0]
    assert m["ndcg@3"][1] == pytest.approx(1 / math.log2(3))
    assert m["map@3"][1] == pytest.approx(0.5)


def test_protocol_masks_training_items_and_drops_cold_users():
    # 3 users, 5 items; user 2 has no training interaction and must be dropped
    train = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=np.float32))
    test_pairs = np.array([[0, 1], [1, 0], [1, 3], [2, 4]])
    truth = SplitTruth.from_pairs(test_pairs, train)
    assert truth.users.tolist() == [0, 1]
    # scores: item 0 highest for everyone, but it is user 0's training item
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]] * 3)
    top, _ = rank_items(lambda u: scores[u], truth.users, train, k=2)
    assert top[0].tolist() == [1, 2]  # item 0 masked for user 0
    assert top[1].tolist() == [0, 3]  # items 1 and 2 masked for user 1
    per_user = evaluate_ranking(top, truth.truth, ks=[2])
    assert per_user["recall@2"].tolist() == [1.0, 1.0]
    ev = Evaluator.from_pairs(train, {"test": test_pairs}, ks=[1, 2])
    mean, vectors = ev.evaluate(lambda u: scores[u], "test")
    assert mean["recall@1"] == pytest.approx((1.0 + 0.5) / 2)
    assert vectors["recall@2"].shape == (2,)


def test_validation_items_not_masked_at_test_time():
    train = sp.csr_matrix(np.array([[1, 0, 0]], dtype=np.float32))
    ev = Evaluator.from_pairs(train, {"valid": np.array([[0, 1]]), "test": np.array([[0, 1]])}, ks=[1])
    scores = torch.tensor([[0.0, 9.0, 1.0]])
    assert ev.evaluate(lambda u: scores[u], "test")[0]["recall@1"] == 1.0
