"""Studies: the grid of runs behind a table or figure, its store, and the runner that fills the store.

A study is a small YAML file (see ``docs/studies.md``): datasets, models, seeds, named configuration variants,
the analyses to produce and the store folder. :func:`plan_study` expands it into *cells* (dataset, setting,
model, variant, seed and, for sweeps, a parameter value), each pointing to a *run* keyed by a hash of what
determines its result: the resolved configuration, a content fingerprint of the dataset and mask, and the code
version (:data:`RESULTS_VERSION`, bumped whenever a change makes earlier results incomparable). Cells with the
same key share one run. :func:`run_study` trains whatever the store lacks, through :func:`dgmrec.api.train`,
then computes the post-training analyses that need the model (by missing level, retrieval, disentanglement)
and writes the run record last, atomically: a run with a record is never trained again, and an interrupted
study resumes (a half-trained run continues from its checkpoint).

Several processes, on one machine or on several machines sharing the store, may run one study at once: a run
is claimed by creating ``locks/<key>.lock`` with ``O_CREAT | O_EXCL``; the holder refreshes the lock's time
while it works; a lock is stale when its process is gone (same host) or it has not been refreshed for
``stale_lock_seconds``, and a stale lock is taken over.

Store layout::

    runs/<Model>/<key>/   the run directory of dgmrec.api.train (results.json, log.jsonl, per_user_<split>.csv,
                          config.yaml, best.pt) + post-training analysis files + run.json (the record)
    locks/<key>.lock      claims of runs in progress
    masks/, data/         masks of the missing-ratio sweep and materialised synthetic datasets
    plans/<study>.json    the study's cells and dataset fingerprints (what ``study report`` reads)
    rebuild/<key>/        a stored run trained again for the checkpoint a new post-training analysis needs
                          (checkpoints are not kept with the records); removed once the checkpoint is in place
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dgmrec.errors import ConfigError, DataError

RESULTS_VERSION = 1
"""Bump when a change to training or evaluation makes stored results incomparable with new ones."""

SYNTHETIC = "synthetic"
SETTINGS = ("missing", "new-items")
DEFAULT_METRICS = ["recall@20", "recall@50", "ndcg@20", "ndcg@50"]

# the paper's ablation variants (spec 7.6 item 5) as DGMRec configuration overrides
ABLATIONS: dict[str, dict[str, Any]] = {
    "w/o Disentangle": {"sampler": 0.0, "interModal": 0.0},
    "w/o CLUB": {"sampler": 0.0},
    "w/o InfoNCE": {"interModal": 0.0},
    # no generation (missing rows keep their imputed values), no graph refresh, no generation or reconstruction loss
    "w/o Generation": {"write_policy": "none", "avg_lambda": 0.0, "additive": 0.0, "recon": 0.0},
    "w/o Recon": {"recon": 0.0},
    "w/o Gen": {"additive": 0.0},
    "w/o Alignment": {"intraModal": 0.0, "alignBM": 0.0},
    "w/o UI-align": {"intraModal": 0.0},
    "w/o BM-align": {"alignBM": 0.0},
}
# the paper's sensitivity knobs (spec 3 and 7.6 item 8): lambda1 = w_club = w_inter, lambda2 = w_intra = w_bm,
# alpha = the weight of rebuilt rows when refreshing the graphs
SENSITIVITY_KEYS: dict[str, tuple[str, ...]] = {
    "lambda1": ("sampler", "interModal"),
    "lambda2": ("intraModal", "alignBM"),
    "alpha": ("avg_lambda",),
}
SENSITIVITY_GRID: dict[str, list[float]] = {
    "lambda1": [1.0, 0.1, 0.01, 0.001],
    "lambda2": [1.0, 0.1, 0.01, 0.001],
    "alpha": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
}

# analysis kind -> option -> default (None: "all of the study's"); options are type-checked against these
_LIST = "list"
_ANALYSES: dict[str, dict[str, Any]] = {
    "overall": {"metrics": DEFAULT_METRICS, "split": "test", "focus": "", "datasets": _LIST, "models": _LIST,
                "variants": _LIST},
    "by_missing_level": {"k": [20], "datasets": _LIST, "models": _LIST, "variants": _LIST},
    "cold_start": {"metrics": ["recall@20"], "datasets": _LIST, "models": _LIST, "variants": _LIST},
    "missing_ratio": {"dataset": "", "setting": "missing", "ratios": [0.0, 0.2, 0.4, 0.6, 0.8],
                      "mask_seed": 1225, "new_item_seed": 1111, "models": _LIST, "seed": -1, "variant": "",
                      "metrics": ["recall@20", "ndcg@20"], "focus": "DGMRec"},
    "ablation": {"model": "DGMRec", "datasets": _LIST, "variants": list(ABLATIONS), "seeds": _LIST, "base": "",
                 "metrics": ["recall@20", "ndcg@20"]},
    "sensitivity": {"model": "DGMRec", "datasets": _LIST, "params": SENSITIVITY_GRID, "seeds": _LIST, "base": "",
                    "metrics": ["recall@20", "ndcg@20"]},
    "retrieval": {"models": ["DGMRec"], "datasets": _LIST, "variants": _LIST, "nn_k": 10, "similarity": "cosine"},
    "disentanglement": {"models": ["DGMRec"], "datasets": _LIST, "variants": _LIST, "items": 500, "seed": 0},
    "cost": {"models": _LIST, "datasets": _LIST, "variants": _LIST},
}
# analyses computed after training from the model (they need the dataset); the others read the run records
POST_ANALYSES = ("by_missing_level", "retrieval", "disentanglement")

_TOP_KEYS = {"name", "description", "store", "report", "datasets", "models", "seeds", "variants", "overrides",
             "analyses", "device", "tuning", "keep_resume_checkpoint", "stale_lock_seconds"}
_DATASET_KEYS = {"data", "seed", "modalities", "mask", "mask_letters", "setting"}
_TUNING_KEYS = {"model", "dataset", "setting", "seed", "variant", "trials", "metric", "space", "sampler_seed",
                "pruner", "output", "name"}


# ================================================================================================ spec
@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a study, with the field names of :class:`dgmrec.data.spec.DatasetSpec`.

    ``data`` is an MMRec folder (absolute, resolved against the study file) or ``synthetic``; ``seed`` seeds the
    synthetic dataset; ``settings`` lists the settings the study trains it in.
    """

    label: str
    data: str
    seed: int = 0
    modalities: tuple[str, ...] = ()
    mask: str = ""
    mask_letters: str = ""
    settings: tuple[str, ...] = ("missing",)

    @property
    def synthetic(self) -> bool:
        return self.data == SYNTHETIC

    def source(self) -> str:
        """What :func:`dgmrec.api.train` takes as ``data``."""
        return f"{SYNTHETIC}(seed={self.seed})" if self.synthetic else self.data


@dataclass(frozen=True)
class Variant:
    """Named configuration overrides; ``models`` limits the models it applies to (empty: all)."""

    name: str
    overrides: Mapping[str, Any]
    models: tuple[str, ...] = ()

    def applies(self, model: str) -> bool:
        return not self.models or model in self.models


@dataclass(frozen=True)
class Analysis:
    kind: str
    options: Mapping[str, Any]
    index: int

    @property
    def label(self) -> str:
        return f"{self.kind}_{self.index}"

    def get(self, key: str) -> Any:
        return self.options[key]


@dataclass
class Study:
    """A validated study file (see :func:`load_study`)."""

    path: Path
    name: str
    store: Path
    report: Path
    datasets: dict[str, DatasetEntry]
    models: list[str]
    seeds: list[int]
    variants: dict[str, Variant]
    overrides: dict[str, Any]
    analyses: list[Analysis]
    device: str = "cpu"
    tuning: dict[str, Any] | None = None
    description: str = ""
    keep_resume_checkpoint: bool = False
    stale_lock_seconds: float = 600.0

    @property
    def plan_path(self) -> Path:
        return self.store / "plans" / f"{self.name}.json"


def _fail(message: str, where: str) -> ConfigError:
    return ConfigError(message, source=where)


def _check_keys(mapping: Any, allowed: Iterable[str], where: str) -> dict[str, Any]:
    if not isinstance(mapping, Mapping):
        raise _fail(f"must be a mapping, got {type(mapping).__name__}", where)
    allowed = set(allowed)
    for key in mapping:
        if key not in allowed:
            raise _fail(f"unknown key '{key}' (known: {', '.join(sorted(allowed))})", where)
    return dict(mapping)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(f"must be a mapping of key: value, got {value!r}", where)
    return {str(k): v for k, v in value.items()}


def _str_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(f"must be a list of names, got {value!r}", where)
    return list(value)


def _int_list(value: Any, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise _fail(f"must be a non-empty list of integers, got {value!r}", where)
    return list(value)


def _resolve_path(value: Any, base: Path, where: str) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str):
        raise _fail(f"must be a path, got {value!r}", where)
    p = Path(value).expanduser()
    return str((p if p.is_absolute() else base / p).resolve())


def _dataset_entry(label: str, raw: Any, base: Path, where: str) -> DatasetEntry:
    d = _check_keys(raw, _DATASET_KEYS, where)
    if "data" not in d:
        raise _fail("missing key 'data' (an MMRec folder or 'synthetic')", where)
    data = d["data"]
    if not isinstance(data, str) or not data:
        raise _fail(f"key 'data' must be a folder or 'synthetic', got {data!r}", where)
    seed = d.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(f"key 'seed' must be an integer, got {seed!r}", where)
    from dgmrec.data.spec import synthetic_form

    try:  # ``synthetic(seed=N)`` as on the command line
        synthetic, written = synthetic_form(data)
    except DataError:
        raise _fail(f"expected a folder, synthetic or synthetic(seed=N) with an integer N >= 0, got {data!r}",
                    f"{where}.data") from None
    if written is not None:
        if "seed" in d and seed != written:
            raise _fail(f"key 'seed' ({seed}) contradicts data {data!r}", where)
        data, seed = SYNTHETIC, written
    settings = d.get("setting", "missing")
    settings_list = [settings] if isinstance(settings, str) else settings
    if not isinstance(settings_list, list) or not settings_list or any(s not in SETTINGS for s in settings_list):
        raise _fail(f"key 'setting' must be one of {', '.join(SETTINGS)} or a list of them, got {settings!r}",
                    where)
    letters = d.get("mask_letters", "")
    if isinstance(letters, Mapping):
        letters = ",".join(f"{k}={v}" for k, v in letters.items())
    if not isinstance(letters, str):
        raise _fail(f"key 'mask_letters' must be like 't=text,v=image', got {letters!r}", where)
    mask = _resolve_path(d.get("mask"), base, f"{where}.mask")
    if synthetic and mask:
        raise _fail("the synthetic dataset carries its own mask; drop 'mask'", where)
    # a missing folder is reported when the data is needed (``study report`` reads the store only)
    folder = data if synthetic else _resolve_path(data, base, f"{where}.data")
    return DatasetEntry(label=label, data=folder, seed=seed,
                        modalities=tuple(_str_list(d.get("modalities", []), f"{where}.modalities")),
                        mask=mask, mask_letters=letters, settings=tuple(dict.fromkeys(settings_list)))


def _check_option(value: Any, default: Any, where: str) -> Any:
    if default == _LIST:
        if isinstance(value, list) and all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
            return value
        raise _fail(f"must be a list, got {value!r}", where)
    if isinstance(default, bool | str):
        if type(value) is not type(default):
            raise _fail(f"must be a {type(default).__name__}, got {value!r}", where)
        return value
    if isinstance(default, int) and not isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(f"must be an integer, got {value!r}", where)
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not value:
            raise _fail(f"must be a non-empty list, got {value!r}", where)
        if default and isinstance(default[0], float | int) and not isinstance(default[0], bool):
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                raise _fail(f"must be a list of numbers, got {value!r}", where)
            return [type(default[0])(v) for v in value]
        if default and isinstance(default[0], str) and not all(isinstance(v, str) for v in value):
            raise _fail(f"must be a list of strings, got {value!r}", where)
        return value
    if isinstance(default, dict):
        out = _check_keys(value, default, where)
        return {k: _check_option(v, default[k], f"{where}.{k}") for k, v in out.items()}
    return value


def _analysis(raw: Any, index: int, where: str) -> Analysis:
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, Mapping) or "kind" not in raw:
        raise _fail("each analysis needs a 'kind'", where)
    kind = raw["kind"]
    if kind not in _ANALYSES:
        raise _fail(f"unknown analysis kind {kind!r} (known: {', '.join(_ANALYSES)})", where)
    defaults = _ANALYSES[kind]
    given = _check_keys({k: v for k, v in raw.items() if k != "kind"}, defaults, f"{where} ({kind})")
    options = {k: (None if v == _LIST else copy.deepcopy(v)) for k, v in defaults.items()}
    for k, v in given.items():
        options[k] = _check_option(v, defaults[k], f"{where} ({kind}).{k}")
    if kind == "missing_ratio" and not options["dataset"]:
        raise _fail("missing_ratio needs 'dataset' (a dataset of the study)", f"{where} ({kind})")
    if kind == "ablation":
        for v in options["variants"]:
            if v not in ABLATIONS:
                raise _fail(f"unknown ablation variant {v!r} (known: {', '.join(ABLATIONS)})", f"{where} ({kind})")
    if kind == "sensitivity":
        for p, values in options["params"].items():
            if not values:
                raise _fail(f"parameter {p!r} needs at least one value", f"{where} ({kind}).params")
    for key in ("metrics",):
        for metric in options.get(key) or []:
            if "@" not in metric:
                raise _fail(f"metric {metric!r} must look like recall@20", f"{where} ({kind}).{key}")
    return Analysis(kind=kind, options=options, index=index)


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; every problem is one :class:`ConfigError` line naming the field."""
    path = Path(path)
    src = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("study file not found", source=src) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid YAML ({str(exc).splitlines()[0]})", source=src) from None
    top = _check_keys(raw if raw is not None else {}, _TOP_KEYS, src)
    base = path.resolve().parent
    name = top.get("name", path.stem)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise _fail(f"key 'name' must be a word without spaces or slashes, got {name!r}", src)
    if "store" not in top:
        raise _fail("missing key 'store' (the folder runs are kept in)", src)
    store = Path(_resolve_path(top["store"], base, f"{src}: store"))
    report = Path(_resolve_path(top["report"], base, f"{src}: report")) if top.get("report") else store / "report"
    raw_ds = top.get("datasets")
    if not isinstance(raw_ds, Mapping) or not raw_ds:
        raise _fail("key 'datasets' must map dataset labels to {data: ..., ...}", src)
    datasets = {str(k): _dataset_entry(str(k), v, base, f"{src}: datasets.{k}") for k, v in raw_ds.items()}
    from dgmrec.models import canonical_name

    models = []
    for m in _str_list(top.get("models", []), f"{src}: models"):
        try:
            models.append(canonical_name(m))
        except ConfigError as exc:
            raise _fail(str(exc).split(": ", 1)[1], f"{src}: models") from None
    seeds = _int_list(top.get("seeds", [999]), f"{src}: seeds")
    overrides = _mapping(top.get("overrides") or {}, f"{src}: overrides")
    if "seed" in overrides:
        raise _fail("set seeds with the top-level 'seeds' list, not an override", f"{src}: overrides")
    raw_variants = top.get("variants") or {"default": {}}
    if not isinstance(raw_variants, Mapping):
        raise _fail("key 'variants' must map variant names to configuration overrides", src)
    variants: dict[str, Variant] = {}
    for vname, vraw in raw_variants.items():
        where = f"{src}: variants.{vname}"
        vd = _mapping(vraw or {}, where)
        only = tuple(canonical_name(m) for m in _str_list(vd.pop("models", []), f"{where}.models"))
        cfg_file = vd.pop("config_file", None)
        over: dict[str, Any] = {}
        if cfg_file:
            file_path = Path(_resolve_path(cfg_file, base, f"{where}.config_file"))
            try:
                loaded = yaml.safe_load(file_path.read_text(encoding="utf-8")) or {}
            except FileNotFoundError:
                raise ConfigError("configuration file not found", source=f"{where}.config_file: {file_path}") \
                    from None
            over.update(_mapping(loaded, str(file_path)))
        over.update(vd)
        if "seed" in over:
            raise _fail("a variant may not set the seed (use the top-level 'seeds')", where)
        variants[str(vname)] = Variant(name=str(vname), overrides=over, models=only)
    raw_analyses = top.get("analyses") or []
    if not isinstance(raw_analyses, list):
        raise _fail("key 'analyses' must be a list", src)
    analyses = [_analysis(a, i, f"{src}: analyses[{i}]") for i, a in enumerate(raw_analyses)]
    tuning = None
    if top.get("tuning") is not None:
        tuning = _check_keys(top["tuning"], _TUNING_KEYS, f"{src}: tuning")
    device = top.get("device", "cpu")
    if not isinstance(device, str):
        raise _fail(f"key 'device' must be cpu, cuda or auto, got {device!r}", src)
    study = Study(path=path.resolve(), name=name, store=store, report=report, datasets=datasets, models=models,
                  seeds=seeds, variants=variants, overrides=overrides, analyses=analyses, device=device,
                  tuning=tuning, description=str(top.get("description", "")),
                  keep_resume_checkpoint=bool(top.get("keep_resume_checkpoint", False)),
                  stale_lock_seconds=float(top.get("stale_lock_seconds", 600.0)))
    _check_references(study, src)
    return study


def _check_references(study: Study, src: str) -> None:
    """Names an analysis refers to (datasets, models, variants) must exist in the study."""
    for a in study.analyses:
        where = f"{src}: analyses[{a.index}] ({a.kind})"
        for key, known in (("datasets", study.datasets), ("variants", study.variants)):
            for name in a.options.get(key) or []:
                if key == "variants" and a.kind == "ablation":
                    continue
                if name not in known:
                    raise _fail(f"{key[:-1]} {name!r} is not in the study (known: {', '.join(known)})", where)
        for key in ("dataset",):
            if a.options.get(key) and a.options[key] not in study.datasets:
                raise _fail(f"dataset {a.options[key]!r} is not in the study", where)
        for key in ("variant", "base"):
            if a.options.get(key) and a.options[key] not in study.variants:
                raise _fail(f"variant {a.options[key]!r} is not in the study", where)


# ========================================================================================= fingerprints
def _file_digest(path: Path, cache: dict[str, str]) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if ident not in cache:
        h = hashlib.blake2b(digest_size=16)
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        cache[ident] = h.hexdigest()
    return cache[ident]


def mask_digest(path: str | Path) -> str:
    """Digest of a mask's content; a plain ``.npz`` is hashed by its arrays (zip timestamps vary)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            h = hashlib.blake2b(digest_size=16)
            for k in sorted(z.files):
                h.update(k.encode())
                h.update(np.ascontiguousarray(z[k]).tobytes())
            return h.hexdigest()
    return _file_digest(path, {})


def dataset_fingerprint(entry: DatasetEntry, setting: str, cache: dict[str, str]) -> dict[str, Any]:
    """What determines a dataset's content: file digests (not paths, so a shared store works across machines)."""
    fp: dict[str, Any] = {"setting": setting, "modalities": list(entry.modalities),
                          "mask_letters": entry.mask_letters}
    if entry.synthetic:
        fp["synthetic"] = entry.seed
        return fp
    from dgmrec.data.mmrec import find_inter_file, order_modalities

    folder = Path(entry.data)
    name, inter, new_inter = find_inter_file(folder)
    fp["name"] = name
    fp["inter"] = _file_digest(inter, cache)
    if setting == "new-items" and new_inter is not None:
        fp["new_items_inter"] = _file_digest(new_inter, cache)
    chosen = list(entry.modalities) or order_modalities([p.name[: -len("_feat.npy")]
                                                         for p in folder.glob("*_feat.npy")])
    fp["features"] = {m: _file_digest(folder / f"{m}_feat.npy", cache) for m in chosen
                      if (folder / f"{m}_feat.npy").is_file()}
    if entry.mask:
        fp["mask"] = mask_digest(entry.mask)
    elif (folder / "observed.npz").is_file():
        fp["mask"] = mask_digest(folder / "observed.npz")
    return fp


def run_key(model: str, config: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> str:
    """The run's identity: hash of the model, its resolved configuration, the dataset and the code version."""
    from dgmrec import __version__

    payload = {"model": model, "config": dict(config), "dataset": dict(fingerprint),
               "version": [__version__, RESULTS_VERSION]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ============================================================================================ planning
STORE_PREFIX = "store:"
#: where a stored run is trained again for a checkpoint that was not kept (``<store>/rebuild/<key>``)
REBUILD_DIR = "rebuild"


@dataclass
class RunPlan:
    """One run to train: its key, training arguments and the post-training analyses it needs."""

    key: str
    model: str
    dataset: str  # label of the study dataset
    setting: str
    seed: int
    overrides: dict[str, Any]
    config: dict[str, Any]
    data: str  # dgmrec.api.train's data; "store:<rel>" for folders inside the store
    modalities: list[str]
    mask: str  # "" / path / "store:<rel>"
    mask_letters: str
    post: dict[str, dict[str, Any]] = field(default_factory=dict)

    def folder(self, store: Path) -> Path:
        return store / "runs" / self.model / self.key


@dataclass(frozen=True)
class Cell:
    """A labelled use of a run in an analysis: which table/figure entry it fills."""

    group: str  # "main", or the label of the sweep analysis that planned it
    dataset: str
    setting: str
    model: str
    variant: str
    seed: int
    param: str = ""
    value: float | str = ""
    key: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("group", "dataset", "setting", "model", "variant", "seed", "param",
                                              "value", "key")}


@dataclass
class Plan:
    study: Study
    runs: dict[str, RunPlan]
    cells: list[Cell]
    fingerprints: dict[str, dict[str, Any]]

    def select(self, group: str = "main", **match: Any) -> list[Cell]:
        """Cells of ``group`` whose fields equal ``match`` (a list value matches any of its members)."""
        out = []
        for c in self.cells:
            if c.group != group:
                continue
            ok = True
            for k, v in match.items():
                if v is None:
                    continue
                have = getattr(c, k)
                if (have not in v) if isinstance(v, list | tuple | set) else have != v:
                    ok = False
                    break
            if ok:
                out.append(c)
        return out


class Fingerprints:
    """Dataset fingerprints: computed from the files (``run``), or read from the stored plan (``report``)."""

    def __init__(self, study: Study, store_only: bool = False) -> None:
        self.study = study
        self.store_only = store_only
        self.known: dict[str, dict[str, Any]] = {}
        self.file_cache: dict[str, str] = {}
        if study.plan_path.is_file():
            stored = json.loads(study.plan_path.read_text())
            self.known = dict(stored.get("fingerprints", {}))
        elif store_only:
            raise DataError("the store has no plan of this study; run `dgmrec study run` first",
                            source=str(study.plan_path))
        self.used: dict[str, dict[str, Any]] = {}

    @staticmethod
    def ident(entry: DatasetEntry, setting: str, derived: str = "") -> str:
        data = f"{SYNTHETIC}(seed={entry.seed})" if entry.synthetic else "folder"
        return f"{entry.label}|{data}|{setting}|{derived}"

    def get(self, entry: DatasetEntry, setting: str, derived: str = "",
            compute: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        ident = self.ident(entry, setting, derived)
        if self.store_only:
            if ident not in self.known:
                raise DataError(f"dataset {entry.label!r} ({setting}{', ' + derived if derived else ''}) has no "
                                "stored fingerprint; run `dgmrec study run` first", source=str(self.study.path))
            fp = self.known[ident]
        else:
            fp = compute() if compute is not None else dataset_fingerprint(entry, setting, self.file_cache)
        self.used[ident] = fp
        return fp


def _resolved(model: str, dataset_name: str, overrides: Mapping[str, Any], seed: int, where: str) -> dict[str, Any]:
    from dgmrec.config import resolve_config

    try:
        cfg, _ = resolve_config(model, dataset_name, overrides={**overrides, "seed": seed})
    except ConfigError as exc:
        raise ConfigError(str(exc), source=where) from None
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.items())}


class _Planner:
    def __init__(self, study: Study, fingerprints: Fingerprints) -> None:
        self.study = study
        self.fp = fingerprints
        self.runs: dict[str, RunPlan] = {}
        self.cells: list[Cell] = []

    def add(self, group: str, entry: DatasetEntry, setting: str, model: str, variant: str, seed: int,
            overrides: Mapping[str, Any], *, param: str = "", value: float | str = "", data: str | None = None,
            mask: str | None = None, derived: str = "",
            compute_fp: Callable[[], dict[str, Any]] | None = None) -> Cell:
        over = {**self.study.overrides, **overrides}
        fp = self.fp.get(entry, setting, derived, compute_fp)
        config = _resolved(model, str(fp.get("name", SYNTHETIC)), over, seed,
                           f"{self.study.path}: variants.{variant} ({model} on {entry.label})")
        key = run_key(model, config, fp)
        if key not in self.runs:
            self.runs[key] = RunPlan(key=key, model=model, dataset=entry.label, setting=setting, seed=seed,
                                     overrides=dict(over), config=config,
                                     data=data if data is not None else entry.source(),
                                     modalities=list(entry.modalities),
                                     mask=mask if mask is not None else entry.mask, mask_letters=entry.mask_letters)
        cell = Cell(group=group, dataset=entry.label, setting=setting, model=model, variant=variant, seed=seed,
                    param=param, value=value, key=key)
        self.cells.append(cell)
        return cell

    def request_post(self, cells: Iterable[Cell], name: str, options: Mapping[str, Any]) -> None:
        for c in cells:
            have = self.runs[c.key].post.setdefault(name, {})
            for k, v in options.items():
                if k == "k":
                    have["k"] = sorted(set(have.get("k", [])) | set(v))
                else:
                    have.setdefault(k, v)


def _variants_for(study: Study, model: str, names: Sequence[str] | None) -> list[Variant]:
    return [v for v in study.variants.values() if v.applies(model) and (names is None or v.name in names)]


def plan_study(study: Study, store_only: bool = False, write: bool = True) -> Plan:
    """Expand a study into runs and cells; ``store_only`` reads fingerprints from the stored plan (no data)."""
    fps = Fingerprints(study, store_only=store_only)
    planner = _Planner(study, fps)
    for entry in study.datasets.values():
        for setting in entry.settings:
            for model in study.models:
                for variant in _variants_for(study, model, None):
                    for seed in study.seeds:
                        planner.add("main", entry, setting, model, variant.name, seed, variant.overrides)
    for a in study.analyses:
        _plan_analysis(study, planner, a)
    plan = Plan(study=study, runs=planner.runs, cells=planner.cells, fingerprints=fps.used)
    if write and not store_only:
        write_plan(plan)
    return plan


def _first_variant(study: Study, model: str, name: str | None) -> Variant:
    if name:
        return study.variants[name]
    vs = _variants_for(study, model, None)
    if not vs:
        raise ConfigError(f"no variant applies to model {model}", source=str(study.path))
    return vs[0]


def _plan_analysis(study: Study, planner: _Planner, a: Analysis) -> None:
    o = a.options
    if a.kind in POST_ANALYSES:
        cells = [c for c in planner.cells if c.group == "main"
                 and (o["datasets"] is None or c.dataset in o["datasets"])
                 and (o["models"] is None or c.model in o["models"])
                 and (o["variants"] is None or c.variant in o["variants"])]
        post_options = {k: v for k, v in o.items() if k not in ("datasets", "models", "variants")}
        planner.request_post(cells, a.kind, post_options)
    elif a.kind == "missing_ratio":
        _plan_ratio(study, planner, a)
    elif a.kind in ("ablation", "sensitivity"):
        model = o["model"]
        from dgmrec.models import canonical_name

        model = canonical_name(model)
        base = _first_variant(study, model, o["base"] or None)
        seeds = [int(s) for s in o["seeds"]] if o["seeds"] else study.seeds
        for label in o["datasets"] or list(study.datasets):
            entry = study.datasets[label]
            setting = entry.settings[0]
            for seed in seeds:
                if a.kind == "ablation":
                    planner.add(a.label, entry, setting, model, base.name, seed, base.overrides,
                                param="variant", value="DGMRec")
                    for name in o["variants"]:
                        planner.add(a.label, entry, setting, model, base.name, seed,
                                    {**base.overrides, **ABLATIONS[name]}, param="variant", value=name)
                else:
                    # the base configuration itself: the reference line of every sweep whose grid lacks its value
                    planner.add(a.label, entry, setting, model, base.name, seed, base.overrides, param="base",
                                value="base")
                    for param, values in o["params"].items():
                        keys = SENSITIVITY_KEYS.get(param, (param,))
                        for v in values:
                            planner.add(a.label, entry, setting, model, base.name, seed,
                                        {**base.overrides, **{k: v for k in keys}}, param=param, value=float(v))


def _plan_ratio(study: Study, planner: _Planner, a: Analysis) -> None:
    o = a.options
    entry = study.datasets[o["dataset"]]
    setting = o["setting"]
    seed = int(o["seed"]) if o["seed"] >= 0 else study.seeds[0]
    models = o["models"] or study.models
    data_arg, folder = _materialised_folder(study, entry, planner.fp.store_only)
    for ratio in o["ratios"]:
        rel = f"masks/{entry.label}_r{ratio:.2f}_s{o['mask_seed']}_n{o['new_item_seed']}.npz"
        derived = f"ratio={ratio:.2f},mask_seed={o['mask_seed']},new_item_seed={o['new_item_seed']}"

        def compute(ratio: float = ratio, rel: str = rel) -> dict[str, Any]:
            mask_path = study.store / rel
            if not mask_path.is_file():
                write_ratio_mask(folder, entry, ratio, mask_path, o["mask_seed"], o["new_item_seed"])
            masked = DatasetEntry(label=entry.label, data=str(folder), seed=entry.seed,
                                  modalities=entry.modalities, mask=str(mask_path), mask_letters="",
                                  settings=entry.settings)
            return dataset_fingerprint(masked, setting, planner.fp.file_cache)

        for model in models:
            from dgmrec.models import canonical_name

            model = canonical_name(model)
            variant = _first_variant(study, model, o["variant"] or None)
            planner.add(a.label, entry, setting, model, variant.name, seed, variant.overrides, param="ratio",
                        value=float(ratio), data=data_arg, mask=STORE_PREFIX + rel,
                        derived=derived, compute_fp=compute)


def _materialised_folder(study: Study, entry: DatasetEntry, store_only: bool) -> tuple[str, Path]:
    """Training's ``data`` and the local folder: a folder dataset is used in place, the synthetic one is written
    into the store (the generated masks replace its own)."""
    if not entry.synthetic:
        return entry.data, Path(entry.data)
    rel = f"data/{SYNTHETIC}_seed{entry.seed}"
    target = study.store / rel
    if not store_only and not (target / f"{SYNTHETIC}.inter").is_file():
        from dgmrec.data.mmrec import write_mmrec
        from dgmrec.data.synthetic import make_synthetic

        ds = make_synthetic(seed=entry.seed)
        if entry.modalities:
            ds = ds.select_modalities(list(entry.modalities))
        write_mmrec(ds, target, write_mask=False)
    return STORE_PREFIX + rel, target


def write_ratio_mask(folder: Path, entry: DatasetEntry, ratio: float, out: Path, seed: int, new_item_seed: int
                     ) -> None:
    """A mask of ``ratio`` missing items drawn with the reference recipe (as ``dgmrec data make-mask``)."""
    from dgmrec.api import load_dataset
    from dgmrec.data.masks import generate_missing_mask, save_plain_mask

    ds = load_dataset(folder, modalities=list(entry.modalities) or None)
    counts = np.bincount(ds.train[:, 1], minlength=ds.n_items)
    observed = generate_missing_mask(counts, ds.n_modalities, ratio, seed=seed, new_seed=new_item_seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_plain_mask(out, observed, ds.modalities)


def write_plan(plan: Plan) -> None:
    """Record the cells and fingerprints (merged with those other processes recorded)."""
    path = plan.study.plan_path
    path.parent.mkdir(parents=True, exist_ok=True)
    known: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            known = json.loads(path.read_text()).get("fingerprints", {})
    known.update(plan.fingerprints)
    payload = {"study": plan.study.name, "fingerprints": dict(sorted(known.items())),
               "cells": [c.as_dict() for c in plan.cells]}
    write_json_atomic(path, payload)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    tmp.replace(path)


# =============================================================================================== store
def resolve_store_path(value: str, store: Path) -> str:
    if value.startswith(STORE_PREFIX):
        return str((store / value[len(STORE_PREFIX):]).resolve())
    return value


def read_record(store: Path, run: RunPlan) -> dict[str, Any] | None:
    path = run.folder(store) / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def missing_post(record: Mapping[str, Any] | None, run: RunPlan) -> dict[str, dict[str, Any]]:
    """Post-training analyses the run still needs (absent, or computed with other options)."""
    done = (record or {}).get("post", {})
    return {name: opts for name, opts in run.post.items() if done.get(name) != opts}


def is_complete(record: Mapping[str, Any] | None, run: RunPlan) -> bool:
    return record is not None and record.get("status") == "done" and not missing_post(record, run)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive claim on one run (``O_CREAT | O_EXCL``), refreshed by a heartbeat while held."""

    def __init__(self, path: Path, stale_seconds: float, heartbeat_seconds: float = 30.0) -> None:
        self.path = path
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = min(heartbeat_seconds, stale_seconds / 4)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.owner, "time": time.time()}, f)
        return True

    def is_stale(self) -> bool:
        return self._stale_file(self.path)

    def _stale_file(self, path: Path) -> bool:
        try:
            holder = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except (FileNotFoundError, json.JSONDecodeError):
            return False  # gone, or being written right now
        if holder.get("host") == self.owner["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return True
        return age > self.stale_seconds

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create():
            if not self.is_stale():
                return False
            # take the stale lock over: move it aside (only one process can), then claim afresh
            aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            if not self._stale_file(aside):  # someone claimed afresh in between: give the claim back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                aside.unlink(missing_ok=True)
                return False
            aside.unlink(missing_ok=True)
            if not self._create():
                return False
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)


# ============================================================================================== runner
@dataclass
class RunOutcome:
    trained: list[str] = field(default_factory=list)
    analysed: list[str] = field(default_factory=list)
    skipped_locked: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _portable_paths(results_file: Path) -> None:
    """Dataset paths in a stored ``results.json`` relative to the run folder: a store can be committed and read
    on another machine (the checkpoint, which ``load_run`` reads, keeps the absolute paths)."""
    res = json.loads(results_file.read_text())
    spec = res.get("run", {}).get("dataset_spec")
    if not isinstance(spec, dict) or spec.get("data") in (None, "", "synthetic"):
        return
    for key in ("data", "mask"):
        if spec.get(key) and Path(spec[key]).is_absolute():
            spec[key] = Path(os.path.relpath(spec[key], results_file.parent)).as_posix()
    results_file.write_text(json.dumps(res, indent=2))


def _train(study: Study, run: RunPlan, out: Path, device: str | None, progress: bool,
           stop: Callable[[], bool] | None) -> None:
    from dgmrec import api

    api.train(run.model, resolve_store_path(run.data, study.store), out=out,
              overrides=dict(run.overrides), seed=run.seed,
              device=device or study.device, resume=(out / "checkpoint.pt").is_file(), progress=progress,
              modalities=run.modalities or None, mask=resolve_store_path(run.mask, study.store) or None,
              mask_letters=run.mask_letters or None, setting=run.setting, stop=stop)


def _rebuild_checkpoint(study: Study, run: RunPlan, folder: Path, device: str | None, progress: bool,
                        stop: Callable[[], bool] | None) -> dict[str, Any]:
    """Train a stored run again, beside it in ``<store>/rebuild/<key>``, for the checkpoint a post-training
    analysis needs; the stored records stay as they are. Returns whether the rebuilt run's validation and test
    metrics equal the stored ones (they do on the machine that trained the run: a seed fixes everything)."""
    out = study.store / REBUILD_DIR / run.key
    _train(study, run, out, device, progress, stop)
    stored = json.loads((folder / "results.json").read_text())
    rebuilt = json.loads((out / "results.json").read_text())
    same = all(stored.get(k) == rebuilt.get(k) for k in ("best_epoch", "valid", "test"))
    os.replace(out / "best.pt", folder / "best.pt")
    shutil.rmtree(out, ignore_errors=True)
    return {"metrics_equal": same}


def execute_run(study: Study, run: RunPlan, device: str | None = None, progress: bool = False,
                stop: Callable[[], bool] | None = None) -> bool:
    """Train ``run`` unless its results exist, compute missing post-training analyses, write the record.

    Returns True when it trained. The caller holds the run's lock. ``stop`` is handed to the training
    (:func:`dgmrec.api.train`): True after an epoch ends it with ``TrainingStopped``, resumable.
    """
    from dgmrec import api

    folder = run.folder(study.store)
    record = read_record(study.store, run)
    trained = False
    if record is None or record.get("status") != "done":
        results_file = folder / "results.json"
        done_before = results_file.is_file() and json.loads(results_file.read_text()).get("config") == run.config
        if not done_before:
            _train(study, run, folder, device, progress, stop)
            trained = True
        _portable_paths(results_file)
        record = {"status": "done", "key": run.key, "model": run.model, "dataset": run.dataset,
                  "setting": run.setting, "seed": run.seed, "config": run.config, "post": {},
                  "version": RESULTS_VERSION}
    todo = missing_post(record, run)
    if todo:
        from dgmrec.experiments import analyses

        if not (folder / "best.pt").is_file():  # a stored run whose checkpoint was not kept (never committed)
            record["checkpoint_rebuilt"] = _rebuild_checkpoint(study, run, folder, device, progress, stop)
            trained = True
        loaded = api.load_run(folder, device=device or study.device,
                              data=None if not run.data.startswith(STORE_PREFIX)
                              else resolve_store_path(run.data, study.store))
        for name, options in sorted(todo.items()):
            analyses.run_post_analysis(name, loaded, folder, options)
            record["post"][name] = options
    write_json_atomic(folder / "run.json", record)
    if not study.keep_resume_checkpoint:
        (folder / "checkpoint.pt").unlink(missing_ok=True)
    return trained


def pending_runs(study: Study, plan: Plan) -> list[RunPlan]:
    return [r for r in plan.runs.values() if not is_complete(read_record(study.store, r), r)]


def run_worker(study: Study, plan: Plan, *, device: str | None = None, max_runs: int | None = None,
               on_start: Callable[[RunPlan], None] | None = None,
               on_done: Callable[[RunPlan], None] | None = None, progress: bool = False) -> RunOutcome:
    """Claim and execute pending runs one by one until none is left (or ``max_runs`` were trained)."""
    out = RunOutcome()
    locks = study.store / "locks"
    for run in pending_runs(study, plan):
        if max_runs is not None and len(out.trained) >= max_runs:
            break
        lock = RunLock(locks / f"{run.key}.lock", study.stale_lock_seconds)
        if not lock.acquire():
            out.skipped_locked.append(run.key)
            continue
        try:
            if is_complete(read_record(study.store, run), run):  # finished by another worker meanwhile
                continue
            if on_start:
                on_start(run)
            if execute_run(study, run, device=device, progress=progress):
                out.trained.append(run.key)
            else:
                out.analysed.append(run.key)
            if on_done:
                on_done(run)
        finally:
            lock.release()
    return out


def _worker_process(study_path: str, device: str | None, max_runs: int | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    study = load_study(study_path)
    plan = plan_study(study, write=False)
    run_worker(study, plan, device=device, max_runs=max_runs)


def run_study(study: Study, *, workers: int = 1, device: str | None = None, max_runs: int | None = None,
              progress: bool = True) -> RunOutcome:
    """Plan the study, then train and analyse every run the store lacks (see the module notes)."""
    plan = plan_study(study)
    total = len(plan.runs)
    study.store.mkdir(parents=True, exist_ok=True)
    view = _ProgressView(total, total - len(pending_runs(study, plan)), enabled=progress, title=study.name)
    try:
        if workers <= 1:
            return run_worker(study, plan, device=device, max_runs=max_runs, on_start=view.start,
                              on_done=view.done)
        import multiprocessing as mp

        before = {r.key for r in pending_runs(study, plan)}
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_process, args=(str(study.path), device, max_runs))
                 for _ in range(workers)]
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            view.poll(total - len(pending_runs(study, plan)), _current_runs(study, plan))
            time.sleep(2.0)
        for p in procs:
            p.join()
        view.poll(total - len(pending_runs(study, plan)), [])
        failed = {str(p.pid): f"exit code {p.exitcode}" for p in procs if p.exitcode}
        left = {r.key for r in pending_runs(study, plan)}
        return RunOutcome(trained=sorted(before - left), failed=failed)
    finally:
        view.close()


def _current_runs(study: Study, plan: Plan) -> list[str]:
    locks = study.store / "locks"
    names = []
    for run in plan.runs.values():
        if (locks / f"{run.key}.lock").is_file():
            names.append(describe(run))
    return names


def describe(run: RunPlan) -> str:
    return f"{run.model} on {run.dataset} ({run.setting}, seed {run.seed}, {run.key[:8]})"


class _ProgressView:
    """Runs done / total over the whole study and the run(s) in progress (rich)."""

    def __init__(self, total: int, done: int, enabled: bool, title: str) -> None:
        self.enabled = enabled and total > 0
        self.done_count = done
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.fields[title]}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.description}"))
        self.task = self.progress.add_task("", total=total, completed=done, title=f"study {title}: runs")
        self.progress.start()

    def start(self, run: RunPlan) -> None:
        if self.enabled:
            self.progress.update(self.task, description=f"now: {describe(run)}")

    def done(self, run: RunPlan) -> None:
        self.done_count += 1
        if self.enabled:
            self.progress.update(self.task, completed=self.done_count, description="")

    def poll(self, done: int, current: list[str]) -> None:
        self.done_count = done
        if self.enabled:
            self.progress.update(self.task, completed=done, description="now: " + "; ".join(current[:3]))

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
