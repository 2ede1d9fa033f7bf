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
from dgmrec.data.masks import parse_letters
from dgmrec.data.mmrec import load_mmrec, write_mmrec
from dgmrec.data.synthetic import make_synthetic
from dgmrec.errors import DataError, InputError
from dgmrec.models import canonical_name
from dgmrec.models.base import Recommender
from dgmrec.training.checkpoint import check_fingerprint, load_checkpoint
from dgmrec.training.trainer import Trainer, build_model, resolve_device

SYNTHETIC = "synthetic"


def load_dataset(
    data: str | Path,
    *,
    modalities: Sequence[str] | str | None = None,
    mask: str | Path | None = None,
    mask_letters: str | Mapping[str, str] | None = None,
    setting: str = "missing",
) -> RecDataset:
    """Load an MMRec folder, or the embedded synthetic dataset when ``data == "synthetic"``."""
    if isinstance(modalities, str):
        modalities = [m.strip() for m in modalities.split(",") if m.strip()]
    letters = mask_letters if isinstance(mask_letters, Mapping) or mask_letters is None else parse_letters(
        mask_letters)
    if str(data) == SYNTHETIC or str(data).startswith(SYNTHETIC + "(seed="):
        seed = int(str(data)[len(SYNTHETIC) + 6:-1]) if str(data) != SYNTHETIC else 0
        ds = make_synthetic(seed=seed)
        if modalities:
            ds = ds.select_modalities(list(modalities))
        if mask is not None:
            raise DataError("the synthetic dataset carries its own mask", source="--mask")
        if setting == "new-items":
            from dgmrec.data.masks import draw_new_items
            from dgmrec.data.mmrec import make_new_item_split

            counts = np.bincount(ds.train[:, 1], minlength=ds.n_items)
            ds = make_new_item_split(ds, draw_new_items(counts))
        elif setting != "missing":
            raise DataError(f"unknown setting {setting!r}; use missing or new-items", source="--setting")
        return ds
    return load_mmrec(data, modalities=modalities, mask=mask, mask_letters=letters, setting=setting)


def _run_info(data: str | Path, modalities: Sequence[str] | None, mask: str | Path | None,
              mask_letters: Any, setting: str) -> dict[str, Any]:
    return {
        "data": str(data) if str(data).startswith(SYNTHETIC) else str(Path(data).resolve()),
        "modalities": list(modalities) if modalities else [],
        "mask": str(Path(mask).resolve()) if mask else "",
        "mask_letters": mask_letters if isinstance(mask_letters, str) else "",
        "setting": setting,
    }


def train(
    model: str,
    data: RecDataset | str | Path,
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
    """Train ``model`` and write the run directory; returns the content of ``results.json``."""
    name = canonical_name(model)
    if isinstance(modalities, str):
        modalities = [m.strip() for m in modalities.split(",") if m.strip()]
    if isinstance(data, RecDataset):
        ds, info = data, {"data": data.source, "modalities": data.modalities, "mask": "", "mask_letters": "",
                          "setting": data.setting}
    else:
        ds = load_dataset(data, modalities=modalities, mask=mask, mask_letters=mask_letters, setting=setting)
        info = _run_info(data, modalities, mask, mask_letters, setting)
    over = dict(overrides or {})
    if seed is not None:
        over["seed"] = int(seed)
    cfg, layers = resolve_config(name, ds.name, file=config_file, overrides=over, use_best=use_best)
    info["config_layers"] = layers
    info["model"] = name
    trainer = Trainer(name, ds, cfg, out, device=device, run_info=info, progress=progress)
    return trainer.fit(resume=resume).results


@dataclass
class LoadedRun:
    """A trained run: its model (best checkpoint), dataset and configuration."""

    model: Recommender
    dataset: RecDataset
    config: dict[str, Any]
    run: dict[str, Any]


def load_run(run_dir: str | Path, device: str | None = "cpu", data: str | Path | None = None) -> LoadedRun:
    """Rebuild the dataset of a run and load its best checkpoint (``weights_only=True``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError("run directory not found", source=str(run_dir))
    state = load_checkpoint(run_dir / "best.pt")
    run = dict(state.get("run", {}))
    source = data if data is not None else run.get("data")
    if not source:
        raise DataError("the checkpoint does not record its dataset; pass --data", source=str(run_dir))
    ds = load_dataset(source, modalities=run.get("modalities") or None, mask=run.get("mask") or None,
                      mask_letters=run.get("mask_letters") or None, setting=run.get("setting", "missing"))
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
    return LoadedRun(model=model, dataset=ds, config=cfg, run=run)


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
                                 int(lr.config.get("eval_batch_size", 4096)), model.device)
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
    from dgmrec.data.impute import fit_scaler

    scaler = fit_scaler(ds, str(lr.config.get("feature_scaling", "none")))  # generated rows: the model's space
    feats: dict[str, np.ndarray] = {}
    for j, m in enumerate(ds.modalities):
        x = np.array(ds.features[m], dtype=np.float32, copy=True)
        miss = ~ds.observed[:, j]
        x[miss] = scaler.inverse(m, completed[m].detach().cpu().numpy()[miss])
        feats[m] = x
    return write_mmrec(ds, out, features=feats)


def retrieval(run: str | Path | LoadedRun, truth: str | Path | None = None, *, nn_k: int = 10,
              similarity: str = "cosine", device: str | None = "cpu") -> dict[str, Any]:
    """Cross-modal retrieval of a run's generated features (see :mod:`dgmrec.experiments.retrieval`).

    ``truth`` is a folder of true ``<modality>_feat.npy`` files; by default the run's own dataset, whose masked
    rows still hold their features.
    """
    from dgmrec.data.impute import IMPUTATIONS, reference_items
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
                                 ds.modalities, true_features, nn_k=nn_k, similarity=similarity,
                                 strategies=IMPUTATIONS, train=ds.train_matrix(), reference_items=reference_items(ds),
                                 imputation_steps=int(lr.config.get("imputation_steps", 5)),
                                 scaling=str(lr.config.get("feature_scaling", "none")))
