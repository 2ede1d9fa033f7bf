"""Early stopping: patience counted in evaluations, strict improvement, and the optional BPR warm-up."""

from __future__ import annotations

import json
from itertools import pairwise

from dgmrec.config import resolve_config
from dgmrec.training.trainer import EarlyStopper, Trainer


def test_early_stopper_by_hand():
    stopper = EarlyStopper(patience=2)
    history = []
    for epoch, value in enumerate([0.1, 0.2, 0.2, 0.15, 0.19, 0.3]):
        stopper.update(value, epoch)
        history.append(stopper.should_stop)
    # 0.2 at epoch 1 is the best; equal is no improvement; the third miss (epoch 4) exceeds the patience of 2
    assert history == [False, False, False, False, True, False]
    assert (stopper.best, stopper.best_epoch) == (0.3, 5)


def test_evaluations_before_the_model_fits_do_not_use_patience():
    stopper = EarlyStopper(patience=0)
    assert stopper.update(0.5, 0, counting=False)  # a new best is recorded either way
    for epoch in range(1, 5):
        assert not stopper.update(0.4, epoch, counting=False)
        assert not stopper.should_stop
    stopper.update(0.4, 5, counting=True)
    assert stopper.should_stop and stopper.best_epoch == 0


def _run(ds, tmp_path, **overrides):
    cfg, _ = resolve_config("MFBPR", ds.name, overrides={"epochs": 12, "eval_step": 1, "stopping_step": 0,
                                                         "learning_rate": 0.05, **overrides})
    Trainer("MFBPR", ds, cfg, tmp_path, progress=False).fit()
    res = json.loads((tmp_path / "results.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    return res, log


def test_training_stops_after_the_patience_and_reports_the_best(small2, tmp_path):
    res, log = _run(small2, tmp_path / "plain")
    recalls = [e["valid"]["recall@20"] for e in log]
    assert res["epochs_run"] < 12  # with no patience, the first evaluation without improvement ends the run
    assert recalls[-1] <= max(recalls[:-1]) and all(b > a for a, b in pairwise(recalls[:-1]))
    assert res["best_epoch"] == len(log) - 2 and res["valid"]["recall@20"] == max(recalls)


def test_patience_waits_for_the_bpr_loss(small2, tmp_path):
    plain, _ = _run(small2, tmp_path / "plain")
    # the BPR loss of this short run never falls below 0.01: patience is never used, the run goes to the cap
    guarded, log = _run(small2, tmp_path / "guarded", stopping_bpr_below=0.01)
    assert guarded["epochs_run"] == 12 > plain["epochs_run"]
    assert all(e["bpr"] >= 0.01 for e in log)
    # the reported test metrics are still those of the best validation evaluation
    best = max(log, key=lambda e: e["valid"]["recall@20"])
    assert guarded["best_epoch"] == best["epoch"] and guarded["test"] == best["test"]
