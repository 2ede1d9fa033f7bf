"""Data-parallel training with two gloo processes on tiny data, against the single-process run."""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import dgmrec
from dgmrec.config import resolve_config
from dgmrec.data.dataset import RecDataset
from dgmrec.losses import bpr_loss
from dgmrec.models import build_model
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender
from dgmrec.training import distributed
from dgmrec.training.checkpoint import load_checkpoint
from dgmrec.training.distributed import DistributedTrainer
from dgmrec.training.trainer import Trainer, seed_everything

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

# MF-BPR without the batch-norm regulariser: a mean over the batch rows, so two shards give the exact gradient;
# 3 * 101 rows per global batch are split 50 / 51 and must be weighted by their share
OVERRIDES = {"epochs": 3, "reg_weight": 0.0, "learning_rate": 0.05, "train_batch_size": 101, "eval_step": 1}


class NoisyMF(Recommender):
    """MF whose hooks and loss draw random numbers: hooks must agree across ranks, losses may not."""

    name = "NoisyMF"
    uses_features = False

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        self.user_embedding = nn.Parameter(torch.randn(self.n_users, 8) * 0.1)
        self.item_embedding = nn.Parameter(torch.randn(self.n_items, 8) * 0.1)
        self.register_buffer("shift", torch.zeros(self.n_items, 8))

    def before_epoch(self, epoch: int) -> None:
        self.shift = 0.01 * torch.randn(self.n_items, 8)  # e.g. a generation step with noise

    def loss(self, batch: Batch) -> LossOutput:
        u = nn.functional.dropout(self.user_embedding[batch.users], 0.2)  # a different draw on every rank
        items = self.item_embedding + self.shift
        return LossOutput(bpr_loss((u * items[batch.pos]).sum(1), (u * items[batch.neg]).sum(1)))

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding, self.item_embedding + self.shift


def _worker(rank: int, world: int, port: int, ds: RecDataset, root: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    out = Path(root)
    with distributed.session(torch.device("cpu")):
        _phases(rank, world, ds, out)


def _phases(rank: int, world: int, ds: RecDataset, out: Path) -> None:
    # 1. the whole run through the API, which finds the process group
    dgmrec.train("MFBPR", ds, out=out / "ddp", overrides=OVERRIDES, progress=False)
    # 2. a run that dies after two epochs, then resumes through the API
    cfg, _ = resolve_config("MFBPR", ds.name, overrides=OVERRIDES)
    seed_everything(int(cfg["seed"]))
    trainer = DistributedTrainer(build_model("MFBPR", ds, cfg), ds, cfg, out / "resumed", progress=False)
    trainer.run_epoch()
    trainer.run_epoch()
    trainer.close()
    # 3. random hooks and a random loss: the ranks stay in step
    cfg["epochs"] = 2
    seed_everything(0)
    noisy = DistributedTrainer(NoisyMF(ModelInput.from_dataset(ds), cfg), ds, cfg, out / "noisy", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        noisy.fit()
    digests = noisy.state_digests()
    seen: list[Any] = [None] * world
    torch.distributed.all_gather_object(seen, sorted(noisy.model.__dict__))
    dgmrec.train("MFBPR", ds, out=out / "resumed", overrides=OVERRIDES, progress=False, resume=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "digests": digests, "drift_warnings": [str(w.message) for w in caught if "drifted" in str(w.message)],
        "hooks_restored": all("before_epoch" not in s for s in seen)}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_ranks(small2, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), small2, str(root)), nprocs=2, join=True)
    single = dgmrec.train("MFBPR", small2, out=root / "single", overrides=OVERRIDES, progress=False)
    return root, single


def _log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_two_processes_take_the_single_process_steps(two_ranks):
    root, single = two_ranks
    ddp = json.loads((root / "ddp" / "results.json").read_text())
    assert ddp["run"]["world_size"] == 2 and "world_size" not in single["run"]
    a = load_checkpoint(root / "ddp" / "checkpoint.pt")["model"]
    b = load_checkpoint(root / "single" / "checkpoint.pt")["model"]
    for name in ("user_embedding", "item_embedding"):  # float rounding apart (a wrong weighting: ~0.3)
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4)
    assert ddp["best_epoch"] == single["best_epoch"]
    for split in ("valid", "test"):
        for metric, value in single[split].items():
            assert ddp[split][metric] == pytest.approx(value, abs=1e-6)
    # rank 0 alone wrote the run directory: one log line per epoch, with the global mean loss
    assert [e["epoch"] for e in _log(root / "ddp")] == [0, 1, 2]
    for x, y in zip(_log(root / "ddp"), _log(root / "single"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-3)


def test_a_resumed_two_process_run_ends_like_the_uninterrupted_one(two_ranks):
    root, _ = two_ranks
    resumed = json.loads((root / "resumed" / "results.json").read_text())
    ddp = json.loads((root / "ddp" / "results.json").read_text())
    assert resumed["epochs_run"] == 3 and resumed["valid"] == ddp["valid"] and resumed["test"] == ddp["test"]


def test_hooks_that_draw_random_numbers_keep_the_ranks_in_step(two_ranks):
    root, _ = two_ranks
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["digests"] == ranks[1]["digests"] and len(set(ranks[0]["digests"])) == 1
    assert ranks[0]["drift_warnings"] == [] and ranks[1]["drift_warnings"] == []
    assert ranks[0]["hooks_restored"] and ranks[1]["hooks_restored"]


def test_a_single_process_run_is_not_distributed(small2, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched()
    cfg, _ = resolve_config("MFBPR", small2.name, overrides={"epochs": 1})
    with pytest.raises(RuntimeError, match="needs a process group"):
        DistributedTrainer(build_model("MFBPR", small2, cfg), small2, cfg, tmp_path)
    assert type(Trainer(build_model("MFBPR", small2, cfg), small2, cfg, tmp_path)) is Trainer
