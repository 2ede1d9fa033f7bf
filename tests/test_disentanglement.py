"""DGMRec's disentanglement diagnostics: the cosines by hand, logged after every epoch, neutral for training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dgmrec.config import resolve_config
from dgmrec.experiments import analyses as an
from dgmrec.models.dgmrec import COSINE_LOG_PREFIX, DGMRec, disentanglement_cosines
from model_checks import make_trainer


def test_cosines_by_hand():
    # three items; image observed by items 0 and 1, audio by items 1 and 2
    general = [torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]), torch.tensor([[9.0, 9.0], [3.0, 0.0], [0.0, 1.0]])]
    specific = [torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 4.0]])]
    observed = torch.tensor([[True, False], [True, True], [False, True]])
    cos = disentanglement_cosines(general, specific, observed, ["image", "audio"])
    assert cos["general-specific image"] == pytest.approx((0.5 * (1.0 + 0.0), 2))  # items 0, 1
    assert cos["general-specific audio"][0] == pytest.approx(0.5 * (1 / np.sqrt(2) + 1.0))  # items 1, 2
    assert cos["general image-audio"] == pytest.approx((0.0, 1))  # item 1 only: (0, 2) against (3, 0)
    # the study analysis reports the same numbers
    arrays = an.disentanglement([g.numpy() for g in general], [s.numpy() for s in specific], observed.numpy(),
                                ["image", "audio"])
    assert arrays["general-specific audio"] == {"cosine": pytest.approx(cos["general-specific audio"][0]), "items": 2}
    # a pair no item observes in full is left out
    none_both = torch.tensor([[True, False], [True, False], [False, True]])
    assert "general image-audio" not in disentanglement_cosines(general, specific, none_both, ["image", "audio"])


def _train(ds, tmp_path, name, log_cosines: bool, monkeypatch):
    cfg, _ = resolve_config("DGMRec", ds.name, overrides={"epochs": 3, "eval_step": 1, "seed": 5}, use_best=False)
    if not log_cosines:
        monkeypatch.setattr(DGMRec, "after_epoch", lambda self, epoch: None)
    trainer = make_trainer("DGMRec", ds, cfg, tmp_path / name)
    res = trainer.fit().results
    monkeypatch.undo()
    return res, [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()], trainer


def test_cosines_are_logged_every_epoch_and_leave_training_unchanged(small2, tmp_path, monkeypatch):
    with_log, log, trainer = _train(small2, tmp_path, "with", True, monkeypatch)
    without, log_without, _ = _train(small2, tmp_path, "without", False, monkeypatch)
    names = {"general-specific image", "general-specific text", "general image-text"}
    for entry in log:
        assert {k[len(COSINE_LOG_PREFIX):] for k in entry if k.startswith(COSINE_LOG_PREFIX)} == names
        assert all(0.0 <= entry[COSINE_LOG_PREFIX + n] <= 1.0 for n in names)  # sigmoid outputs: non-negative
    assert not any(k.startswith(COSINE_LOG_PREFIX) for k in log_without[0])
    # the best epoch's entry is the diagnostics of the model the run ends with (its best checkpoint)
    best = next(e for e in log if e["epoch"] == with_log["best_epoch"])
    model = trainer.model
    with torch.no_grad():
        parts = [model.encode(j) for j in range(model.M)]
    final = disentanglement_cosines([g for g, _ in parts], [s for _, s in parts], torch.as_tensor(small2.observed),
                                    small2.modalities)
    for n in names:
        assert best[COSINE_LOG_PREFIX + n] == pytest.approx(final[n][0], abs=1e-6)
    # the diagnostics read the model without changing it or any random stream: identical training
    assert [e["loss"] for e in log] == [e["loss"] for e in log_without]
    assert with_log["test"] == without["test"]
