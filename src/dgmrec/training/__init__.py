"""Training: negative sampling, the trainer loop, checkpoints."""

from dgmrec.training.sampler import NegativeSampler
from dgmrec.training.trainer import EarlyStopper, Trainer, TrainResult, resolve_device, seed_everything

__all__ = ["EarlyStopper", "NegativeSampler", "TrainResult", "Trainer", "resolve_device", "seed_everything"]
