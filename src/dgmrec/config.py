"""Layered, validated configuration.

Layers, later ones winning: ``overall.yaml`` < ``datasets/<dataset>.yaml`` < ``models/<Model>.yaml`` <
``best/<Model>_<dataset>.yaml`` (the shipped best configuration, selected by the dataset name) < a user file <
``--set key=value``. A model YAML may define ``presets`` (name -> option values), chosen by its key ``preset``
in any layer: the chosen preset's values form a layer right after the shipped ones, so they beat the model
defaults and best configurations while a user file and ``--set`` beat them. Every key must be declared by
``overall.yaml`` or the model's YAML; an unknown key is an error (never a silent ``None``), and a value must have
the type of its default. Values given on the command line are parsed as YAML literals, never evaluated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dgmrec.errors import ConfigError


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


def shipped_best_names() -> list[str]:
    return sorted(p.stem for p in (_config_dir() / "best").glob("*.yaml"))


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
        return value
    return value


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
    presets = model_defaults.pop("presets", None) or {}
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
    user: list[tuple[str, dict[str, Any]]] = []
    if file is not None:
        user.append((str(file), _read_yaml(Path(file))))
    if overrides:
        user.append(("--set", dict(overrides)))
    chosen = next((layer["preset"] for _, layer in reversed(layers + user) if "preset" in layer), None)
    if presets and chosen is not None:
        if not isinstance(chosen, str) or chosen not in presets:
            raise ConfigError(f"key 'preset' must be one of {', '.join(presets)}, got {chosen!r}", source="preset")
        layers.append((f"models/{model} presets.{chosen}", dict(presets[chosen] or {})))
    layers += user
    config: dict[str, Any] = {}
    used = []
    for source, layer in layers:
        for key, value in layer.items():
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise ConfigError(f"unknown configuration key '{key}' for model {model} (known keys: {known})",
                                  source=source)
            config[key] = _check_type(key, value, allowed[key], source)
        used.append(source)
    return config, used
