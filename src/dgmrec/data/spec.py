"""The description of a dataset a run trains on: enough to rebuild the same :class:`RecDataset` anywhere.

>>> spec = DatasetSpec("synthetic(seed=3)", modalities="image,text")
>>> spec.to_dict()
{'data': 'synthetic', 'seed': 3, 'modalities': ['image', 'text'], 'mask': '', 'mask_letters': '', 'setting': 'missing'}
>>> ds = spec.load()

Fields: ``data`` is an MMRec folder or ``synthetic`` (``synthetic(seed=N)`` is read as ``data="synthetic",
seed=N``); ``seed`` seeds the synthetic dataset (``None`` for a folder); ``modalities`` selects and orders
modalities (empty: all of them); ``mask`` is a mask file (empty: the folder's ``observed.npz``, else all
observed); ``mask_letters`` maps the letters of pickled masks (``"t=text,v=image,a=audio"``; empty: that
default); ``setting`` is ``missing`` or ``new-items``. Bad values raise :class:`DataError` naming the field.
A spec is frozen and round-trips through a plain dict, JSON and YAML.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dgmrec.data.dataset import SETTINGS, RecDataset
from dgmrec.data.masks import draw_new_items, parse_letters
from dgmrec.data.mmrec import load_mmrec, make_new_item_split
from dgmrec.data.synthetic import make_synthetic
from dgmrec.errors import DataError

SYNTHETIC = "synthetic"
_SYNTHETIC_FORM = re.compile(r"synthetic(?:\(\s*seed\s*=\s*(\d+)\s*\))?")


def synthetic_form(data: str) -> tuple[bool, int | None]:
    """Whether ``data`` names the embedded synthetic dataset, and the seed it writes (``synthetic(seed=N)``).

    ``("synthetic", None)`` for a folder; a malformed ``synthetic(...)`` is a :class:`DataError`."""
    if data != SYNTHETIC and not data.startswith(SYNTHETIC + "("):
        return False, None
    form = _SYNTHETIC_FORM.fullmatch(data)
    if form is None:
        raise DataError(f"expected synthetic or synthetic(seed=N) with an integer N >= 0, got {data!r}", source="data")
    return True, None if form.group(1) is None else int(form.group(1))


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {value!r}", source=name)
    return value.strip()


def _modalities(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(m, str) for m in items):
        raise DataError(f"must be a list of modality names, got {value!r}", source="modalities")
    names = tuple(m.strip() for m in items if m.strip())
    if len(set(names)) != len(names):
        raise DataError(f"a modality is listed twice in {list(names)}", source="modalities")
    return names


def _letters(value: Any) -> str:
    if isinstance(value, Mapping):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    text = _text(value, "mask_letters")
    if not text:
        return ""
    try:
        letters = parse_letters(text)
    except DataError as exc:
        raise DataError(str(exc).removeprefix(f"{exc.source}: "), source="mask_letters") from None
    return ",".join(f"{k}={v}" for k, v in letters.items())


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset folder or the synthetic dataset, with the modality, mask and setting choices (module notes)."""

    data: str
    seed: int | None = None
    modalities: tuple[str, ...] = ()
    mask: str = ""
    mask_letters: str = ""
    setting: str = "missing"

    def __post_init__(self) -> None:
        data = _text(self.data, "data")
        if not data:
            raise DataError("must name a dataset folder, or synthetic / synthetic(seed=N)", source="data")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise DataError(f"must be an integer >= 0, got {seed!r}", source="seed")
        synthetic, written = synthetic_form(data)
        if synthetic:
            if written is not None:
                if seed is not None and seed != written:
                    raise DataError(f"seed {seed} contradicts data {data!r}", source="seed")
                seed = written
            data, seed = SYNTHETIC, 0 if seed is None else seed
        elif seed is not None:
            raise DataError("only the synthetic dataset takes a seed", source="seed")
        mask = _text(self.mask, "mask")
        if data == SYNTHETIC and mask:
            raise DataError("the synthetic dataset carries its own mask", source="mask")
        setting = _text(self.setting, "setting")
        if setting not in SETTINGS:
            raise DataError(f"unknown setting {setting!r}; use {' or '.join(SETTINGS)}", source="setting")
        for name, value in (("data", data), ("seed", seed), ("modalities", _modalities(self.modalities)),
                            ("mask", mask), ("mask_letters", _letters(self.mask_letters)), ("setting", setting)):
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ forms
    @property
    def synthetic(self) -> bool:
        return self.data == SYNTHETIC

    def resolved(self) -> DatasetSpec:
        """The same spec with absolute folder and mask paths (what a run records)."""
        if self.synthetic:
            return self
        return replace(self, data=str(Path(self.data).resolve()),
                       mask=str(Path(self.mask).resolve()) if self.mask else "")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["modalities"] = list(self.modalities)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetSpec:
        if not isinstance(d, Mapping):
            raise DataError(f"a dataset spec must be a mapping of field: value, got {type(d).__name__}",
                            source="dataset spec")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise DataError(f"unknown field '{unknown[0]}' (known fields: {', '.join(known)})",
                            source="dataset spec")
        if "data" not in d:
            raise DataError("required field missing", source="data")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> DatasetSpec:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON ({exc.msg})", source="dataset spec") from None
        return cls.from_dict(d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> DatasetSpec:
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DataError(f"not valid YAML ({str(exc).splitlines()[0]})", source="dataset spec") from None
        return cls.from_dict(d)

    @classmethod
    def of_dataset(cls, ds: RecDataset) -> DatasetSpec:
        """The best description of an already loaded dataset: its source (folder or synthetic seed), its
        modalities and setting. A mask given at load time is not known here; pass the spec itself to keep it."""
        source = ds.source or ds.name
        return cls(source, modalities=tuple(ds.modalities), setting=ds.setting)

    @classmethod
    def of_run(cls, run: Mapping[str, Any]) -> DatasetSpec:
        """The spec a run recorded (``run["dataset_spec"]``), or the separate keys of runs written before."""
        if "dataset_spec" in run:
            return cls.from_dict(run["dataset_spec"])
        if not run.get("data"):
            raise DataError("the run does not record its dataset", source="dataset spec")
        return cls(run["data"], modalities=run.get("modalities") or None, mask=run.get("mask") or None,
                   mask_letters=run.get("mask_letters") or None, setting=run.get("setting") or "missing")

    # ------------------------------------------------------------------- load
    def load(self) -> RecDataset:
        """Build the dataset."""
        if not self.synthetic:
            return load_mmrec(self.data, modalities=list(self.modalities) or None, mask=self.mask or None,
                              mask_letters=parse_letters(self.mask_letters) if self.mask_letters else None,
                              setting=self.setting)
        ds = make_synthetic(seed=int(self.seed or 0))
        if self.modalities:
            ds = ds.select_modalities(list(self.modalities))
        if self.setting == "new-items":
            counts = np.bincount(ds.train[:, 1], minlength=ds.n_items)
            ds = make_new_item_split(ds, draw_new_items(counts))
        return ds
