"""dgmrec: multimodal recommendation when item modalities are missing.

Public API (see :mod:`dgmrec.api`): :func:`load_dataset`, :func:`train`, :func:`load_run`,
:func:`recommend`, :func:`generate`; models are listed by :func:`dgmrec.models.available_models`.
"""

from dgmrec.api import generate, load_dataset, load_run, recommend, train
from dgmrec.data.dataset import RecDataset
from dgmrec.errors import ConfigError, DataError, InputError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "InputError", "RecDataset", "generate", "load_dataset", "load_run",
           "recommend", "train"]
