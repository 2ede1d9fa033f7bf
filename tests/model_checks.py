"""Contract checks every model must pass (used by the per-model test files).

* ``check_shapes``: scores have shape (users, items) and are finite;
* ``check_loss_decreases``: the mean loss of the last steps is below that of the first steps;
* ``check_gradients``: every trainable parameter that should learn receives a non-zero gradient;
* ``check_beats_popularity``: after short training, validation Recall@20 beats the popularity ranking;
* ``check_deterministic``: the same seed gives identical metrics;
* ``check_contract``: shapes, gradients and a decreasing loss, each on a freshly built model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from dgmrec.config import resolve_config
from dgmrec.data.dataset import RecDataset
from dgmrec.evaluation.protocol import Evaluator
from dgmrec.models import build_model
from dgmrec.models.base import Recommender
from dgmrec.training.sampler import NegativeSampler
from dgmrec.training.trainer import Trainer, seed_everything


def config_for(model: str, ds: RecDataset, **overrides: Any) -> dict[str, Any]:
    cfg, _ = resolve_config(model, ds.name, overrides={"train_batch_size": 256, "eval_batch_size": 512,
                                                       **overrides})
    return cfg


def make_model(model: str, ds: RecDataset, seed: int = 0, **overrides: Any) -> Recommender:
    seed_everything(seed)
    return build_model(model, ds, config_for(model, ds, **overrides))


def make_trainer(model: str, ds: RecDataset, config: dict[str, Any], out, **options: Any) -> Trainer:
    """A trainer of a fresh ``model`` built after seeding with ``config["seed"]`` (as ``dgmrec.train`` does)."""
    seed_everything(int(config["seed"]))
    return Trainer(build_model(model, ds, config), ds, config, out, progress=False, **options)


def check_shapes(model: Recommender, ds: RecDataset) -> None:
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
        users = torch.arange(min(7, ds.n_users))
        scores = model.score_users(users)
    assert scores.shape == (len(users), ds.n_items)
    assert torch.isfinite(scores).all()


def _steps(model: Recommender, ds: RecDataset, n_epochs: int, lr: float = 0.01, batch_size: int = 256,
           seed: int = 0) -> list[float]:
    sampler = NegativeSampler(ds.train, ds.n_items, ds.new_items, seed=seed)
    opt = torch.optim.Adam(model.optimizer_groups(), lr=lr)
    losses = []
    for epoch in range(n_epochs):
        model.train()
        model.before_epoch(epoch)
        for batch in sampler.epoch(batch_size, bool(model.config.get("use_neg_sampling", True))):
            opt.zero_grad()
            out = model.loss(batch)
            if out.total.requires_grad:  # a model without trainable parameters (Content) has no gradient
                out.total.backward()
            opt.step()
            losses.append(float(out.total.detach()))
        model.after_epoch(epoch)
    return losses


def check_loss_decreases(model: Recommender, ds: RecDataset, n_epochs: int = 8, lr: float = 0.01) -> None:
    losses = _steps(model, ds, n_epochs, lr)
    k = max(1, len(losses) // 5)
    assert np.mean(losses[-k:]) < np.mean(losses[:k]), (losses[:k], losses[-k:])


def check_gradients(model: Recommender, ds: RecDataset, skip: Iterable[str] = ()) -> None:
    """One batch; every trainable parameter (except names containing an entry of ``skip``) gets gradient."""
    sampler = NegativeSampler(ds.train, ds.n_items, ds.new_items, seed=0)
    model.train()
    model.before_epoch(0)
    batch = next(iter(sampler.epoch(len(ds.train), bool(model.config.get("use_neg_sampling", True)))))
    model.zero_grad()
    model.loss(batch).total.backward()
    optimized = {id(p) for g in model.optimizer_groups() for p in g["params"]}
    missing = [n for n, p in model.named_parameters()
               if id(p) in optimized and not any(s in n for s in skip)
               and (p.grad is None or not torch.any(p.grad != 0))]
    assert not missing, f"no gradient reaches: {missing}"


def popularity_recall(ds: RecDataset, split: str = "valid", metric: str = "recall@20") -> float:
    counts = torch.as_tensor(np.bincount(ds.train[:, 1], minlength=ds.n_items), dtype=torch.float32)
    ev = Evaluator.from_pairs(ds.train_matrix(), {split: ds.split_pairs(split)})
    mean, _ = ev.evaluate(lambda users: counts.expand(len(users), -1), split)
    return mean[metric]


def trained_metrics(model_name: str, ds: RecDataset, tmp_path, epochs: int = 20, seed: int = 0,
                    **overrides: Any) -> dict[str, Any]:
    cfg = config_for(model_name, ds, epochs=epochs, eval_step=epochs, seed=seed, **overrides)
    return make_trainer(model_name, ds, cfg, tmp_path).fit().results


def check_beats_popularity(model_name: str, ds: RecDataset, tmp_path, epochs: int = 20, **overrides: Any) -> None:
    res = trained_metrics(model_name, ds, tmp_path / "pop", epochs=epochs, **overrides)
    pop = popularity_recall(ds, "test")
    assert res["test"]["recall@20"] > pop, (res["test"]["recall@20"], pop)


def _tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _tensors(state[k])]
    if isinstance(state, list | tuple):
        return [t for v in state for t in _tensors(v)]
    return []


def check_deterministic(model_name: str, ds: RecDataset, tmp_path, epochs: int = 3, **overrides: Any) -> None:
    """Two runs with one seed give the same metrics and bit-identical trained parameters, with two threads
    (accumulating gradients into rows in parallel, as ``t[idx]`` does on CPU, breaks this)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = trained_metrics(model_name, ds, tmp_path / "a", epochs=epochs, **overrides)
        b = trained_metrics(model_name, ds, tmp_path / "b", epochs=epochs, **overrides)
    finally:
        torch.set_num_threads(threads)
    assert a["test"] == b["test"] and a["valid"] == b["valid"]
    wa, wb = (_tensors(torch.load(tmp_path / run / "best.pt", weights_only=True)["model"]) for run in "ab")
    assert len(wa) == len(wb) and all(torch.equal(x, y) for x, y in zip(wa, wb, strict=True))


def check_contract(name: str, ds: RecDataset, n_epochs: int = 8, **options: Any) -> None:
    """The three per-model checks, each on a fresh ``make_model(name, ds, **options)``."""
    check_shapes(make_model(name, ds, **options), ds)
    check_gradients(make_model(name, ds, **options), ds)
    check_loss_decreases(make_model(name, ds, **options), ds, n_epochs=n_epochs)
