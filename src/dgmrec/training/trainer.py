"""The training loop: BPR batches, Adam with the reference LR schedule, evaluation, early stopping,
atomic checkpoints and exact resumption.

Run directory layout::

    config.yaml      resolved configuration       log.jsonl      one line per epoch
    checkpoint.pt    full state for --resume      best.pt        best-validation model
    results.json     final summary                per_user_<split>.csv  per-user metrics at the best epoch
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dgmrec.data.dataset import RecDataset
from dgmrec.errors import ConfigError
from dgmrec.evaluation.protocol import Evaluator
from dgmrec.models import get_model_class
from dgmrec.models.base import ModelInput, Recommender
from dgmrec.training.checkpoint import check_fingerprint, dataset_fingerprint, load_checkpoint, save_atomic
from dgmrec.training.sampler import NegativeSampler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA was requested but is not available on this machine", source="--device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or auto", source="--device")
    return torch.device(device)


def build_model(name: str, ds: RecDataset, config: dict[str, Any],
                device: torch.device | str = "cpu") -> Recommender:
    cls = get_model_class(name)
    data = ModelInput.from_dataset(ds, device=device, config=config)
    model = cls(data, config)
    return model.to(device)


@dataclass
class EarlyStopper:
    """Stops once more than ``patience`` consecutive evaluations fail to improve the metric strictly.

    Evaluations made while ``counting`` is false (the model has not started to fit, see
    ``stopping_bpr_below``) still record a new best but do not use up patience.
    """

    patience: int
    best: float = -float("inf")
    best_epoch: int = -1
    bad_count: int = 0

    def update(self, value: float, epoch: int, counting: bool = True) -> bool:
        """Record an evaluation; returns True when it is a new best."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_count = value, epoch, 0
            return True
        if counting:
            self.bad_count += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_count > self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_count": self.bad_count}

    def load(self, s: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_count = float(s["best"]), int(s["best_epoch"]), int(s["bad_count"])


@dataclass
class TrainResult:
    results: dict[str, Any]
    model: Recommender
    history: list[dict[str, Any]] = field(default_factory=list)


def _round(d: dict[str, float], n: int = 6) -> dict[str, float]:
    return {k: round(float(v), n) for k, v in d.items()}


class Trainer:
    """Trains one model on one dataset into a run directory (see module docstring)."""

    def __init__(self, model_name: str, ds: RecDataset, config: dict[str, Any], out_dir: str | Path,
                 device: str | None = "cpu", run_info: dict[str, Any] | None = None,
                 progress: bool = True, stop_after_epochs: int | None = None) -> None:
        self.model_name = model_name
        self.ds = ds
        self.config = config
        self.out = Path(out_dir)
        self.device = resolve_device(device)
        self.run_info = run_info or {}
        self.progress = progress
        self.stop_after_epochs = stop_after_epochs  # for tests of resumption: stop as if killed
        valid_metric = str(config["valid_metric"])
        ks = [int(k) for k in config["topk"]]
        if "@" not in valid_metric or int(valid_metric.split("@")[1]) not in ks:
            raise ConfigError(f"valid_metric {valid_metric!r} must be a metric at one of topk {ks}",
                              source="valid_metric")
        self.valid_metric = valid_metric

    # ------------------------------------------------------------------ setup
    def _evaluator(self) -> Evaluator:
        pairs = {"valid": self.ds.valid, "test": self.ds.test}
        if self.ds.test_new_only is not None:
            pairs["test_new_items"] = self.ds.test_new_only
        return Evaluator.from_pairs(self.ds.train_matrix(), pairs, ks=[int(k) for k in self.config["topk"]],
                                    metrics=list(self.config["metrics"]),
                                    batch_size=int(self.config["eval_batch_size"]))

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        seed = int(cfg["seed"])
        ckpt_path = self.out / "checkpoint.pt"
        fingerprint = dataset_fingerprint(self.ds)
        seed_everything(seed)
        model = build_model(self.model_name, self.ds, cfg, self.device)
        groups = model.optimizer_groups()
        # the fused kernel updates all parameters in one pass (same maths as the per-parameter loop)
        optimizer = torch.optim.Adam(groups, lr=float(cfg["learning_rate"]), weight_decay=float(cfg["weight_decay"]),
                                     fused=all(p.is_floating_point() for g in groups for p in g["params"]))
        a, b = (float(v) for v in cfg["learning_rate_scheduler"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: a ** (e / b))
        sampler = NegativeSampler(self.ds.train, self.ds.n_items, self.ds.new_items, seed=seed, device=self.device)
        stopper = EarlyStopper(int(cfg["stopping_step"]))
        bpr_below = float(cfg["stopping_bpr_below"])
        evaluator = self._evaluator()
        history: list[dict[str, Any]] = []
        start_epoch = 0
        best_eval: dict[str, Any] = {}
        train_seconds: list[float] = []
        eval_seconds: list[float] = []

        if resume and ckpt_path.is_file():
            state = load_checkpoint(ckpt_path, self.device)
            check_fingerprint(state["dataset"], self.ds, str(ckpt_path))
            if state["config"] != _plain(cfg) or state["model_name"] != model.name:
                raise ConfigError("--resume with a different model or configuration than the interrupted run",
                                  source=str(ckpt_path))
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            sampler.set_state(state["rng_sampler"])
            torch.set_rng_state(state["rng_torch"])
            stopper.load(state["stopper"])
            history = list(state["history"])
            best_eval = dict(state["best_eval"])
            train_seconds = list(state["train_seconds"])
            eval_seconds = list(state["eval_seconds"])
            start_epoch = int(state["epoch"])
        # patience counts once the BPR loss has fallen below the threshold (entries without BPR: from the start)
        fitting = bpr_below <= 0 or any(e.get("bpr", 0.0) < bpr_below for e in history)
        # everything is validated and built: only now touch the run directory
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(_plain(cfg), sort_keys=True))
        self._rewrite_log(history)

        epochs = int(cfg["epochs"])
        eval_step = int(cfg["eval_step"])
        batch_size = int(cfg["train_batch_size"])
        with_neg = bool(cfg.get("use_neg_sampling", True))
        bar = _progress(self.progress, total=epochs, initial=start_epoch, desc=f"{model.name} on {self.ds.name}")
        stopped = stopper.should_stop
        epoch = start_epoch
        epochs_done_here = 0
        while epoch < epochs and not stopped:
            model.train()
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"epoch": epoch}
            pre = model.before_epoch(epoch)
            if pre:
                entry.update(_round(pre))
            totals: dict[str, float] = {}
            n_batches = 0
            for batch in sampler.epoch(batch_size, with_neg):
                optimizer.zero_grad(set_to_none=True)
                out = model.loss(batch)
                if not torch.isfinite(out.total):
                    raise FloatingPointError(f"loss became {out.total.item()} at epoch {epoch}")
                if out.total.requires_grad:  # a model without trainable parameters (Content) has no gradient
                    out.total.backward()
                optimizer.step()
                totals["loss"] = totals.get("loss", 0.0) + float(out.total.detach())
                for k, v in out.parts.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                n_batches += 1
            post = model.after_epoch(epoch)
            if post:
                entry.update(_round(post))
            scheduler.step()
            train_seconds.append(time.perf_counter() - t0)
            entry.update({k: round(v / max(1, n_batches), 6) for k, v in totals.items()})
            entry["train_seconds"] = round(train_seconds[-1], 4)
            entry["lr"] = optimizer.param_groups[0]["lr"]
            fitting = fitting or entry.get("bpr", 0.0) < bpr_below
            evaluated = (epoch + 1) % eval_step == 0 or epoch + 1 == epochs
            if evaluated:
                t1 = time.perf_counter()
                model.eval()
                model.before_evaluation(epoch)
                with torch.no_grad():
                    model.prepare_eval()
                    valid, valid_users = evaluator.evaluate(model.score_users, "valid", self.device)
                eval_seconds.append(time.perf_counter() - t1)
                entry["valid"] = _round(valid)
                entry["eval_seconds"] = round(eval_seconds[-1], 4)
                if stopper.update(valid[self.valid_metric], epoch, fitting):
                    with torch.no_grad():
                        tests = {s: evaluator.evaluate(model.score_users, s, self.device)
                                 for s in evaluator.splits if s != "valid"}
                    entry.update({s: _round(v[0]) for s, v in tests.items()})
                    best_eval = {"epoch": epoch, "valid": _round(valid),
                                 **{s: _round(v[0]) for s, v in tests.items()}}
                    self._save_per_user(evaluator, {"valid": valid_users, **{s: v[1] for s, v in tests.items()}})
                    save_atomic({"model": model.state_dict(), "model_name": model.name, "config": _plain(cfg),
                                 "dataset": fingerprint, "epoch": epoch, "run": self.run_info},
                                self.out / "best.pt")
                stopped = stopper.should_stop
            history.append(entry)
            self._append_log(entry)
            epoch += 1
            epochs_done_here += 1
            if bar is not None:
                bar.update(1)
                post_fix = {"loss": entry.get("loss", 0.0)}
                if "valid" in entry:
                    post_fix[self.valid_metric] = entry["valid"][self.valid_metric]
                bar.set_postfix(post_fix)
            if evaluated or stopped or epoch == epochs:
                save_atomic({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng_sampler": sampler.state(),
                    "rng_torch": torch.get_rng_state(), "stopper": stopper.state(), "history": history,
                    "best_eval": best_eval, "epoch": epoch, "config": _plain(cfg), "model_name": model.name,
                    "dataset": fingerprint, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                }, ckpt_path)
            if self.stop_after_epochs is not None and epochs_done_here >= self.stop_after_epochs and evaluated:
                if bar is not None:
                    bar.close()
                return TrainResult(results={"interrupted": True, "epoch": epoch}, model=model, history=history)
        if bar is not None:
            bar.close()
        results = {
            "model": model.name,
            "dataset": self.ds.name,
            "setting": self.ds.setting,
            "modalities": self.ds.modalities,
            "seed": seed,
            "best_epoch": best_eval.get("epoch", -1),
            "epochs_run": epoch,
            "early_stopped": bool(stopped and epoch < epochs),
            "seconds_per_epoch": round(float(np.mean(train_seconds)) if train_seconds else 0.0, 4),
            "seconds_per_evaluation": round(float(np.mean(eval_seconds)) if eval_seconds else 0.0, 4),
            "valid_metric": self.valid_metric,
            "valid": best_eval.get("valid", {}),
            "test": best_eval.get("test", {}),
            "device": str(self.device),
            "config": _plain(cfg),
            "run": self.run_info,
            "dataset_fingerprint": fingerprint,
        }
        if "test_new_items" in best_eval:
            results["test_new_items"] = best_eval["test_new_items"]
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(self.out / "results.json")
        return TrainResult(results=results, model=model, history=history)

    # ------------------------------------------------------------------- logs
    def _append_log(self, entry: dict[str, Any]) -> None:
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def _rewrite_log(self, history: list[dict[str, Any]]) -> None:
        with (self.out / "log.jsonl").open("w") as f:
            for e in history:
                f.write(json.dumps(e) + "\n")

    def _save_per_user(self, evaluator: Evaluator, per_split: dict[str, dict[str, np.ndarray]]) -> None:
        for split, vectors in per_split.items():
            users = evaluator.splits[split].users
            cols = ["user", *vectors]
            rows = np.column_stack([users, *[vectors[c] for c in vectors]])
            tmp = self.out / f".per_user_{split}.csv.tmp"
            fmt = ["%d"] + ["%.6f"] * len(vectors)
            np.savetxt(tmp, rows, delimiter=",", header=",".join(cols), comments="", fmt=fmt)
            tmp.replace(self.out / f"per_user_{split}.csv")


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.items())}


def _progress(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", dynamic_ncols=True, leave=True)


ProgressFactory = Callable[..., Any]
