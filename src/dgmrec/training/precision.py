"""Numerical precision of the training step (``precision`` configuration key) and the CPU thread count.

``fp32`` runs everything in float32. ``bf16`` runs each training step's forward pass (the model's ``loss``)
under :func:`torch.autocast` with bfloat16: matrix products, linear layers and convolutions take bfloat16
inputs (on CPUs with AVX-512 BF16 or AMX, and on CUDA), element-wise work, reductions and sparse products stay
float32. ``fp16`` (CUDA only) does the same with float16 and a :class:`torch.amp.GradScaler` that scales the
loss so that small gradients do not underflow. In every mode the parameters, their gradients and the optimiser
state stay float32, and the model's epoch hooks (``before_epoch``, ``after_epoch``) run in float32.

Evaluation always scores in float32 (see :meth:`Precision.evaluation`): bfloat16 keeps 8 significant bits, so
at the magnitudes scores take (|s| ~ 1-10) items closer than ~1 % of the score would tie, and the top-K lists of
the full-ranking protocol would depend on how ties are broken rather than on the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from dgmrec.config import CHOICES
from dgmrec.errors import ConfigError

PRECISIONS = CHOICES["precision"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_threads(config: Mapping[str, Any]) -> None:
    """``torch.set_num_threads(config["threads"])`` when it is positive (0 keeps PyTorch's default)."""
    threads = int(config.get("threads", 0) or 0)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class Precision:
    """Autocast region and loss scaling of one run (``name`` in :data:`PRECISIONS`) on ``device``."""

    def __init__(self, name: str, device: torch.device | str) -> None:
        if name not in PRECISIONS:
            raise ConfigError(f"key 'precision' must be one of {', '.join(PRECISIONS)}, got {name!r}",
                              source="precision")
        self.device = torch.device(device)
        if name == "fp16" and self.device.type != "cuda":
            raise ConfigError("fp16 needs a CUDA device; use bf16 on the CPU", source="precision")
        self.name = name
        self.dtype = _DTYPES.get(name, torch.float32)
        self.scaler = torch.amp.GradScaler(self.device.type) if name == "fp16" else None

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The region of a training step's forward pass (a no-op in fp32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """The evaluation pass: float32 throughout, whatever the training precision (no autocast)."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser step (with fp16: unscale, skip the step on inf/NaN gradients, update the scale)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load(self, state: Mapping[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(dict(state))
