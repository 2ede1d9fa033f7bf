"""The Python API (the CLI is a thin layer over it).

>>> import dgmrec
>>> ds = dgmrec.load_dataset("synthetic")
>>> result = dgmrec.train("DGMRec", ds, out="runs/demo", overrides={"epochs": 5})
>>> recs = dgmrec.recommend("runs/demo", k=10)

Datasets with id maps (``user_ids.csv`` / ``item_ids.csv``) speak original ids: ``recommend`` takes and returns
them (``ids="internal"`` for the internal indices), ``generate`` writes the maps beside the features.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dgmrec.config import ConfigEntry, fit_cutoffs, resolve_config
from dgmrec.config import explain_config as _explain
from dgmrec.data.dataset import RecDataset
from dgmrec.data.mmrec import ITEM_IDS_NAME, read_id_map, write_mmrec
from dgmrec.data.spec import SYNTHETIC, DatasetSpec
from dgmrec.errors import DataError, InputError
from dgmrec.models import build_model, canonical_name
from dgmrec.models.base import Recommender
from dgmrec.training import distributed
from dgmrec.training.checkpoint import check_fingerprint, load_checkpoint
from dgmrec.training.precision import set_threads
from dgmrec.training.trainer import Trainer, clear_run, holds_run, resolve_device, seed_everything

__all__ = ["SYNTHETIC", "AddedItems", "ConfigView", "DatasetSpec", "LoadedRun", "add_items", "content_features",
           "explain_config", "generate", "load_dataset", "load_run", "recommend", "retrieval", "train"]


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
    overwrite: bool = False,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train ``model`` and write the run directory; returns the content of ``results.json``.

    ``data`` is a loaded dataset (recorded as :meth:`DatasetSpec.of_dataset`), a spec, or a folder /
    ``"synthetic"`` with the dataset options. ``resume`` continues the run in ``out`` (an error if it has no
    checkpoint). A directory that already holds a run (``results.json`` or ``checkpoint.pt``) is an error
    unless ``resume`` or ``overwrite``; ``overwrite`` removes that run's files (once the configuration has
    been checked) and trains afresh. ``stop`` is asked after every epoch; True ends the run there with
    :class:`dgmrec.training.trainer.TrainingStopped` (checkpoint kept, resumable). In a process started by ``torchrun``
    it trains data-parallel with the other processes (:mod:`dgmrec.training.distributed`, ``docs/distributed.md``).
    """
    if resume and overwrite:
        raise InputError("use --resume or --overwrite, not both", source="--out")
    if holds_run(out) and not (resume or overwrite):
        raise InputError(f"{out} already holds a run; use --resume or --overwrite", source="--out")
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
        if overwrite and os.environ.get("RANK", "0") == "0":  # one process clears the old run
            clear_run(out)
        trainer_class = distributed.DistributedTrainer if distributed.active() else Trainer
        trainer = trainer_class(net, ds, cfg, out, spec=spec.resolved(),
                                run_info={"config_layers": layers, "model": name}, progress=progress)
        return trainer.fit(resume=resume, stop=stop).results


@dataclass
class ConfigView:
    """What ``dgmrec config show`` prints: the resolved keys of ``model`` on ``dataset`` and notes."""

    model: str
    dataset: str
    layers: list[str]
    entries: list[ConfigEntry]
    notes: list[str]


def dataset_name(data: str | Path) -> tuple[str, RecDataset | None]:
    """The name that selects shipped configurations for ``data``, and the dataset when ``data`` is one: a
    folder (its ``.inter`` stem), ``synthetic``, or the name of a dataset with shipped configurations."""
    text = str(data)
    if text.startswith("synthetic") or Path(text).is_dir():
        ds = DatasetSpec(text).load()
        return ds.name, ds
    from dgmrec.config import shipped_dataset_names

    names = shipped_dataset_names()
    if text in names:
        return text, None
    raise DataError(f"not a dataset folder, synthetic, or a dataset with shipped configurations "
                    f"({', '.join(names)})", source="--data")


def explain_config(model: str, data: str | Path | None = None, *, config_file: str | Path | None = None,
                   overrides: Mapping[str, Any] | None = None, use_best: bool = True) -> ConfigView:
    """Every configuration key of ``model`` (on ``data``, see :func:`dataset_name`) with its value, layer and
    meaning; with a dataset at hand, the cut-offs its catalogue cannot measure are noted
    (:func:`dgmrec.config.fit_cutoffs`)."""
    name = canonical_name(model)
    dataset, ds = dataset_name(data) if data is not None else ("", None)
    entries = _explain(name, dataset, file=config_file, overrides=overrides, use_best=use_best)
    _, layers = resolve_config(name, dataset, file=config_file, overrides=overrides, use_best=use_best)
    notes: list[str] = []
    if ds is not None:
        _, notes = fit_cutoffs({e.key: e.value for e in entries}, ds.n_items)
    return ConfigView(model=name, dataset=dataset, layers=layers, entries=entries, notes=notes)


@dataclass
class LoadedRun:
    """A trained run: its model (best checkpoint), dataset (rebuilt from ``spec``) and configuration."""

    model: Recommender
    dataset: RecDataset
    config: dict[str, Any]
    run: dict[str, Any]
    spec: DatasetSpec
    run_dir: Path | None = None
    added_ids: list[str] = field(default_factory=list)  # items added after training (add_items), in order


def load_run(run_dir: str | Path, device: str | None = "cpu",
             data: DatasetSpec | str | Path | None = None, added_items: str | Path | None = None) -> LoadedRun:
    """Rebuild the dataset of a run from its recorded spec and load its best checkpoint (``weights_only=True``).

    ``data`` replaces the recorded dataset: a whole spec, or a folder that takes the place of the recorded one
    (with the recorded modalities, mask and setting). Runs written before specs were recorded are read too.
    Items added after training (:func:`add_items`) are added again, from ``RUN_DIR/added_items`` or from the
    record folder ``added_items``.
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
    loaded = LoadedRun(model=model, dataset=ds, config=cfg, run=run, spec=spec, run_dir=run_dir)
    return _reapply_added(loaded, Path(added_items) if added_items is not None else run_dir / ADDED_ITEMS_DIR)


def recommend(run: str | Path | LoadedRun, k: int = 10, users: Sequence[str | int] | None = None,
              exclude: str = "seen", device: str | None = "cpu", ids: str = "raw") -> pd.DataFrame:
    """Top-``k`` recommendations as a table ``user, rank, item, score``.

    ``ids="raw"`` (default): where the dataset has id maps (``user_ids.csv`` / ``item_ids.csv``), ``users`` are
    original user ids and the ``user`` and ``item`` columns hold original ids; ``ids="internal"``: internal
    indices in and out. An unknown user is a :class:`DataError` naming it. ``exclude="train"`` masks the user's
    training items only (the evaluation protocol); ``"seen"`` masks every item of the user in any split;
    excluded items are never listed (a user with fewer than ``k`` other items gets fewer rows).
    """
    from dgmrec.evaluation.protocol import rank_items

    if ids not in ("raw", "internal"):
        raise InputError(f"unknown ids {ids!r}; use raw or internal", source="ids")
    lr = run if isinstance(run, LoadedRun) else load_run(run, device)
    ds = lr.dataset
    raw = ids == "raw"
    if k < 1:
        raise InputError("k must be at least 1", source="--k")
    if users is None:
        users_arr = np.arange(ds.n_users)
    else:
        wanted = list(users)
        if not wanted:
            raise InputError("no users given", source="--users")
        users_arr = ds.user_index(wanted, source="--users", original=raw)
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
    user_col = np.repeat(users_arr, kk)
    item_col = top.ravel()
    rank_col = np.tile(np.arange(1, kk + 1), len(users_arr))
    keep = np.ones(len(item_col), dtype=bool)
    if mask is not None:  # a k beyond the user's unseen items reaches the excluded ones: leave them out
        keep = ~(np.asarray(mask[user_col, item_col]).ravel() > 0)
    return pd.DataFrame({
        "user": (ds.user_labels(user_col) if raw else user_col)[keep],
        "rank": rank_col[keep],
        "item": (ds.item_labels(item_col) if raw else item_col)[keep],
        "score": scores.ravel()[keep],
    })


def generate(run: str | Path | LoadedRun, out: str | Path, device: str | None = "cpu") -> Path:
    """Write every modality's completed feature matrix (generated rows for missing items), the mask and, when
    the dataset has them, the id maps (an MMRec folder)."""
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
    if truth is not None:
        true_features = load_truth(truth, ds.modalities, ds.n_items)
        order = _truth_order(Path(truth), ds)
        if order is not None:
            true_features = {m: x[order] for m, x in true_features.items()}
    else:
        true_features = {m: np.asarray(ds.features[m]) for m in ds.modalities}
    res = cross_modal_retrieval({m: v.detach().cpu().numpy() for m, v in gen.items()}, ds.observed,
                                ds.modalities, true_features, nn_k=nn_k, similarity=similarity,
                                strategies=IMPUTATIONS, train=ds.train_matrix(), reference_items=reference_items(ds),
                                imputation_steps=int(lr.config.get("imputation_steps", 5)),
                                scaling=str(lr.config.get("feature_scaling", "none")))
    res["missing_items"] = {m: ds.item_labels(np.flatnonzero(~ds.observed[:, j])).tolist()
                            for j, m in enumerate(ds.modalities)}
    return res


def _truth_order(folder: Path, ds: RecDataset) -> np.ndarray | None:
    """Rows of the truth folder in the order of the run's items, when both carry item id maps (None: as is)."""
    truth_ids = read_id_map(folder / ITEM_IDS_NAME, "itemID")
    if truth_ids is None or ds.item_ids is None:
        return None
    if sorted(truth_ids) != sorted(ds.item_ids):
        raise DataError("its items are not the run's items (item_ids.csv differs)", source=str(folder))
    position = {v: i for i, v in enumerate(truth_ids)}
    return np.asarray([position[v] for v in ds.item_ids], dtype=np.int64)


# ---------------------------------------------------------------------------------- items added to a trained run
ADDED_ITEMS_DIR = "added_items"


@dataclass
class AddedItems:
    """What :func:`add_items` did: the run with the items added, their item indices and ids, the record folder."""

    run: LoadedRun
    items: np.ndarray  # indices of the added items in the run's item range (recommend's ``item`` column)
    ids: list[str]
    folder: Path | None


def add_items(run: str | Path | LoadedRun, features: Mapping[str, np.ndarray],
              item_ids: Sequence[str] | None = None, out: str | Path | None = None,
              device: str | None = "cpu") -> AddedItems:
    """Add items to a trained run without retraining: they become recommendable at once.

    ``features`` maps modality names to ``(n, d_m)`` matrices of the new items, in the stored (unscaled) space
    of the run's dataset; a NaN row, or a modality left out, is unobserved. The model generates what the items
    lack (their collaborative representation from their content, see ``docs/dgmrec.md``, "Cold start"; DGMRec
    also their missing modalities). The items get the indices ``n_items, n_items + 1, ...`` of the run and the
    ids ``item_ids`` (default: those indices as strings).

    The additions are recorded, cumulatively, in ``out`` (default ``RUN_DIR/added_items``: ``<modality>.npy``
    with NaN rows where unobserved, ``observed.npy``, ``ids.txt``, ``generated_<modality>.npy`` for models that
    generate features) and :func:`load_run` adds them again; the checkpoint is never modified.
    """
    lr = run if isinstance(run, LoadedRun) else load_run(run, device)
    ds = lr.dataset
    raw, observed = _check_added_features(ds, features)
    n = len(observed)
    start = ds.n_items
    ids = [str(start + i) for i in range(n)] if item_ids is None else [str(i) for i in item_ids]
    if len(ids) != n:
        raise InputError(f"{len(ids)} ids for {n} items", source="item_ids")
    taken = set(lr.added_ids) | (set(map(str, ds.item_ids)) if ds.item_ids is not None else set())
    dup = next((i for k, i in enumerate(ids) if i in taken or i in ids[:k] or not i.strip()), None)
    if dup is not None:
        raise InputError(f"item id {dup!r} is empty or already used", source="item_ids")
    folder = Path(out) if out is not None else (lr.run_dir / ADDED_ITEMS_DIR if lr.run_dir is not None else None)
    if folder is None:
        raise InputError("this loaded run has no run directory; pass out= to record the added items", source="out")
    _apply_added(lr, raw, observed, ids)
    _record_added(lr, folder)
    return AddedItems(run=lr, items=np.arange(start, start + n), ids=ids, folder=folder)


def content_features(run: str | Path | LoadedRun, contents: Sequence[Mapping[str, str | bytes | None]],
                     device: str | None = "cpu", *, field: str = "contents[{k}].{m}") -> dict[str, np.ndarray]:
    """Feature rows of items given by their raw content, encoded as the run's dataset folder was built.

    ``contents`` holds one mapping per item, modality -> content: a text for a modality built from texts, the
    bytes of a file (or their base64 text, also as a ``data:...;base64,`` URL) for one built from files (images,
    ...); None, or a modality left out, is no content. The run's dataset folder must record how its features
    were built (``dgmrec dataset build`` and ``dgmrec features`` write it into ``missing_content.json``; folders of
    precomputed features have no such record) and the ``features`` extra must be installed for the encoders that
    need it. Each content goes through the build's own source, decoding and encoder
    (:func:`dgmrec.features.encode_given`); the encoders are loaded once per process.

    Returns modality -> ``(n, d_m)`` float32 in the stored feature space (what :func:`add_items` takes), NaN rows
    for items without content, for the modalities some item has content for. Each error is an :class:`InputError`
    naming the content at fault: ``field`` formatted with the item's position ``k`` and the modality ``m``. The
    encoders run on the model's device.
    """
    from dgmrec.features.given import built_modalities, encode_given

    lr = run if isinstance(run, LoadedRun) else load_run(run, device)
    ds = lr.dataset
    folder = None if lr.spec.synthetic else Path(lr.spec.data)
    built = built_modalities(folder) if folder is not None else {}
    wanted: dict[str, list[str | bytes | None]] = {}
    for k, item in enumerate(contents):
        for m, value in item.items():
            where = field.format(k=k, m=m)
            if m not in ds.features:
                raise InputError(f"unknown modality {m!r}; the run has: {', '.join(ds.modalities)}", source=where)
            if value is None:
                continue
            record = built.get(m)
            if record is None:
                raise InputError(f"the run's dataset ({lr.spec.data}) does not record how its '{m}' features were "
                                 "built (only `dgmrec dataset build` / `dgmrec features` folders do); send the "
                                 "feature vector instead", source=where)
            if record.dim != ds.features[m].shape[1]:
                raise InputError(f"the dataset records a {record.dim}-d encoder for '{m}', the run's features have "
                                 f"{ds.features[m].shape[1]} values", source=where)
            try:
                wanted.setdefault(m, [None] * len(contents))[k] = value if record.takes_text else _file_bytes(value)
            except InputError as exc:
                raise InputError(str(exc), source=where) from None
    return {m: encode_given(built[m], values, [field.format(k=k, m=m) for k in range(len(contents))],
                            device=str(lr.model.device)) for m, values in wanted.items()}


def _file_bytes(value: str | bytes) -> bytes:
    """A file's bytes, given as bytes or as base64 text (optionally a ``data:<type>;base64,`` URL)."""
    import base64
    import binascii

    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise InputError(f"expected the file's bytes or their base64 text, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and ";base64," in text:
        text = text.split(";base64,", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"not valid base64 ({exc})") from None


def _check_added_features(ds: RecDataset, features: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                                      np.ndarray]:
    """Every modality's ``(n, d_m)`` float32 matrix (NaN rows where unobserved) and the observed mask."""
    if not isinstance(features, Mapping) or not features:
        raise InputError("no features given: pass a mapping modality -> (n, d) matrix", source="features")
    unknown = [m for m in features if m not in ds.features]
    if unknown:
        raise InputError(f"unknown modality {unknown[0]!r}; the run has: {', '.join(ds.modalities)}",
                         source="features")
    arrays: dict[str, np.ndarray] = {}
    for m, x in features.items():
        try:
            a = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(f"modality '{m}' is not a numeric matrix", source="features") from None
        width = ds.features[m].shape[1]
        if a.ndim != 2 or a.shape[1] != width:
            raise InputError(f"modality '{m}' has shape {a.shape}, expected (n, {width})", source="features")
        if np.isinf(a).any():
            raise InputError(f"modality '{m}' has infinite values", source="features")
        partial = np.isnan(a).any(axis=1) & ~np.isnan(a).all(axis=1)
        if partial.any():
            raise InputError(f"row {int(np.flatnonzero(partial)[0])} of modality '{m}' is partly NaN (a row is "
                             f"either observed, all finite, or unobserved, all NaN)", source="features")
        arrays[m] = a
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise InputError(f"the modalities have different or zero numbers of rows: {sorted(sizes)}", source="features")
    n = sizes.pop()
    raw = {m: arrays.get(m, np.full((n, ds.features[m].shape[1]), np.nan, dtype=np.float32)) for m in ds.modalities}
    observed = np.stack([~np.isnan(raw[m]).all(axis=1) for m in ds.modalities], axis=1)
    return raw, observed


def _base_scaler(lr: LoadedRun) -> tuple[Any, np.ndarray]:
    """The run's feature scaler, fitted on the trained items only, and those items' reference mask."""
    from dgmrec.data.impute import FeatureOptions
    from dgmrec.data.scaling import FeatureScaler

    ds = lr.dataset
    base = ds.n_items - len(lr.added_ids)
    reference = np.ones(base, dtype=bool) if ds.new_items is None else ~ds.new_items[:base]
    scaling = FeatureOptions.from_config(lr.config).scaling
    scaler = FeatureScaler.fit({m: ds.features[m][:base] for m in ds.modalities}, ds.observed[:base], scaling,
                               reference)
    return scaler, reference


def _apply_added(lr: LoadedRun, raw: Mapping[str, np.ndarray], observed: np.ndarray, ids: Sequence[str]) -> None:
    """Hand the items to the model (scaled like the run's features, unobserved rows filled with the mean observed
    row of the trained reference items) and extend the run's dataset with them."""
    ds = lr.dataset
    scaler, reference = _base_scaler(lr)
    base = len(reference)
    model_rows = {}
    for j, m in enumerate(ds.modalities):
        x = scaler.transform(m, np.nan_to_num(raw[m], nan=0.0))
        ref = ds.observed[:base, j] & reference
        fill = scaler.transform(m, ds.features[m][:base][ref]).mean(axis=0) if ref.any() else np.zeros(x.shape[1])
        model_rows[m] = torch.as_tensor(np.where(observed[:, j, None], x, fill).astype(np.float32))
    own = None
    if lr.model.needs_item_features:  # built without them (cold_start: none): the features it was built from
        from dgmrec.data.impute import FeatureOptions, prepare_features

        own = {m: torch.as_tensor(x) for m, x in prepare_features(ds, FeatureOptions.from_config(lr.config)).items()}
    lr.model.add_items(model_rows, torch.as_tensor(observed), own)
    lr.dataset = replace(
        ds, n_items=ds.n_items + len(observed),
        features={m: np.concatenate([ds.features[m], raw[m]]) for m in ds.modalities},
        observed=np.concatenate([ds.observed, observed]),
        new_items=None if ds.new_items is None else np.concatenate([ds.new_items, np.ones(len(observed), bool)]),
        item_ids=None if ds.item_ids is None else np.concatenate([ds.item_ids, np.asarray(list(ids), dtype=object)]),
        _train_csr=None)
    lr.added_ids = [*lr.added_ids, *ids]


def _record_added(lr: LoadedRun, folder: Path) -> None:
    """Write every added item of ``lr`` to ``folder`` (replaced as a whole)."""
    import shutil

    ds = lr.dataset
    n = len(lr.added_ids)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for m in ds.modalities:
        np.save(tmp / f"{m}.npy", ds.features[m][-n:])
    np.save(tmp / "observed.npy", ds.observed[-n:])
    (tmp / "ids.txt").write_text("".join(f"{i}\n" for i in lr.added_ids), encoding="utf-8")
    generated = lr.model.added_generated_features()
    if generated is not None:
        scaler, _ = _base_scaler(lr)
        for m, x in generated.items():
            np.save(tmp / f"generated_{m}.npy", scaler.inverse(m, x.detach().cpu().numpy()))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)


def _reapply_added(lr: LoadedRun, folder: Path) -> LoadedRun:
    """Add the items recorded in ``folder`` (if it exists) to a freshly loaded run."""
    if not folder.is_dir():
        return lr
    ds = lr.dataset
    try:
        ids = [line for line in (folder / "ids.txt").read_text(encoding="utf-8").splitlines() if line]
        raw = {m: np.load(folder / f"{m}.npy", allow_pickle=False) for m in ds.modalities}
        observed = np.load(folder / "observed.npy", allow_pickle=False).astype(bool)
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable record of added items ({exc})", source=str(folder)) from None
    if observed.shape != (len(ids), ds.n_modalities) or any(len(x) != len(ids) for x in raw.values()):
        raise DataError("the record of added items is inconsistent (ids, features and mask sizes differ)",
                        source=str(folder))
    _apply_added(lr, raw, observed, ids)
    return lr
