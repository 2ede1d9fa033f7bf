"""dgmrec: multimodal recommendation when item modalities are missing.

Public API (see :mod:`dgmrec.api`): :func:`load_dataset`, :func:`train`, :func:`load_run`,
:func:`recommend`, :func:`generate`, :class:`DatasetSpec`; models are listed by
:func:`dgmrec.models.available_models`.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets a policy: OpenMP
threads that spin while waiting for a descheduled sibling make training collapse on a machine where other work
runs too (an order of magnitude slower per epoch). It takes effect only when PyTorch is imported after
``dgmrec``, as the command line and ``import dgmrec`` do.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dgmrec.api import generate, load_dataset, load_run, recommend, train
from dgmrec.data.dataset import RecDataset
from dgmrec.data.spec import DatasetSpec
from dgmrec.errors import ConfigError, DataError, InputError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "DatasetSpec", "InputError", "RecDataset", "generate", "load_dataset",
           "load_run", "recommend", "train"]
