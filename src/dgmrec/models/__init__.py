"""Model registry: every recommender registers under its ``name``, and the factory that builds one.

>>> from dgmrec.models import available_models, build_model
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any

import torch

from dgmrec.data.dataset import RecDataset
from dgmrec.errors import ConfigError
from dgmrec.knn import set_knn_options
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender

# name -> module; imported lazily so that one model's import cost is not paid by the others
_REGISTRY: dict[str, str] = {
    "DGMRec": "dgmrec.models.dgmrec",
    "LightGCN": "dgmrec.models.lightgcn",
    "MFBPR": "dgmrec.models.mfbpr",
    "VBPR": "dgmrec.models.vbpr",
    "MMGCN": "dgmrec.models.mmgcn",
    "GRCN": "dgmrec.models.grcn",
    "SLMRec": "dgmrec.models.slmrec",
    "BM3": "dgmrec.models.bm3",
    "LATTICE": "dgmrec.models.lattice",
    "MGCN": "dgmrec.models.mgcn",
    "LGMRec": "dgmrec.models.lgmrec",
    "DAMRS": "dgmrec.models.damrs",
    "GUME": "dgmrec.models.gume",
    "MILK": "dgmrec.models.milk",
    "SIBRAR": "dgmrec.models.sibrar",
    "CI2MG": "dgmrec.models.ci2mg",
    "Content": "dgmrec.models.content",
}


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_models() -> list[str]:
    """Registered models whose implementation is installed."""
    return sorted(name for name, module in _REGISTRY.items() if _module_exists(module))


def canonical_name(name: str) -> str:
    names = available_models()
    key = name.lower().replace("-", "").replace("_", "")
    lookup = {k.lower().replace("-", "").replace("_", ""): k for k in names}
    if key not in lookup:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(available_models())}",
                          source="--model")
    return lookup[key]


def get_model_class(name: str) -> type[Recommender]:
    name = canonical_name(name)
    module = importlib.import_module(_REGISTRY[name])
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Recommender) and getattr(obj, "name", "") == name:
            return obj
    raise ConfigError(f"model module {_REGISTRY[name]} defines no model named {name}")


def build_model(name: str, ds: RecDataset, config: Mapping[str, Any],
                device: torch.device | str = "cpu") -> Recommender:
    """The model ``name`` on ``ds`` with ``config``, on ``device``.

    Parameters are initialised from torch's global generator: seed it first (``training.seed_everything``) for
    a reproducible model.
    """
    cls = get_model_class(name)
    set_knn_options(config)  # how the model's kNN graphs are searched (dgmrec.knn)
    data = ModelInput.from_dataset(ds, device=device, config=config)
    return cls(data, config).to(device)


__all__ = ["Batch", "LossOutput", "ModelInput", "Recommender", "available_models", "build_model",
           "canonical_name", "get_model_class"]
