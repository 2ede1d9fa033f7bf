"""The trainer: early stopping (patience counted in evaluations, strict improvement, the optional BPR warm-up),
its named steps, the model hook order, and exact resumption from a checkpoint."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dgmrec import models
from dgmrec.config import check_values, resolve_config, shipped
from dgmrec.errors import ConfigError
from dgmrec.models import build_model
from dgmrec.models.mfbpr import MFBPR
from dgmrec.training.trainer import EarlyStopper, Trainer, TrainingStopped, seed_everything
from model_checks import check_gradients, check_loss_decreases, check_shapes, make_trainer, popularity_recall


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
                                                         "stopping_min_steps": 0, "learning_rate": 0.05,
                                                         **overrides})
    make_trainer("MFBPR", ds, cfg, tmp_path).fit()
    res = json.loads((tmp_path / "results.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    return res, log


def test_training_stops_after_the_patience_and_reports_the_best(small2, tmp_path):
    res, log = _run(small2, tmp_path / "plain")
    recalls = [e["valid"]["recall@20"] for e in log]
    assert res["epochs_run"] < 12  # with no patience, the first evaluation without improvement ends the run
    assert recalls[-1] <= max(recalls[:-1]) and all(b > a for a, b in pairwise(recalls[:-1]))
    assert res["best_epoch"] == len(log) - 2 and res["valid"]["recall@20"] == max(recalls)


def test_run_times_are_medians_over_the_epochs(small2, tmp_path, monkeypatch):
    """One epoch that takes 100 s longer (a suspended process) does not move the run's seconds per epoch."""
    original = Trainer.train_epoch

    def suspended_once(self, epoch):
        entry = original(self, epoch)
        if epoch == 2:
            self.train_seconds[-1] += 100.0
            entry["train_seconds"] = round(self.train_seconds[-1], 4)
        return entry

    monkeypatch.setattr(Trainer, "train_epoch", suspended_once)
    res, log = _run(small2, tmp_path / "run", stopping_bpr_below=0.01, epochs=5)
    train = [e["train_seconds"] for e in log]
    assert len(train) == 5 and max(train) > 100
    assert res["seconds_per_epoch"] == pytest.approx(float(np.median(train)), abs=1e-3)
    assert res["seconds_per_epoch"] < 50
    assert res["train_seconds_total"] == pytest.approx(sum(train), abs=0.02)


def test_patience_waits_for_the_bpr_loss(small2, tmp_path):
    plain, _ = _run(small2, tmp_path / "plain")
    # the BPR loss of this short run never falls below 0.01: patience is never used, the run goes to the cap
    guarded, log = _run(small2, tmp_path / "guarded", stopping_bpr_below=0.01)
    assert guarded["epochs_run"] == 12 > plain["epochs_run"]
    assert all(e["bpr"] >= 0.01 for e in log)
    # the reported test metrics are still those of the best validation evaluation
    best = max(log, key=lambda e: e["valid"]["recall@20"])
    assert guarded["best_epoch"] == best["epoch"] and guarded["test"] == best["test"]


# ------------------------------------------------------------------------------------------ named steps
TIMINGS = ("train_seconds", "eval_seconds", "seconds_per_epoch", "seconds_per_evaluation", "train_seconds_total")


def _without_timings(d):
    return {k: v for k, v in d.items() if k not in TIMINGS}


def _run_record(out):
    """results.json and log.jsonl without wall-clock times, and the best model's parameters."""
    res = _without_timings(json.loads((out / "results.json").read_text()))
    log = [_without_timings(json.loads(line)) for line in (out / "log.jsonl").read_text().splitlines()]
    return res, log, torch.load(out / "best.pt", weights_only=True)["model"]


def _same(a, b) -> bool:
    """Equal state dicts: same keys, bit-identical tensors (nested extra state included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _lightgcn_config(ds, **overrides):
    cfg, _ = resolve_config("LightGCN", ds.name, overrides={"epochs": 6, "eval_step": 2, "stopping_step": 10,
                                                            "learning_rate": 0.01, "train_batch_size": 512,
                                                            **overrides})
    return cfg


@pytest.mark.parametrize("killed_after", [2, 3])  # right after a checkpoint / one epoch past it
def test_resuming_after_n_epochs_reproduces_the_uninterrupted_run(small2, tmp_path, killed_after):
    cfg = _lightgcn_config(small2)
    make_trainer("LightGCN", small2, cfg, tmp_path / "full").fit()
    killed = make_trainer("LightGCN", small2, cfg, tmp_path / "part")
    for _ in range(killed_after):
        killed.run_epoch()
    assert not (tmp_path / "part" / "results.json").exists()
    # a new process: build the model again and continue from checkpoint.pt (written after epoch 2)
    make_trainer("LightGCN", small2, cfg, tmp_path / "part").fit(resume=True)
    full, part = _run_record(tmp_path / "full"), _run_record(tmp_path / "part")
    assert part[0] == full[0] and part[1] == full[1]
    assert len(part[1]) == 6 and part[0]["epochs_run"] == 6
    assert _same(part[2], full[2])


def test_a_stop_callback_ends_the_run_resumably(small2, tmp_path):
    cfg = _lightgcn_config(small2)
    make_trainer("LightGCN", small2, cfg, tmp_path / "full").fit()
    asked = []
    with pytest.raises(TrainingStopped):
        make_trainer("LightGCN", small2, cfg, tmp_path / "part").fit(stop=lambda: asked.append(1) or len(asked) == 2)
    assert len(asked) == 2 and not (tmp_path / "part" / "results.json").exists()
    assert len((tmp_path / "part" / "log.jsonl").read_text().splitlines()) == 2
    make_trainer("LightGCN", small2, cfg, tmp_path / "part").fit(resume=True)
    assert _run_record(tmp_path / "part")[:2] == _run_record(tmp_path / "full")[:2]


def test_fit_is_the_composition_of_the_steps(small2, tmp_path):
    cfg = _lightgcn_config(small2, epochs=3)
    make_trainer("LightGCN", small2, cfg, tmp_path / "fit").fit()
    t = make_trainer("LightGCN", small2, cfg, tmp_path / "steps")
    t.open_run()
    entries = []
    for epoch in range(3):
        entry = t.train_epoch(epoch)
        assert "valid" not in entry and entry["loss"] > 0 and entry["lr"] == pytest.approx(0.01)
        if epoch in (1, 2):  # eval_step 2, and the last epoch
            entry.update(t.evaluate(epoch))
        entries.append(entry)
        t.history.append(entry)
        t.epoch += 1
    (tmp_path / "steps" / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    t.write_results()
    fit, steps = _run_record(tmp_path / "fit"), _run_record(tmp_path / "steps")
    assert steps[0] == fit[0] and steps[1] == fit[1]
    assert "valid" in entries[1] and "test" in entries[1]  # the first evaluation is a new best


def test_resume_without_a_checkpoint_is_an_error(small2, tmp_path):
    trainer = make_trainer("LightGCN", small2, _lightgcn_config(small2), tmp_path / "empty")
    with pytest.raises(ConfigError, match="--resume: nothing to resume"):
        trainer.fit(resume=True)
    assert not (tmp_path / "empty").exists()


def test_resume_with_another_configuration_is_an_error(small2, tmp_path):
    cfg = _lightgcn_config(small2, epochs=2)
    make_trainer("LightGCN", small2, cfg, tmp_path).fit()
    with pytest.raises(ConfigError, match="different model or configuration"):
        make_trainer("LightGCN", small2, {**cfg, "learning_rate": 0.02}, tmp_path).fit(resume=True)


class RecordingMF(MFBPR):
    """MF-BPR that records the trainer's hook calls."""

    calls: list[str]

    def before_epoch(self, epoch):
        self.calls.append(f"before_epoch {epoch}")

    def loss(self, batch):
        if not self.calls[-1].startswith("loss"):
            self.calls.append("loss")
        return super().loss(batch)

    def after_epoch(self, epoch):
        self.calls.append(f"after_epoch {epoch}")

    def before_evaluation(self, epoch):
        self.calls.append(f"before_evaluation {epoch}")

    def prepare_eval(self):
        self.calls.append("prepare_eval")
        super().prepare_eval()


def test_hook_order(small2, tmp_path):
    cfg, _ = resolve_config("MFBPR", small2.name, overrides={"epochs": 3, "eval_step": 2})
    seed_everything(0)
    model = build_model("MFBPR", small2, cfg)
    model.__class__ = RecordingMF
    model.calls = ["start"]
    Trainer(model, small2, cfg, tmp_path, progress=False).fit()
    epoch = ["before_epoch {e}", "loss", "after_epoch {e}"]
    evaluation = ["before_evaluation {e}", "prepare_eval"]
    expected = [c.format(e=e) for e, ev in ((0, False), (1, True), (2, True)) for c in epoch + evaluation * ev]
    assert model.calls[1:] == expected


# ------------------------------------------------------------------------ the architecture guide's model
def _guide_block(marker: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    found = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", text, re.S)
    assert found, f"docs/architecture.md has no {marker} block"
    return found.group(1)


def test_the_architecture_guide_example_model_works(small3, tmp_path, monkeypatch):
    """The walk-through's model file, YAML and registry line, as printed, give a model that trains."""
    (tmp_path / "contentmf.py").write_text(_guide_block("example-model"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(models._REGISTRY, "ContentMF", "contentmf")
    cfg = {**shipped("overall", ""), **yaml.safe_load(_guide_block("example-yaml")), "epochs": 20, "eval_step": 20,
           "train_batch_size": 256}
    check_values(cfg, "ContentMF")
    assert "ContentMF" in models.available_models()
    seed_everything(0)
    check_shapes(build_model("ContentMF", small3, cfg), small3)
    check_gradients(build_model("ContentMF", small3, cfg), small3)
    check_loss_decreases(build_model("ContentMF", small3, cfg), small3)
    seed_everything(0)
    res = Trainer(build_model("ContentMF", small3, cfg), small3, cfg, tmp_path / "run", progress=False).fit().results
    assert res["model"] == "ContentMF" and res["test"]["recall@20"] > popularity_recall(small3, "test")
