"""Layered, validated configuration.

Layers, later ones winning: ``overall.yaml`` < ``datasets/<dataset>.yaml`` < ``models/<Model>.yaml`` <
``best/<Model>_<dataset>.yaml`` (the shipped best configuration, selected by the dataset name) < a user file <
``--set key=value``. Every key must be declared by ``overall.yaml`` or the model's YAML; an unknown key is an
error (never a silent ``None``), a value must have the type of its default (a list: each element the type of
the default's elements), a number must lie in the range :data:`RANGES` declares for its key, and
``valid_metric`` must be one of the reported metrics. Values given on the command line are parsed as YAML
literals, never evaluated.
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
    "topk": "[1, inf)",
    "embedding_size": "[1, inf)",
    # sizes and counts of the models
    **dict.fromkeys(("n_ui_layers", "n_layers", "n_mm_layers", "n_hyper_layers", "n_hyper_layer",
                     "sinkhorn_iterations", "club_steps", "generation_warmup", "damrs_pseudo_k"), "[0, inf)"),
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
# string (or list-of-string) keys with a fixed set of values; models declare their own in ``Recommender.choices``
CHOICES: dict[str, tuple[str, ...]] = {"metrics": METRICS,
                                       "precision": ("fp32", "bf16", "fp16"),
                                       "knn_backend": KNN_BACKENDS}


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


def resolve_config(
    model: str,
    dataset: str,
    *,
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    use_best: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Resolve the configuration of ``model`` on ``dataset``; returns ``(config, layers used)``."""
    overall = shipped("overall", "")
    model_defaults = shipped("models", model)
    allowed: dict[str, Any] = {**overall, **model_defaults}
    layers: list[tuple[str, dict[str, Any]]] = [("overall", overall)]
    ds_layer = shipped("datasets", dataset)
    if ds_layer:
        layers.append((f"datasets/{dataset}", ds_layer))
    layers.append((f"models/{model}", model_defaults))
    if use_best:
        best = shipped("best", f"{model}_{dataset}")
        if best:
            layers.append((f"best/{model}_{dataset}", best))
    if file is not None:
        layers.append((str(file), _read_yaml(Path(file))))
    if overrides:
        layers.append(("--set", dict(overrides)))
    config: dict[str, Any] = {}
    origin: dict[str, str] = {}
    used = []
    for source, layer in layers:
        for key, value in layer.items():
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise ConfigError(f"unknown configuration key '{key}' for model {model} (known keys: {known})",
                                  source=source)
            config[key] = _check_type(key, value, allowed[key], source)
            _check_range(key, config[key], model, source)
            origin[key] = source
        used.append(source)
    # valid_metric depends on topk and metrics: blame the layer that set the last of the three
    last = max((used.index(origin[k]) for k in ("valid_metric", "topk", "metrics") if k in origin), default=0)
    _check_valid_metric(config, used[last] if used else "configuration")
    return config, used
