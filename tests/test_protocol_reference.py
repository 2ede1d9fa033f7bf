"""The full-ranking protocol against a plain, independent implementation (numpy loops written here).

The data have more users than several evaluation batches, tied scores (also at the cut-offs), cold users (no
training interaction: not evaluated) and users without ground truth in a split (not evaluated either). Scores put
every ground-truth item on a value no other item of that user has, so the hits, and therefore the metrics, do not
depend on how ties among the other items are broken; the ranked lists themselves are checked to be valid rankings.
End to end, a model trained through ``dgmrec.train`` is re-scored and its ``results.json`` and per-user files are
recomputed, in both settings and for every split the trainer reports, the new-item test set included.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

import dgmrec
from dgmrec.data.dataset import RecDataset
from dgmrec.data.mmrec import write_mmrec
from dgmrec.data.synthetic import make_synthetic
from dgmrec.evaluation.protocol import Evaluator, rank_items

KS = (1, 3, 10, 20)
BATCH = 16  # users per evaluation batch: every test below spans several batches


# --------------------------------------------------------------------------------------- the reference
def ranked_items(scores_u: np.ndarray, train_u: set[int]) -> list[int]:
    """Every item, best first: non-training items by score (ties by id), then the training items."""
    free = [i for i in range(len(scores_u)) if i not in train_u]
    free.sort(key=lambda i: (-scores_u[i], i))
    return free + sorted(train_u)


def reference_metrics(scores: np.ndarray, train: np.ndarray, split: np.ndarray,
                      ks: tuple[int, ...] = KS) -> tuple[list[int], dict[str, list[float]]]:
    """Evaluated users (ascending) and their metric values, by the protocol's definitions."""
    n_users = scores.shape[0]
    train_sets: list[set[int]] = [set() for _ in range(n_users)]
    for u, i in train:
        train_sets[u].add(int(i))
    truth: list[set[int]] = [set() for _ in range(n_users)]
    for u, i in split:
        truth[u].add(int(i))
    users = [u for u in range(n_users) if truth[u] and train_sets[u]]
    out: dict[str, list[float]] = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg", "precision", "map", "hit")}
    for u in users:
        ranked = ranked_items(scores[u], train_sets[u])
        g = len(truth[u])
        for k in ks:
            hits = [1.0 if item in truth[u] else 0.0 for item in ranked[:k]]
            n_hit = sum(hits)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(g, k)))
            ap = 0.0
            seen = 0.0
            for r, h in enumerate(hits):
                seen += h
                ap += h * seen / (r + 1)
            out[f"recall@{k}"].append(n_hit / g)
            out[f"precision@{k}"].append(n_hit / k)
            out[f"hit@{k}"].append(1.0 if n_hit else 0.0)
            out[f"ndcg@{k}"].append(dcg / idcg)
            out[f"map@{k}"].append(ap / min(g, k))
    return users, out


def check_valid_ranking(top: np.ndarray, top_scores: np.ndarray, users: np.ndarray, scores: np.ndarray,
                        train: np.ndarray) -> None:
    """Each list is a best-first ranking of the user's non-training items (training items only as filler)."""
    n_items = scores.shape[1]
    for row, u in enumerate(users):
        own = set(train[train[:, 0] == u, 1].tolist())
        items = top[row].tolist()
        assert len(set(items)) == len(items), (u, items)
        n_free = n_items - len(own)
        listed_free = [i for i in items if i not in own]
        assert len(listed_free) == min(len(items), n_free), f"user {u}: training items listed before others"
        assert items[: len(listed_free)] == listed_free, f"user {u}: a training item ranks above a free item"
        s = scores[u, listed_free]
        np.testing.assert_array_equal(top_scores[row][: len(listed_free)], s.astype(np.float32))
        assert np.all(np.diff(s) <= 0), f"user {u}: list not sorted by score"
        unlisted = [i for i in range(n_items) if i not in own and i not in items]
        if unlisted and listed_free:
            assert scores[u, unlisted].max() <= s[-1], f"user {u}: a better item was left out"


# ---------------------------------------------------------------------------------- designed scores
def designed_case(seed: int = 0, n_users: int = 150, n_items: int = 40) -> dict[str, np.ndarray]:
    """Training, valid and test pairs and a tie-heavy score matrix (ground-truth items on unique scores)."""
    rng = np.random.default_rng(seed)
    train, valid, test = [], [], []
    for u in range(n_users):
        n_train = 0 if u % 11 == 3 else int(rng.integers(1, 30))  # cold users; some with < max(K) free items
        items = rng.permutation(n_items)
        train += [(u, int(i)) for i in items[:n_train]]
        rest = items[n_train:]
        n_valid = 0 if u % 7 == 5 else int(rng.integers(1, min(4, len(rest)) + 1))  # users without ground truth
        valid += [(u, int(i)) for i in rest[:n_valid]]
        n_test = 0 if u % 13 == 6 else int(rng.integers(1, min(5, len(rest)) + 1))
        test += [(u, int(i)) for i in rng.choice(rest, size=n_test, replace=False)]
    pairs = {name: np.asarray(p, dtype=np.int64).reshape(-1, 2) for name, p in
             (("train", train), ("valid", valid), ("test", test))}
    scores = rng.integers(0, 4, size=(n_users, n_items)).astype(np.float64)  # heavy ties
    truth = np.concatenate([pairs["valid"], pairs["test"]])
    # ground-truth items: non-integer values between, above and below the tied levels, distinct for one user
    # (104729 is prime to 6000, so two items of one user never share a value)
    scores[truth[:, 0], truth[:, 1]] = ((truth[:, 0] * 7919 + truth[:, 1] * 104729) % 6000) / 1000.0 - 1.0 + 1e-4
    pairs["scores"] = scores
    return pairs


def _train_matrix(train: np.ndarray, n_users: int, n_items: int):
    ds = RecDataset(name="t", n_users=n_users, n_items=n_items, train=train, valid=train[:0], test=train[:0],
                    features={"x": np.zeros((n_items, 1), dtype=np.float32)},
                    observed=np.ones((n_items, 1), dtype=bool))
    return ds.train_matrix()


@pytest.fixture(scope="module")
def case():
    return designed_case()


def test_designed_case_is_hard_enough(case):
    """The case has what it claims: several batches, cold users, ties at the cut-off, users short of items."""
    scores, train = case["scores"], case["train"]
    n_users, n_items = scores.shape
    has_train = np.bincount(train[:, 0], minlength=n_users) > 0
    has_test = np.bincount(case["test"][:, 0], minlength=n_users) > 0
    assert (has_train & has_test).sum() > 5 * BATCH
    assert (~has_train & has_test).any()  # cold users with test items
    assert (n_items - np.bincount(train[:, 0], minlength=n_users) < max(KS)).any()
    # ties straddle the cut-off K=10 for most users
    straddle = [np.sort(scores[u])[::-1][9] == np.sort(scores[u])[::-1][10] for u in range(n_users)]
    assert np.mean(straddle) > 0.5
    # ground-truth scores are unique among the user's items
    for u, i in case["test"][:50]:
        assert (scores[u] == scores[u, i]).sum() == 1


@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluator_matches_reference(case, split):
    scores, train = case["scores"], case["train"]
    n_users, n_items = scores.shape
    ev = Evaluator.from_pairs(_train_matrix(train, n_users, n_items), {split: case[split]}, ks=KS, batch_size=BATCH)
    mean, per_user = ev.evaluate(lambda users: torch.as_tensor(scores[users.numpy()], dtype=torch.float32), split)
    users, ref = reference_metrics(scores, train, case[split])
    assert ev.splits[split].users.tolist() == users
    assert len(users) > 5 * BATCH
    for key, values in ref.items():
        np.testing.assert_allclose(per_user[key], values, rtol=0, atol=1e-12, err_msg=key)
        assert mean[key] == pytest.approx(np.mean(values), abs=1e-12)
    assert set(per_user) == set(ref)


def test_ranked_lists_are_valid_in_every_batch(case):
    scores, train = case["scores"], case["train"]
    n_users, n_items = scores.shape
    users = np.arange(n_users)[::-1].copy()  # any order: rows follow the given users
    top, top_scores = rank_items(lambda u: torch.as_tensor(scores[u.numpy()], dtype=torch.float32), users,
                                 _train_matrix(train, n_users, n_items), max(KS), batch_size=BATCH)
    assert top.shape == (n_users, max(KS))
    check_valid_ranking(top, top_scores, users, scores, train)


# ------------------------------------------------------------------------------- end to end, trained
def _with_cold_users(ds: RecDataset, users: np.ndarray) -> RecDataset:
    keep = ~np.isin(ds.train[:, 0], users)
    return replace(ds, train=ds.train[keep], _train_csr=None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An MMRec folder whose users 4, 40, 77 and 120 have valid and test items but no training item."""
    base = make_synthetic(n_users=130, n_items=90, modalities=(("image", 8), ("text", 6)), interactions_per_user=12,
                          seed=11, name="proto")
    path = tmp_path_factory.mktemp("proto") / "data"
    write_mmrec(_with_cold_users(base, np.array([4, 40, 77, 120])), path)
    return path


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    runs = {}
    for setting in ("missing", "new-items"):
        out = tmp_path_factory.mktemp("proto") / setting
        results = dgmrec.train("MFBPR", folder, setting=setting, out=out, progress=False,
                               overrides={"epochs": 3, "eval_step": 1, "eval_batch_size": BATCH, "topk": [5, 10, 20],
                                          "learning_rate": 0.01, "train_batch_size": 256})
        runs[setting] = (dgmrec.load_dataset(folder, setting=setting), out, results)
    return runs


SPLITS = [("missing", "valid"), ("missing", "test"), ("new-items", "valid"), ("new-items", "test"),
          ("new-items", "test_new_items")]


@pytest.mark.parametrize(("setting", "split"), SPLITS)
def test_training_results_match_reference(trained, setting, split):
    ds, out, results = trained[setting]
    assert ds.n_users > 5 * BATCH
    pairs = {"valid": ds.valid, "test": ds.test, "test_new_items": ds.test_new_only}[split]
    assert pairs is not None and len(pairs)
    cold = np.setdiff1d(np.arange(ds.n_users), ds.train[:, 0])
    assert len(cold) and np.isin(cold, pairs[:, 0]).any()  # cold users with ground truth: dropped
    run = dgmrec.load_run(out)
    run.model.eval()
    with torch.no_grad():
        run.model.prepare_eval()
        scores = run.model.score_users(torch.arange(ds.n_users)).double().numpy()
    users, ref = reference_metrics(scores, ds.train, pairs, ks=(5, 10, 20))
    assert not set(cold.tolist()) & set(users)
    reported = results[split]
    for key, values in ref.items():
        assert reported[key] == pytest.approx(np.mean(values), abs=2e-6), key
    per_user = pd.read_csv(out / f"per_user_{split}.csv")
    assert per_user["user"].tolist() == users
    for key, values in ref.items():
        np.testing.assert_allclose(per_user[key].to_numpy(), values, atol=2e-6, rtol=0, err_msg=key)


def test_new_item_splits_are_what_the_protocol_says(trained):
    ds = trained["new-items"][0]
    new = ds.new_items
    assert new is not None and ds.test_new_only is not None
    assert not new[ds.train[:, 1]].any()  # new items have no training interaction
    assert new[ds.test_new_only[:, 1]].all()
    np.testing.assert_array_equal(ds.test_new_only, ds.test[new[ds.test[:, 1]]])
