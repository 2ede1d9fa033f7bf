"""Atomic checkpoint files, loaded with ``weights_only=True``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgmrec.data.dataset import RecDataset
from dgmrec.errors import DataError


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write with ``torch.save`` to a temporary file, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError("checkpoint not found", source=str(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise DataError(f"not a loadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                        source=str(path)) from None


def dataset_fingerprint(ds: RecDataset) -> dict[str, Any]:
    """Identity of a dataset for checkpoint checks: sizes, modalities and a hash of splits and mask."""
    h = hashlib.sha1()
    for arr in (ds.train, ds.valid, ds.test, ds.observed.astype(np.uint8)):
        h.update(np.ascontiguousarray(arr).tobytes())
    return {
        "name": ds.name,
        "n_users": int(ds.n_users),
        "n_items": int(ds.n_items),
        "modalities": list(ds.modalities),
        "setting": ds.setting,
        "digest": h.hexdigest(),
    }


def check_fingerprint(saved: dict[str, Any], ds: RecDataset, source: str) -> None:
    now = dataset_fingerprint(ds)
    for key in ("name", "n_users", "n_items", "modalities", "setting", "digest"):
        if saved.get(key) != now[key]:
            what = "content" if key == "digest" else key
            raise DataError(f"checkpoint is from another dataset ({what}: {saved.get(key)!r} vs {now[key]!r})",
                            source=source)
