"""The Python API (the CLI is a thin layer over it).

>>> import dgmrec
>>> ds = dgmrec.load_dataset("synthetic")
>>> result = dgmrec.train("DGMRec", ds, out="runs/demo", overrides={"epochs": 5})
>>> recs = dgmrec.recommend("runs/demo", k=10)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dgmrec.config import resolve_config
from dgmrec.data.dataset import RecDataset
from dgmrec.data.mmrec import write_mmrec
from dgmrec.data.spec import SYNTHETIC, DatasetSpec
from dgmrec.errors import DataError, InputError
from dgmrec.models import build_model, canonical_name
from dgmrec.models.base import Recommender
from dgmrec.training import distributed
from dgmrec.training.checkpoint import check_fingerprint, load_checkpoint
from dgmrec.training.precision import set_threads
from dgmrec.training.trainer import Trainer, resolve_device, seed_everything

__all__ = ["SYNTHETIC", "DatasetSpec", "LoadedRun", "generate", "load_dataset", "load_run", "recommend", "retrieval",
           "train"]


def dataset_spec(
    data: DatasetSpec | str | Path,
    *,
    modalities: Sequence[str] | str | None = None,
    mask: str | Path | None = None,
    mask_letters: str | Mapping[str, str] | None = None,
    setting: str = "missing",
) -> DatasetSpec:
    """``data`` itself when it is a :class:`DatasetSpec` (then the options must be left out), else the spec of
    the folder or synthetic dataset ``data`` with the given options."""
    if isinstance(data, DatasetSpec):
        if modalities or mask or mask_letters or setting != "missing":
            raise InputError("pass the dataset options inside the DatasetSpec, not beside it", source="data")
        return data
    return DatasetSpec(data, modalities=modalities, mask=mask, mask_letters=mask_letters, setting=setting)


def load_dataset(
    data: DatasetSpec | str | Path,
    *,
    modalities: Sequence[str] | str | None = None,
    mask: str | Path | None = None,
    mask_letters: str | Mapping[str, str] | None = None,
    setting: str = "missing",
) -> RecDataset:
    """Load an MMRec folder, the embedded synthetic dataset (``"synthetic"`` or ``"synthetic(seed=N)"``), or
    what a :class:`DatasetSpec` describes."""
    return dataset_spec(data, modalities=modalities, mask=mask, mask_letters=mask_letters, setting=setting).load()


def train(
    model: str,
    data: RecDataset | DatasetSpec | str | Path,
    *,
    out: str | Path,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed: int | None = None,
    device: str | None = "cpu",
    resume: bool = False,
    progress: bool = True,
    modalities: Sequence[str] | str | None = None,
    mask: str | Path | None = None,
    mask_letters: str | None = None,
    setting: str = "missing",
    use_best: bool = True,
) -> dict[str, Any]:
    """Train ``model`` and write the run directory; returns the content of ``results.json``.

    ``data`` is a loaded dataset (recorded as :meth:`DatasetSpec.of_dataset`), a spec, or a folder /
    ``"synthetic"`` with the dataset options. ``resume`` continues the run in ``out`` (an error if it has no
    checkpoint). In a process started by ``torchrun`` it trains data-parallel with the other processes
    (:mod:`dgmrec.training.distributed`, ``docs/distributed.md``).
    """
    name = canonical_name(model)
    if isinstance(data, RecDataset):
        if modalities or mask or mask_letters or setting != "missing":
            raise InputError("a loaded dataset takes no dataset options; pass a DatasetSpec", source="data")
        ds, spec = data, DatasetSpec.of_dataset(data)
    else:
        spec = dataset_spec(data, modalities=modalities, mask=mask, mask_letters=mask_letters, setting=setting)
        ds = spec.load()
    over = dict(overrides or {})
    if seed is not None:
        over["seed"] = int(seed)
    cfg, layers = resolve_config(name, ds.name, file=config_file, overrides=over, use_best=use_best)
    with distributed.session(resolve_device(device)) as dev:  # under torchrun: this rank's device in the group
        set_threads(cfg)
        seed_everything(int(cfg["seed"]))
        net = build_model(name, ds, cfg, dev)
        trainer_class = distributed.DistributedTrainer if distributed.active() else Trainer
        trainer = trainer_class(net, ds, cfg, out, spec=spec.resolved(),
                                run_info={"config_layers": layers, "model": name}, progress=progress)
        return trainer.fit(resume=resume).results


@dataclass
class LoadedRun:
    """A trained run: its model (best checkpoint), dataset (rebuilt from ``spec``) and configuration."""

    model: Recommender
    dataset: RecDataset
    config: dict[str, Any]
    run: dict[str, Any]
    spec: DatasetSpec


def load_run(run_dir: str | Path, device: str | None = "cpu",
             data: DatasetSpec | str | Path | None = None) -> LoadedRun:
    """Rebuild the dataset of a run from its recorded spec and load its best checkpoint (``weights_only=True``).

    ``data`` replaces the recorded dataset: a whole spec, or a folder that takes the place of the recorded one
    (with the recorded modalities, mask and setting). Runs written before specs were recorded are read too.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError("run directory not found", source=str(run_dir))
    state = load_checkpoint(run_dir / "best.pt")
    run = dict(state.get("run", {}))
    if isinstance(data, DatasetSpec):
        spec = data
    elif "dataset_spec" in run or run.get("data"):
        spec = DatasetSpec.of_run(run)
        if data is not None:
            spec = DatasetSpec(data, modalities=spec.modalities, mask=spec.mask, mask_letters=spec.mask_letters,
                               setting=spec.setting)
    elif data is not None:
        spec = DatasetSpec(data)
    else:
        raise DataError("the checkpoint does not record its dataset; pass --data", source=str(run_dir))
    ds = spec.load()
    check_fingerprint(state["dataset"], ds, str(run_dir / "best.pt"))
    dev = resolve_device(device)
    # options added after the run was trained take their defaults
    defaults, _ = resolve_config(state["model_name"], ds.name, use_best=False)
    cfg = {**defaults, **state["config"]}
    torch.manual_seed(int(cfg.get("seed", 0)))
    model = build_model(state["model_name"], ds, cfg, dev)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise DataError(f"checkpoint does not match the model ({str(exc).splitlines()[0]})",
                        source=str(run_dir / "best.pt")) from None
    model.eval()
    return LoadedRun(model=model, dataset=ds, config=cfg, run=run, spec=spec)


def recommend(run: str | Path | LoadedRun, k: int = 10, users: Sequence[int] | None = None,
              exclude: str = "seen", device: str | None = "cpu") -> pd.DataFrame:
    """Top-``k`` recommendations as a table ``user, rank, item, score``.

    ``exclude="train"`` masks the user's training items only (the evaluation protocol); ``"seen"`` masks every
    item of the user in any split.
    """
    from dgmrec.evaluation.protocol import rank_items

    lr = run if isinstance(run, LoadedRun) else load_run(run, device)
    ds = lr.dataset
    if k < 1:
        raise InputError("k must be at least 1", source="--k")
    if users is None:
        users_arr = np.arange(ds.n_users)
    else:
        users_arr = np.asarray(list(users), dtype=np.int64)
        bad = users_arr[(users_arr < 0) | (users_arr >= ds.n_users)]
        if len(bad):
            raise DataError(f"user id {bad[0]} out of range 0..{ds.n_users - 1}", source="--users")
    if exclude == "train":
        mask = ds.train_matrix()
    elif exclude == "seen":
        import scipy.sparse as sp

        pairs = np.concatenate([ds.train, ds.valid, ds.test])
        mask = sp.csr_matrix((np.ones(len(pairs), dtype=np.float32), (pairs[:, 0], pairs[:, 1])),
                             shape=(ds.n_users, ds.n_items))
    elif exclude == "none":
        mask = None
    else:
        raise InputError(f"unknown --exclude {exclude!r}; use train, seen or none", source="--exclude")
    model = lr.model
    with torch.no_grad():
        model.prepare_eval()
        top, scores = rank_items(model.score_users, users_arr, mask, min(k, ds.n_items),
                                 int(lr.config.get("eval_batch_size", 4096)), model.device, n_items=ds.n_items)
    kk = top.shape[1]
    return pd.DataFrame({
        "user": np.repeat(users_arr, kk),
        "rank": np.tile(np.arange(1, kk + 1), len(users_arr)),
        "item": top.ravel(),
        "score": scores.ravel(),
    })


def generate(run: str | Path | LoadedRun, out: str | Path, device: str | None = "cpu") -> Path:
    """Write every modality's completed feature matrix (generated rows for missing items) and the mask."""
    lr = run if isinstance(run, LoadedRun) else load_run(run, device)
    completed = lr.model.completed_features()
    if completed is None:
        raise InputError(f"model {lr.model.name} does not generate features; train DGMRec", source="--run")
    ds = lr.dataset
    feats: dict[str, np.ndarray] = {}
    for j, m in enumerate(ds.modalities):
        x = np.array(ds.features[m], dtype=np.float32, copy=True)
        miss = ~ds.observed[:, j]
        x[miss] = completed[m].detach().cpu().numpy()[miss]
        feats[m] = x
    return write_mmrec(ds, out, features=feats)


def retrieval(run: str | Path | LoadedRun, truth: str | Path | None = None, *, nn_k: int = 10,
              similarity: str = "cosine", device: str | None = "cpu") -> dict[str, Any]:
    """Cross-modal retrieval of a run's generated features (see :mod:`dgmrec.experiments.retrieval`).

    ``truth`` is a folder of true ``<modality>_feat.npy`` files; by default the run's own dataset, whose masked
    rows still hold their features.
    """
    from dgmrec.experiments.retrieval import SIMILARITIES, cross_modal_retrieval, load_truth

    if similarity not in SIMILARITIES:
        raise InputError(f"must be one of {', '.join(SIMILARITIES)}, got {similarity!r}", source="--similarity")
    lr = run if isinstance(run, LoadedRun) else load_run(run, device)
    gen = lr.model.generate_for_retrieval()
    if gen is None:
        raise InputError(f"model {lr.model.name} does not generate features", source="--run")
    ds = lr.dataset
    true_features = (load_truth(truth, ds.modalities, ds.n_items) if truth is not None
                     else {m: np.asarray(ds.features[m]) for m in ds.modalities})
    return cross_modal_retrieval({m: v.detach().cpu().numpy() for m, v in gen.items()}, ds.observed,
                                 ds.modalities, true_features, nn_k=nn_k, similarity=similarity)
