"""Training precision (bf16 autocast in the training step, float32 everywhere else) and the thread count."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
import scipy.sparse as sp
import torch
from torch import nn

from dgmrec.config import resolve_config
from dgmrec.errors import ConfigError
from dgmrec.graphs import SparseOp
from dgmrec.losses import bpr_loss
from dgmrec.models import available_models, build_model
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender
from dgmrec.training.precision import Precision
from dgmrec.training.trainer import Trainer, seed_everything


class Probe(Recommender):
    """MF whose item vectors add a linear projection of the first modality; records the dtypes it sees."""

    name = "Probe"

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        self.user_embedding = nn.Parameter(torch.randn(self.n_users, 8) * 0.1)
        self.item_embedding = nn.Parameter(torch.randn(self.n_items, 8) * 0.1)
        self.x = data.features[data.modalities[0]]
        self.proj = nn.Linear(self.x.shape[1], 8)
        self.seen: dict[str, set[Any]] = {"loss": set(), "hook": set(), "eval": set()}

    def items(self) -> torch.Tensor:
        z = self.proj(self.x)
        self.seen["loss" if self.training else "eval"].add(z.dtype)
        return self.item_embedding + z

    def before_epoch(self, epoch: int) -> None:
        self.seen["hook"].add(torch.is_autocast_enabled("cpu"))

    def loss(self, batch: Batch) -> LossOutput:
        items = self.items()
        u = self.user_embedding[batch.users]
        return LossOutput(bpr_loss((u * items[batch.pos]).sum(1), (u * items[batch.neg]).sum(1)))

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding, self.items()


def _train_probe(ds, tmp_path, precision: str, epochs: int = 2) -> tuple[Probe, Trainer]:
    cfg, _ = resolve_config("MFBPR", ds.name, overrides={"epochs": epochs, "precision": precision,
                                                         "learning_rate": 0.01})
    seed_everything(0)
    model = Probe(ModelInput.from_dataset(ds), cfg)
    trainer = Trainer(model, ds, cfg, tmp_path, progress=False)
    trainer.fit()
    return model, trainer


def test_bf16_runs_the_loss_in_bfloat16_and_keeps_parameters_optimiser_hooks_and_scores_in_float32(small2, tmp_path):
    model, trainer = _train_probe(small2, tmp_path, "bf16")
    assert model.seen["loss"] == {torch.bfloat16}  # the projection inside the training step
    assert model.seen["hook"] == {False}  # epoch hooks outside the autocast region
    assert model.seen["eval"] == {torch.float32}  # evaluation in float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    model.seen["eval"].clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even called inside an autocast region
        trainer.evaluate(trainer.epoch)
    assert model.seen["eval"] == {torch.float32}


def test_fp32_has_no_autocast_and_bf16_changes_the_numbers_only_slightly(small2, tmp_path):
    logs = {}
    for p in ("fp32", "bf16"):
        model, _ = _train_probe(small2, tmp_path / p, p, epochs=3)
        assert model.seen["loss"] == {torch.float32 if p == "fp32" else torch.bfloat16}
        logs[p] = [json.loads(line) for line in (tmp_path / p / "log.jsonl").read_text().splitlines()]
    fp32, bf16 = [e["loss"] for e in logs["fp32"]], [e["loss"] for e in logs["bf16"]]
    assert fp32 != bf16  # the projection really ran in bfloat16
    assert max(abs(a - b) for a, b in zip(fp32, bf16, strict=True)) < 0.01


def test_sparse_products_stay_float32_inside_autocast():
    m = sp.random(30, 20, density=0.2, random_state=0, format="csr", dtype="float32")
    op = SparseOp(m)
    x = torch.randn(20, 16, requires_grad=True)
    w = torch.randn(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x @ w  # bfloat16 under autocast
        out = op @ h
    assert h.dtype == torch.bfloat16 and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.as_tensor(m.toarray()) @ h.float())
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("name", available_models())
def test_every_model_trains_in_bf16(name, small2, tmp_path):
    """Hand-written autograd kernels (fused InfoNCE, table GEMMs, edge products) compute in float32 inside the
    bf16 autocast region instead of failing on mixed bfloat16 / float32 inputs."""
    cfg, _ = resolve_config(name, small2.name, overrides={"epochs": 1, "precision": "bf16"})
    seed_everything(0)
    model = build_model(name, small2, cfg)
    res = Trainer(model, small2, cfg, tmp_path / name, progress=False).fit().results
    assert res["valid"]["recall@20"] > 0
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())


def test_precision_choices():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="precision"):
        resolve_config("MFBPR", "synthetic", overrides={"precision": "fp8"})
    assert Precision("fp32", "cpu").state() == {} and Precision("bf16", "cpu").scaler is None


def test_threads_are_set_and_may_change_on_resume_unlike_precision(small2, tmp_path):
    before = torch.get_num_threads()
    try:
        cfg, _ = resolve_config("MFBPR", small2.name, overrides={"epochs": 2, "threads": 1})
        seed_everything(0)
        trainer = Trainer(build_model("MFBPR", small2, cfg), small2, cfg, tmp_path, progress=False)
        assert torch.get_num_threads() == 1
        trainer.run_epoch()
        trainer.save_checkpoint()
        for key, value, ok in (("threads", 2, True), ("precision", "bf16", False)):
            other = {**cfg, key: value}
            seed_everything(0)
            again = Trainer(build_model("MFBPR", small2, other), small2, other, tmp_path, progress=False)
            if ok:
                again.restore()
                assert again.epoch == 1
            else:
                with pytest.raises(ConfigError, match="different model or configuration"):
                    again.restore()
    finally:
        torch.set_num_threads(before)
