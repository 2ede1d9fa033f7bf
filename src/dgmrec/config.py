"""Layered, validated configuration.

Layers, later ones winning: ``overall.yaml`` < ``datasets/<dataset>.yaml`` < ``models/<Model>.yaml`` <
``best/<Model>_<dataset>.yaml`` (the shipped best configuration, selected by the dataset name) < a user file <
``--set key=value``. A model YAML may define ``presets`` (name -> option values), chosen by its key ``preset``
in any layer: the chosen preset's values form a layer right after the shipped ones, so they beat the model
defaults and best configurations while a user file and ``--set`` beat them. Every key must be declared by
``overall.yaml`` or the model's YAML; an unknown key is an error (never a silent ``None``), a value must have the
type of its default (a list: each element the type of the default's elements), a number must lie in the range
:data:`RANGES` declares for its key (:data:`KEYWORDS`: numeric keys that also take a word), and ``valid_metric``
must be one of the reported metrics. Values given on the command line are parsed as YAML literals, never
evaluated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dgmrec.errors import ConfigError
from dgmrec.evaluation.metrics import METRICS
from dgmrec.knn import KNN_BACKENDS

# Allowed ranges, in interval notation: "[1, inf)" = 1 or more, "(0, inf)" = above 0, "[0, 1)" = 0 up to but
# excluding 1. A list value is checked element by element. A key of one model only is written "Model.key" and
# wins over the plain key. Keys not listed here are checked for their type only.
RANGES: dict[str, str] = {
    # training and evaluation (overall.yaml)
    "seed": "[0, inf)",
    "epochs": "[1, inf)",
    "learning_rate": "(0, inf)",
    "learning_rate_scheduler": "(0, inf)",  # [a, b]: lr * a ** (epoch / b)
    "weight_decay": "[0, inf)",
    "train_batch_size": "[1, inf)",
    "eval_batch_size": "[1, inf)",
    "eval_step": "[1, inf)",
    "stopping_step": "[0, inf)",
    "stopping_bpr_below": "[0, inf)",
    "stopping_min_steps": "[0, inf)",
    "topk": "[1, inf)",
    "embedding_size": "[1, inf)",
    "imputation_k": "[1, inf)",
    "imputation_steps": "[1, inf)",
    # sizes and counts of the models
    **dict.fromkeys(("n_ui_layers", "n_layers", "n_mm_layers", "n_hyper_layers", "n_hyper_layer",
                     "sinkhorn_iterations", "club_steps", "damrs_pseudo_k"), "[0, inf)"),
    **dict.fromkeys(("knn_k", "hyper_num", "n_prototypes", "sinkhorn_chunk", "cooc_k", "cooc_min_shared",
                     "latent_embedding", "feat_embed_dim", "club_sample", "refresh_interval"), "[1, inf)"),
    "club_hidden": "[2, inf)",  # the estimator's hidden width is club_hidden / 2
    # loss weights, regularisers and noise sizes
    **dict.fromkeys(("reg_weight", "reg_weight_1", "reg_weight_2", "cl_weight", "cl_loss", "kl_weight",
                     "neighbor_weight", "damrs_nd_scale", "lamb", "lamb_1", "lamb_2", "ssl_alpha", "reg_coeff",
                     "penalty_coeff", "align_coeff", "vt_loss", "bm_loss", "um_loss", "um_noise", "recon", "reg",
                     "sampler", "interModal", "intraModal", "alignBM", "additive", "cf_reg", "perturb_scale",
                     "decoder_ridge", "alpha"), "[0, inf)"),
    # temperatures and other strictly positive scales
    **dict.fromkeys(("temp", "tau", "cl_temperature", "nd_temperature", "bm_temp", "um_temp", "ssl_temp",
                     "interModalTemp", "intraModalTemp", "alignBMTemp", "sinkhorn_epsilon", "club_lr",
                     "MILK.alpha"), "(0, inf)"),  # MILK's alpha is a Dirichlet concentration
    # probabilities and mixing weights
    "dropout": "[0, 1)",
    "keep_rate": "(0, 1]",
    "lambda_coeff": "[0, 1]",
    "avg_lambda": "[0, 1]",
    "infer_adj_update": "[0, 1]",
    # execution: threads, precision, kNN search
    "threads": "[0, inf)",
    "knn_exact_max_items": "[0, inf)",
    "knn_nprobe": "[0, inf)",
}
# list keys whose number of elements is fixed (min, max; None = no upper bound)
LENGTHS: dict[str, tuple[int, int | None]] = {"learning_rate_scheduler": (2, 2), "topk": (1, None),
                                               "metrics": (1, None)}
# Numeric keys that also take a keyword (any layer may give the word instead of a number).
KEYWORDS: dict[str, tuple[str, ...]] = {"cold_start_ridge": ("auto",)}
# string (or list-of-string) keys with a fixed set of values; models declare their own in ``Recommender.choices``
CHOICES: dict[str, tuple[str, ...]] = {"metrics": METRICS, "missing_imputation": ("zero", "mean", "nn", "graph"),
                                       "feature_scaling": ("none", "standardize", "l2"),
                                       "precision": ("fp32", "bf16", "fp16"), "knn_backend": KNN_BACKENDS}


_INTERVAL_FORM = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])")


@dataclass(frozen=True)
class Interval:
    """A real interval parsed from ``"[low, high)"``-style notation (``inf`` for no bound)."""

    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        form = _INTERVAL_FORM.fullmatch(text.strip())
        if form is None:
            raise ValueError(f"not an interval: {text!r}")
        return cls(float(form.group(2)), float(form.group(3)), form.group(1) == "(", form.group(4) == ")")

    def __contains__(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if v.is_integer() else str(v)

        if math.isinf(self.high):
            return f"{'greater than' if self.low_open else 'at least'} {num(self.low)}"
        return f"in {'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"


_INTERVALS = {key: Interval.parse(text) for key, text in RANGES.items()}


def _config_dir() -> Path:
    return Path(str(resources.files("dgmrec") / "configs"))


def _read_yaml(path: Path, source: str | None = None) -> dict[str, Any]:
    src = source or str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("configuration file not found", source=src) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"not valid YAML ({first})", source=src) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("a configuration file must be a mapping of key: value", source=src)
    return data


def shipped(kind: str, name: str) -> dict[str, Any]:
    """A shipped configuration layer (``kind`` in overall/datasets/models/best), ``{}`` if none exists."""
    path = _config_dir() / ("overall.yaml" if kind == "overall" else f"{kind}/{name}.yaml")
    return _read_yaml(path) if path.is_file() else {}


def shipped_dataset_names() -> list[str]:
    """Datasets with a shipped configuration layer (``datasets/<name>.yaml`` or ``best/<Model>_<name>.yaml``)."""
    root = _config_dir()
    names = {p.stem for p in (root / "datasets").glob("*.yaml")}
    names |= {p.stem.split("_", 1)[1] for p in (root / "best").glob("*_*.yaml")}
    return sorted(names)


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are YAML literals (``0.1``, ``[10, 20]``, ``true``, ``name``)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}", source="--set")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def _scalar(text: str) -> Any:
    """One element of a comma list: a YAML scalar (``5``, ``0.1``, ``recall``), never a nested structure."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()
    return value if isinstance(value, int | float | str | bool) else text.strip()


def _check_type(key: str, value: Any, default: Any, source: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"key '{key}' must be true or false, got {value!r}", source=source)
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"key '{key}' must be an integer, got {value!r}", source=source)
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"key '{key}' must be a number, got {value!r}", source=source)
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"key '{key}' must be a string, got {value!r}", source=source)
        return value
    if isinstance(default, list):
        if isinstance(value, str) and value.strip():  # "5,10" on the command line: a comma list
            value = [_scalar(v) for v in value.split(",")]
        elif not isinstance(value, list) and isinstance(value, int | float | str) and not isinstance(value, bool):
            value = [value]  # one element: topk=20
        if not isinstance(value, list):
            raise ConfigError(f"key '{key}' must be a list, got {value!r}", source=source)
        kinds = {type(v) for v in default}
        if len(kinds) == 1:  # a homogeneous default: every element has the type of its elements
            return [_check_type(f"{key}[{i}]", v, default[0], source) for i, v in enumerate(value)]
        for i, v in enumerate(value):
            if kinds <= {int, float} and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise ConfigError(f"key '{key}[{i}]' must be a number, got {v!r}", source=source)
        return value
    return value


def _check_range(key: str, value: Any, model: str, source: str) -> None:
    """The declared range (:data:`RANGES`), length (:data:`LENGTHS`) and choices (:data:`CHOICES`) of ``key``."""
    items = value if isinstance(value, list) else [value]
    if key in LENGTHS:
        low, high = LENGTHS[key]
        if len(items) < low or (high is not None and len(items) > high):
            want = f"exactly {low}" if low == high else f"at least {low}"
            raise ConfigError(f"key '{key}' must have {want} element{'s' * (low != 1)}, got {value!r}",
                              source=source)
    interval = _INTERVALS.get(f"{model}.{key}", _INTERVALS.get(key))
    if interval is not None:
        for v in items:
            if isinstance(v, int | float) and not isinstance(v, bool) and v not in interval:
                raise ConfigError(f"key '{key}' must be {interval}, got {value!r}", source=source)
    if key in CHOICES:
        for v in items:
            if v not in CHOICES[key]:
                raise ConfigError(f"key '{key}' has unknown value {v!r}; known: {', '.join(CHOICES[key])}",
                                  source=source)


def check_values(config: Mapping[str, Any], model: str = "", source: str = "configuration") -> None:
    """Range-check every value of a resolved configuration and the keys that depend on each other."""
    for key, value in config.items():
        _check_range(key, value, model, source)
    _check_valid_metric(config, source)


def _check_valid_metric(config: Mapping[str, Any], source: str) -> None:
    metric = str(config.get("valid_metric", ""))
    name, _, k = metric.partition("@")
    metrics, ks = list(config.get("metrics", METRICS)), [int(v) for v in config.get("topk", [])]
    if name not in metrics or not k.isdigit() or int(k) not in ks:
        raise ConfigError(f"key 'valid_metric' must be one of metrics {metrics} at one of topk {ks}, got "
                          f"{metric!r}", source=source)


LAYER_KINDS = ("overall", "dataset", "model", "best", "file", "set")


def _model_defaults(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's shipped defaults and its named presets (the YAML's ``presets`` mapping, not a key)."""
    defaults = shipped("models", model)
    presets = defaults.pop("presets", None) or {}
    return defaults, presets


def _layers(model: str, dataset: str, file: str | Path | None, overrides: Mapping[str, Any] | None,
            use_best: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """``(kind, source, values)`` of every configuration layer that applies, lowest first.

    A chosen preset (the last layer that sets ``preset`` wins) forms a layer right after the shipped ones.
    """
    defaults, presets = _model_defaults(model)
    layers: list[tuple[str, str, dict[str, Any]]] = [("overall", "overall", shipped("overall", ""))]
    ds_layer = shipped("datasets", dataset)
    if ds_layer:
        layers.append(("dataset", f"datasets/{dataset}", ds_layer))
    layers.append(("model", f"models/{model}", defaults))
    if use_best:
        best = shipped("best", f"{model}_{dataset}")
        if best:
            layers.append(("best", f"best/{model}_{dataset}", best))
    user: list[tuple[str, str, dict[str, Any]]] = []
    if file is not None:
        user.append(("file", str(file), _read_yaml(Path(file))))
    if overrides:
        user.append(("set", "--set", dict(overrides)))
    chosen = next((layer["preset"] for _, _, layer in reversed(layers + user) if "preset" in layer), None)
    if presets and chosen is not None:
        if not isinstance(chosen, str) or chosen not in presets:
            raise ConfigError(f"key 'preset' must be one of {', '.join(presets)}, got {chosen!r}", source="preset")
        layers.append(("preset", f"models/{model} presets.{chosen}", dict(presets[chosen] or {})))
    return layers + user


def _resolve(model: str, dataset: str, file: str | Path | None, overrides: Mapping[str, Any] | None,
             use_best: bool) -> tuple[dict[str, Any], dict[str, tuple[str, str]], list[str]]:
    """The resolved configuration, each key's ``(layer kind, layer source)`` and the sources used."""
    allowed: dict[str, Any] = {**shipped("overall", ""), **_model_defaults(model)[0]}
    config: dict[str, Any] = {}
    origin: dict[str, tuple[str, str]] = {}
    used: list[str] = []
    for kind, source, layer in _layers(model, dataset, file, overrides, use_best):
        for key, value in layer.items():
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise ConfigError(f"unknown configuration key '{key}' for model {model} (known keys: {known})",
                                  source=source)
            if value in KEYWORDS.get(key, ()):  # a number's keyword (cold_start_ridge: auto)
                config[key] = value
            else:
                config[key] = _check_type(key, value, allowed[key], source)
                _check_range(key, config[key], model, source)
            origin[key] = (kind, source)
        used.append(source)
    # valid_metric depends on topk and metrics: blame the layer that set the last of the three
    last = max((used.index(origin[k][1]) for k in ("valid_metric", "topk", "metrics") if k in origin), default=0)
    _check_valid_metric(config, used[last] if used else "configuration")
    return config, origin, used


def resolve_config(
    model: str,
    dataset: str,
    *,
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    use_best: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Resolve the configuration of ``model`` on ``dataset``; returns ``(config, layers used)``."""
    config, _, used = _resolve(model, dataset, file, overrides, use_best)
    return config, used


# --------------------------------------------------------------------------------------- explanations
_KEY_LINE = re.compile(r"^([A-Za-z_][\w.]*)\s*:(.*)$")


def yaml_comments(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The comments that describe the top-level keys of a shipped YAML file: ``(trailing, above)``.

    ``trailing`` maps a key to its trailing comment (``key: value  # meaning``); ``above`` maps a key to the
    block of full-line comments directly above it (the file's opening comment block excepted).
    """
    trailing: dict[str, str] = {}
    above: dict[str, str] = {}
    if not path.is_file():
        return trailing, above
    block: list[str] = []
    header = True  # the comment lines that open the file describe the file, not its first key
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if not header:
                block.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            block, header = [], False
            continue
        header = False
        form = _KEY_LINE.match(line)
        if form is not None:
            _, sep, comment = _strip_comment(form.group(2))
            if sep and comment:
                trailing[form.group(1)] = comment
            if block:
                above[form.group(1)] = " ".join(block)
        block = []
    return trailing, above


def _strip_comment(text: str) -> tuple[str, str, str]:
    """Split ``value  # comment`` at the first ``#`` outside quotes that follows a space."""
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), "#", text[i + 1:].strip()
    return text.strip(), "", ""


def key_meanings(model: str) -> dict[str, str]:
    """Every configuration key of ``model`` with its one-line meaning: the trailing comment in the model's YAML,
    else the one in ``overall.yaml``, else the comment block above the key (model's YAML first)."""
    own_trailing, own_above = yaml_comments(_config_dir() / f"models/{model}.yaml")
    base_trailing, base_above = yaml_comments(_config_dir() / "overall.yaml")
    return {**base_above, **own_above, **base_trailing, **own_trailing}


@dataclass(frozen=True)
class ConfigEntry:
    """One resolved key: value, the layer that set it (``overall``, ``dataset``, ``model``, ``best``, ``file``,
    ``set``), that layer's file (or ``--set``) and the key's meaning."""

    key: str
    value: Any
    layer: str
    source: str
    meaning: str


def explain_config(
    model: str,
    dataset: str,
    *,
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    use_best: bool = True,
) -> list[ConfigEntry]:
    """Every key of the resolved configuration, in key order, with the layer it comes from and its meaning."""
    config, origin, _ = _resolve(model, dataset, file, overrides, use_best)
    meanings = key_meanings(model)
    return [ConfigEntry(key, config[key], origin[key][0], origin[key][1], meanings.get(key, ""))
            for key in sorted(config)]


# ------------------------------------------------------------------------------------- small catalogues
def fit_cutoffs(config: Mapping[str, Any], n_items: int) -> tuple[dict[str, Any], list[str]]:
    """``config`` with the cut-offs a catalogue of ``n_items`` items can measure, and a note when any changed.

    A cut-off ``K >= n_items`` puts every item in the list (recall and hit are 1 for every user), so it is
    dropped from ``topk``; when none is left, ``topk`` becomes ``[max(1, n_items // 2)]``. ``valid_metric``
    keeps its metric and moves to the largest remaining cut-off.
    """
    ks = [int(k) for k in config["topk"]]
    keep = list(dict.fromkeys(k for k in ks if k < n_items)) or [max(1, n_items // 2)]
    if keep == ks:
        return dict(config), []
    out = dict(config)
    out["topk"] = keep
    note = f"topk {ks} -> {keep}"
    metric, _, k = str(config["valid_metric"]).partition("@")
    if k.isdigit() and int(k) not in keep:
        out["valid_metric"] = f"{metric}@{max(keep)}"
        note += f" and valid_metric {config['valid_metric']} -> {out['valid_metric']}"
    note += f": the catalogue has {n_items} items, and a cut-off at or above that ranks every item"
    return out, [note]
