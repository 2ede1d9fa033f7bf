"""The training loop: BPR batches, Adam with the reference LR schedule, evaluation, early stopping,
atomic checkpoints and exact resumption.

:class:`Trainer` trains a built model in named steps that :meth:`Trainer.fit` composes::

    restore()                  # optional: continue from checkpoint.pt (resume)
    open_run()                 # write config.yaml, (re)write log.jsonl
    run_epoch()                # until finished:
        train_epoch(epoch)     #   hooks + one pass over the BPR batches -> log entry
        evaluate(epoch)        #   every eval_step epochs: validation; on a new best test splits + best.pt
        save_checkpoint()      #   after every evaluation and after the last epoch
    write_results()            # results.json

Run directory layout::

    config.yaml      resolved configuration       log.jsonl      one line per epoch
    checkpoint.pt    full state for --resume      best.pt        best-validation model
    results.json     final summary                per_user_<split>.csv  per-user metrics at the best epoch
    curves.png       loss terms and validation metric per epoch (written with results.json)
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dgmrec.config import check_values, fit_cutoffs
from dgmrec.data.dataset import RecDataset
from dgmrec.data.spec import DatasetSpec
from dgmrec.errors import ConfigError
from dgmrec.evaluation.protocol import Evaluator
from dgmrec.models.base import Batch, LossOutput, Recommender
from dgmrec.training.checkpoint import check_fingerprint, dataset_fingerprint, load_checkpoint, save_atomic
from dgmrec.training.curves import CURVES_NAME, plot_curves
from dgmrec.training.precision import Precision, set_threads
from dgmrec.training.sampler import NegativeSampler

logger = logging.getLogger("dgmrec")

#: the new-item setting's extra test splits, reported in results.json beside ``test``
COLD_START_SPLITS = ("test_new_items", "test_cold", "test_warm")


class TrainingStopped(Exception):
    """A run ended early by its ``stop`` callback (:meth:`Trainer.fit`); its checkpoint is kept."""


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
    """Trains ``model`` (built on ``dataset``, see :func:`dgmrec.models.build_model`) into a run directory.

    The optimiser (Adam over ``model.optimizer_groups()``, fused), the learning-rate schedule, the negative
    sampler (seeded by ``config["seed"]``), the early stopper and the evaluator are built here; nothing draws
    from torch's global generator before the first epoch, so a model built right after
    ``seed_everything(config["seed"])`` trains identically every time. ``spec`` describes the dataset for the
    run record (default: :meth:`DatasetSpec.of_dataset`); ``run_info`` adds entries to that record.

    Cut-offs the catalogue cannot measure (``topk`` at or above the number of items) are dropped and
    ``valid_metric`` follows (:func:`dgmrec.config.fit_cutoffs`); the change is logged once and listed under
    ``notes`` in ``results.json``.
    """

    def __init__(self, model: Recommender, dataset: RecDataset, config: Mapping[str, Any], out_dir: str | Path, *,
                 spec: DatasetSpec | None = None, run_info: Mapping[str, Any] | None = None,
                 progress: bool = True) -> None:
        config, self.notes = fit_cutoffs(config, dataset.n_items)
        check_values(config, model.name)
        for note in self.notes:
            logger.warning("note: %s", note)
        set_threads(config)
        self.model = model
        self.ds = dataset
        self.config = dict(config)
        self.out = Path(out_dir)
        self.device = model.device
        self.spec = spec if spec is not None else DatasetSpec.of_dataset(dataset)
        self.run_info = {**(run_info or {}), "dataset_spec": self.spec.to_dict()}
        self.progress = progress
        cfg = self.config
        self.valid_metric = str(cfg["valid_metric"])
        self.epochs = int(cfg["epochs"])
        self.eval_step = int(cfg["eval_step"])
        self.batch_size = int(cfg["train_batch_size"])
        self.with_negatives = bool(cfg.get("use_neg_sampling", True))
        self.bpr_below = float(cfg["stopping_bpr_below"])
        self.min_steps = int(cfg.get("stopping_min_steps", 0))
        self.precision = Precision(str(cfg.get("precision", "fp32")), self.device)
        groups = model.optimizer_groups()
        # the fused kernel updates all parameters in one pass (same maths as the per-parameter loop)
        self.optimizer = torch.optim.Adam(groups, lr=float(cfg["learning_rate"]),
                                          weight_decay=float(cfg["weight_decay"]),
                                          fused=all(p.is_floating_point() for g in groups for p in g["params"]))
        a, b = (float(v) for v in cfg["learning_rate_scheduler"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: a ** (e / b))
        self.sampler = NegativeSampler(dataset.train, dataset.n_items, dataset.new_items, seed=int(cfg["seed"]),
                                       device=self.device)
        self.stopper = EarlyStopper(int(cfg["stopping_step"]))
        self.evaluator = self._evaluator()
        self.fingerprint = dataset_fingerprint(dataset)
        # the run's progress: everything a checkpoint holds besides the model, optimiser, schedule and sampler
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []
        self.best_eval: dict[str, Any] = {}
        self.train_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.loss_keys: list[str] = []  # the loss terms the log holds (hook outputs are logged beside them)
        # patience counts once the BPR loss has fallen below the threshold (entries without BPR: from the start)
        self.fitting = self.bpr_below <= 0
        self._opened = False

    def _evaluator(self) -> Evaluator:
        """Validation and test splits; in the new-item setting also the cold-start protocol's three test splits:
        ``test_new_items`` (hybrid: every item ranked, truth on new items), ``test_cold`` (new items ranked, truth
        on new items) and ``test_warm`` (old items ranked, truth on old items)."""
        pairs = {"valid": self.ds.valid, "test": self.ds.test}
        candidates = {}
        if self.ds.test_new_only is not None and self.ds.new_items is not None:
            new = self.ds.new_items.astype(bool)
            pairs.update(test_new_items=self.ds.test_new_only, test_cold=self.ds.test, test_warm=self.ds.test)
            candidates = {"test_cold": new, "test_warm": ~new}
        return Evaluator.from_pairs(self.ds.train_matrix(), pairs, ks=[int(k) for k in self.config["topk"]],
                                    metrics=list(self.config["metrics"]),
                                    batch_size=int(self.config["eval_batch_size"]), candidates=candidates)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def finished(self) -> bool:
        """All epochs are done or early stopping ended the run."""
        return self.epoch >= self.epochs or self.stopper.should_stop

    # ------------------------------------------------------------- the steps
    def fit(self, resume: bool = False, stop: Callable[[], bool] | None = None) -> TrainResult:
        """Train until finished (continuing ``checkpoint.pt`` when ``resume``) and write ``results.json``.

        ``stop`` is asked after every epoch; when it answers True the run ends there with
        :class:`TrainingStopped`, its last checkpoint kept and no ``results.json`` (it can be resumed).
        """
        if resume:
            self.restore()
        self.open_run()
        bar = _progress(self.progress, total=self.epochs, initial=self.epoch,
                        desc=f"{self.model.name} on {self.ds.name}")
        try:
            while not self.finished:
                entry = self.run_epoch()
                if bar is not None:
                    bar.update(1)
                    post_fix = {"loss": entry.get("loss", 0.0)}
                    if "valid" in entry:
                        post_fix[self.valid_metric] = entry["valid"][self.valid_metric]
                    bar.set_postfix(post_fix)
                if stop is not None and not self.finished and stop():
                    raise TrainingStopped(f"stopped after {self.epoch} epochs")
        finally:
            if bar is not None:
                bar.close()
        return TrainResult(results=self.write_results(), model=self.model, history=self.history)

    def restore(self, path: str | Path | None = None) -> None:
        """Continue the run saved in ``path`` (default ``checkpoint.pt`` of the run directory).

        The checkpoint must come from the same dataset, model and configuration; a missing one is an error.
        """
        ckpt = Path(path) if path is not None else self.checkpoint_path
        if not ckpt.is_file():
            raise ConfigError(f"nothing to resume: no checkpoint.pt in {ckpt.parent}", source="--resume")
        state = load_checkpoint(ckpt, self.device)
        check_fingerprint(state["dataset"], self.ds, str(ckpt))
        if _settings(state["config"]) != _settings(self.config) or state["model_name"] != self.model.name:
            raise ConfigError("--resume with a different model or configuration than the interrupted run",
                              source=str(ckpt))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.set_state(state["rng_sampler"])
        self.precision.load(state.get("grad_scaler"))
        torch.set_rng_state(state["rng_torch"])
        self.stopper.load(state["stopper"])
        self.history = list(state["history"])
        self.best_eval = dict(state["best_eval"])
        self.train_seconds = list(state["train_seconds"])
        self.eval_seconds = list(state["eval_seconds"])
        self.epoch = int(state["epoch"])
        self.loss_keys = list(state.get("loss_keys", []))
        self.fitting = self.bpr_below <= 0 or any(e.get("bpr", 0.0) < self.bpr_below for e in self.history)

    def open_run(self) -> None:
        """Create the run directory, write ``config.yaml`` and rewrite ``log.jsonl`` from the history."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(_plain(self.config), sort_keys=True))
        with (self.out / "log.jsonl").open("w") as f:
            for e in self.history:
                f.write(json.dumps(e) + "\n")
        self._opened = True

    def run_epoch(self) -> dict[str, Any]:
        """One epoch: train, evaluate when due, log, and checkpoint after an evaluation or the last epoch."""
        if not self._opened:
            self.open_run()
        epoch = self.epoch
        entry = self.train_epoch(epoch)
        evaluated = (epoch + 1) % self.eval_step == 0 or epoch + 1 == self.epochs
        if evaluated:
            entry.update(self.evaluate(epoch))
        self.history.append(entry)
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        self.epoch += 1
        if evaluated or self.finished:
            self.save_checkpoint()
        return entry

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """The model's epoch hooks around one pass over the training batches, then one scheduler step.

        Returns the log entry: hook outputs, mean loss parts, ``train_seconds`` and the new ``lr``.
        """
        model = self.model
        model.train()
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"epoch": epoch}
        pre = model.before_epoch(epoch)
        if pre:
            entry.update(_round(pre))
        totals: dict[str, float] = {}
        n_batches = 0
        for batch in self.batches():
            out = self.train_step(batch, epoch)
            totals["loss"] = totals.get("loss", 0.0) + float(out.total.detach())
            for k, v in out.parts.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n_batches += 1
        totals, n_batches = self.reduce_totals(totals, n_batches)
        post = model.after_epoch(epoch)
        if post:
            entry.update(_round(post))
        self.scheduler.step()
        self.train_seconds.append(time.perf_counter() - t0)
        entry.update({k: round(v / max(1, n_batches), 6) for k, v in totals.items()})
        self.loss_keys.extend(k for k in totals if k not in self.loss_keys)
        entry["train_seconds"] = round(self.train_seconds[-1], 4)
        entry["lr"] = self.optimizer.param_groups[0]["lr"]
        self.fitting = self.fitting or entry.get("bpr", 0.0) < self.bpr_below
        return entry

    def batches(self) -> Iterator[Batch]:
        """The training batches of one epoch (a distributed trainer yields this process's share of each)."""
        return self.sampler.epoch(self.batch_size, self.with_negatives)

    def train_step(self, batch: Batch, epoch: int) -> LossOutput:
        """One optimiser step: the loss under the run's precision, its gradients, :meth:`reduce_gradients`."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            out = self.model.loss(batch)
        if not torch.isfinite(out.total):
            raise FloatingPointError(f"loss became {out.total.item()} at epoch {epoch}")
        if out.total.requires_grad:  # a model without trainable parameters (Content) has no gradient
            self.precision.backward(out.total)
        self.reduce_gradients()
        self.precision.step(self.optimizer)
        return out

    def reduce_gradients(self) -> None:
        """Combine the gradients of the processes of a distributed run (nothing to do in one process)."""

    def reduce_totals(self, totals: dict[str, float], n_batches: int) -> tuple[dict[str, float], int]:
        """The epoch's summed loss parts and batch count over all processes (here: this process's own)."""
        return totals, n_batches

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Validation metrics; on a new best also the test splits, the per-user CSVs and ``best.pt``.

        Updates the early stopper; returns the entries for the log (``valid``, ``eval_seconds``, test splits).
        """
        if not self._opened:
            self.open_run()
        model, evaluator = self.model, self.evaluator
        t1 = time.perf_counter()
        model.eval()
        model.before_evaluation(epoch)
        with torch.no_grad(), self.precision.evaluation():
            model.prepare_eval()
            valid, valid_users = evaluator.evaluate(model.score_users, "valid", self.device)
        self.eval_seconds.append(time.perf_counter() - t1)
        out: dict[str, Any] = {"valid": _round(valid), "eval_seconds": round(self.eval_seconds[-1], 4)}
        if self.stopper.update(valid[self.valid_metric], epoch, self.patience_counts(epoch)):
            with torch.no_grad(), self.precision.evaluation():
                tests = {s: evaluator.evaluate(model.score_users, s, self.device)
                         for s in evaluator.splits if s != "valid"}
            out.update({s: _round(v[0]) for s, v in tests.items()})
            self.best_eval = {"epoch": epoch, "valid": _round(valid), **{s: _round(v[0]) for s, v in tests.items()}}
            self._save_per_user({"valid": valid_users, **{s: v[1] for s, v in tests.items()}})
            save_atomic({"model": model.state_dict(), "model_name": model.name, "config": _plain(self.config),
                         "dataset": self.fingerprint, "epoch": epoch, "run": self.run_info}, self.out / "best.pt")
        return out

    def patience_counts(self, epoch: int) -> bool:
        """Whether an evaluation after ``epoch`` without improvement uses up patience: once the model has
        taken ``stopping_min_steps`` optimisation steps and (``stopping_bpr_below`` > 0) its BPR loss fell below
        that threshold. Small catalogues take one step per epoch and would otherwise stop before learning."""
        steps = (epoch + 1) * self.sampler.n_batches(self.batch_size)
        return self.fitting and steps >= self.min_steps

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt``: everything :meth:`restore` needs to continue exactly."""
        save_atomic({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng_sampler": self.sampler.state(),
            "rng_torch": torch.get_rng_state(), "stopper": self.stopper.state(), "history": self.history,
            "best_eval": self.best_eval, "epoch": self.epoch, "config": _plain(self.config),
            "model_name": self.model.name, "dataset": self.fingerprint, "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds, "loss_keys": self.loss_keys, "grad_scaler": self.precision.state(),
        }, self.checkpoint_path)

    def results(self) -> dict[str, Any]:
        """The run's summary (the content of ``results.json``)."""
        best = self.best_eval
        results = {
            "model": self.model.name,
            "dataset": self.ds.name,
            "setting": self.ds.setting,
            "modalities": self.ds.modalities,
            "seed": int(self.config["seed"]),
            "best_epoch": best.get("epoch", -1),
            "epochs_run": self.epoch,
            "early_stopped": bool(self.stopper.should_stop and self.epoch < self.epochs),
            # medians: an epoch during which the process was suspended or descheduled does not move them
            "seconds_per_epoch": round(float(np.median(self.train_seconds)) if self.train_seconds else 0.0, 4),
            "seconds_per_evaluation": round(float(np.median(self.eval_seconds)) if self.eval_seconds else 0.0, 4),
            "train_seconds_total": round(float(np.sum(self.train_seconds)), 2),
            "valid_metric": self.valid_metric,
            "valid": best.get("valid", {}),
            "test": best.get("test", {}),
            "device": str(self.device),
            "config": _plain(self.config),
            "run": self.run_info,
            "dataset_fingerprint": self.fingerprint,
            "notes": list(self.notes),
        }
        for split in COLD_START_SPLITS:
            if split in best:
                results[split] = best[split]
        return results

    def write_results(self) -> dict[str, Any]:
        """Write ``results.json`` (atomically) and ``curves.png``; return the results."""
        results = self.results()
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(self.out / "results.json")
        self.write_curves(results)
        return results

    def write_curves(self, results: Mapping[str, Any] | None = None) -> Path:
        """Draw ``curves.png`` from the run's history (see :mod:`dgmrec.training.curves`)."""
        res = results if results is not None else self.results()
        stopped = "stopped early" if res["early_stopped"] else "ran to the last epoch"
        epochs = f"{res['epochs_run']} epoch" + ("" if res["epochs_run"] == 1 else "s")
        subtitle = (f"{epochs} ({stopped}), best epoch {res['best_epoch']} by validation "
                    f"{self.valid_metric}, {self.ds.n_users} users x {self.ds.n_items} items")
        return plot_curves(self.history, self.out / CURVES_NAME, title=f"{self.model.name} on {self.ds.name}",
                           subtitle=subtitle, valid_metric=self.valid_metric, best_epoch=int(res["best_epoch"]),
                           loss_keys=self.loss_keys or ["loss"], patience_from=self.first_counting_epoch())

    def first_counting_epoch(self) -> int | None:
        """The first epoch of the history whose evaluation used up patience (None: none did)."""
        fitting = self.bpr_below <= 0
        for e in self.history:
            fitting = fitting or e.get("bpr", 0.0) < self.bpr_below
            if fitting and (e["epoch"] + 1) * self.sampler.n_batches(self.batch_size) >= self.min_steps:
                return int(e["epoch"])
        return None

    def _save_per_user(self, per_split: dict[str, dict[str, np.ndarray]]) -> None:
        for split, vectors in per_split.items():
            users = self.evaluator.splits[split].users
            cols = ["user", *vectors]
            rows = np.column_stack([users, *[vectors[c] for c in vectors]])
            tmp = self.out / f".per_user_{split}.csv.tmp"
            fmt = ["%d"] + ["%.6f"] * len(vectors)
            np.savetxt(tmp, rows, delimiter=",", header=",".join(cols), comments="", fmt=fmt)
            tmp.replace(self.out / f"per_user_{split}.csv")


RUN_FILES = ("config.yaml", "log.jsonl", "checkpoint.pt", "best.pt", "results.json", CURVES_NAME, "retrieval.json")


def holds_run(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a run (its ``results.json`` or ``checkpoint.pt``)."""
    out = Path(out_dir)
    return (out / "results.json").is_file() or (out / "checkpoint.pt").is_file()


def clear_run(out_dir: str | Path) -> None:
    """Remove the files a run writes (:data:`RUN_FILES`, ``per_user_*.csv``) from ``out_dir``; nothing else."""
    out = Path(out_dir)
    for path in [*(out / n for n in RUN_FILES), *out.glob("per_user_*.csv")]:
        if path.is_file():
            path.unlink()


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.items())}


# keys that change how fast a run goes, not what it computes: a run may resume with other values
EXECUTION_KEYS = ("threads",)


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _plain(cfg).items() if k not in EXECUTION_KEYS}


def _progress(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", dynamic_ncols=True, leave=True)
