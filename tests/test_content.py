"""The Content baseline: a hand-computed example, skipped missing rows, the trainer path and new items."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dgmrec import api
from dgmrec.data.dataset import RecDataset
from dgmrec.errors import ConfigError
from dgmrec.models.content import LOWEST
from dgmrec.training.checkpoint import load_checkpoint
from model_checks import make_model, popularity_recall, trained_metrics

NAN = np.nan
R2 = 1 / np.sqrt(2)


def tiny() -> RecDataset:
    """2 users, 5 items; item 4 misses both modalities, items 0 and 3 miss one each."""
    m1 = np.array([[1, 0], [0, 1], [1, 1], [NAN, NAN], [NAN, NAN]], dtype=np.float32)
    m2 = np.array([[NAN, NAN], [1, 0], [0, 1], [1, 1], [NAN, NAN]], dtype=np.float32)
    observed = np.array([[1, 0], [1, 1], [1, 1], [0, 1], [0, 0]], dtype=bool)
    empty = np.zeros((0, 2), dtype=np.int64)
    return RecDataset(name="tiny", n_users=2, n_items=5, train=np.array([[0, 0], [0, 1], [1, 3]]),
                      valid=empty, test=empty, features={"m1": m1, "m2": m2}, observed=observed)


def scores(ds: RecDataset, **options: object) -> np.ndarray:
    model = make_model("Content", ds, content_scaling="none", **options)
    model.eval()
    model.prepare_eval()
    return model.score_users(torch.arange(ds.n_users)).numpy()


def test_scores_by_hand():
    s = scores(tiny())
    # user 0: profile m1 = mean(item 0, item 1) = (0.5, 0.5); profile m2 = item 1 only (item 0 misses m2) = (1, 0)
    # user 1: no m1 profile (item 3 misses m1); profile m2 = (1, 1)
    expected = np.array([
        [R2, (R2 + 1) / 2, (1 + 0) / 2, R2, LOWEST],
        [LOWEST, R2, R2, 1.0, LOWEST],
    ])
    np.testing.assert_allclose(s, expected, rtol=1e-6, atol=1e-6)


def test_missing_rows_are_skipped_not_imputed():
    ds = tiny()
    ref = scores(ds)
    for strategy in ("zero", "nn", "graph"):
        np.testing.assert_allclose(scores(ds, missing_imputation=strategy), ref, rtol=1e-6)
    only = scores(ds, content_modalities="m2")
    np.testing.assert_allclose(only[0], [LOWEST, 1.0, 0.0, R2, LOWEST], rtol=1e-6, atol=1e-7)


def test_content_modalities_option_is_checked(small2):
    for bad in ("audio", "image,image", ""):
        with pytest.raises(ConfigError, match="content_modalities"):
            make_model("Content", small2, content_modalities=bad)


def test_standardize_uses_old_items_only(small3_new):
    """Features of new items may change without changing any old item's score."""
    model = make_model("Content", small3_new)
    shifted = RecDataset(**{**small3_new.__dict__, "_train_csr": None,
                            "features": {m: np.where(small3_new.new_items[:, None], x + 100.0, x).astype(np.float32)
                                         for m, x in small3_new.features.items()}})
    other = make_model("Content", shifted)
    users = torch.arange(small3_new.n_users)
    old = torch.as_tensor(~small3_new.new_items)
    torch.testing.assert_close(model.score_users(users)[:, old], other.score_users(users)[:, old])


def test_trainer_runs_one_epoch_without_parameters(small3_new, tmp_path):
    res = api.train("Content", small3_new, out=tmp_path / "run", progress=False, use_best=False)
    assert res["epochs_run"] == 1 and res["best_epoch"] == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert 0 < log[0]["bpr"] < np.log(2)  # the fixed content scores rank positives above negatives
    state = load_checkpoint(tmp_path / "run" / "best.pt")  # nothing to store, and it loads back
    assert not [k for k in state["model"] if k != "_extra_state"]
    make_model("Content", small3_new).load_state_dict(state["model"])


def test_planted_content_beats_popularity_on_new_items(small3_new, tmp_path):
    res = trained_metrics("Content", small3_new, tmp_path, epochs=1)
    pop = popularity_recall(small3_new, "test_new")
    chance = 20 / small3_new.n_items
    assert res["test_new_items"]["recall@20"] > max(pop, 2 * chance), (res["test_new_items"], pop)
