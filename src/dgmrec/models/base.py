"""The model interface every recommender implements, and the input the trainer hands to it.

Hooks (all optional, with no-op defaults) are called by the trainer in this order per epoch::

    before_epoch(epoch)            # e.g. DGMRec's generation of missing features and graph refresh
    loss(batch) -> LossOutput      # for every mini-batch
    after_epoch(epoch)
    before_evaluation(epoch)       # e.g. new-item generation; then prepare_eval() and score_users(...)

``prepare_eval()`` computes everything that only depends on the parameters once per evaluation pass;
``score_users(users)`` then returns a ``(len(users), n_items)`` score matrix. State that is not a parameter or
buffer but must survive a checkpoint (rebuilt graphs, counters) goes through ``get_extra_state`` /
``set_extra_state`` as plain tensors, so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.data.dataset import RecDataset
from dgmrec.data.impute import impute_features
from dgmrec.errors import ConfigError
from dgmrec.losses import bpr_loss


@dataclass
class ModelInput:
    """Everything a model may use: sizes, the training graph, imputed features and the observed mask."""

    n_users: int
    n_items: int
    train: sp.csr_matrix
    modalities: list[str]
    features: dict[str, torch.Tensor]  # imputed, float32, (n_items, d_m)
    observed: torch.Tensor  # bool (n_items, M)
    new_items: torch.Tensor | None = None  # bool (n_items,)
    setting: str = "missing"
    dataset_name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_dataset(cls, ds: RecDataset, imputation: str = "mean",
                     device: torch.device | str = "cpu") -> ModelInput:
        device = torch.device(device)
        ref = ~ds.new_items if ds.new_items is not None else None
        imputed = impute_features(ds.features, ds.observed, imputation, reference_items=ref)
        return cls(
            n_users=ds.n_users,
            n_items=ds.n_items,
            train=ds.train_matrix(),
            modalities=ds.modalities,
            features={m: torch.from_numpy(x).to(device) for m, x in imputed.items()},
            observed=torch.from_numpy(ds.observed.copy()).to(device),
            new_items=None if ds.new_items is None else torch.from_numpy(ds.new_items.copy()).to(device),
            setting=ds.setting,
            dataset_name=ds.name,
            device=device,
        )

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    @property
    def missing_setting(self) -> bool:
        """True when some modality is unobserved for some item."""
        return bool((~self.observed).any())

    def observed_np(self) -> np.ndarray:
        return self.observed.cpu().numpy()

    def new_items_np(self) -> np.ndarray:
        if self.new_items is None:
            return np.zeros(self.n_items, dtype=bool)
        return self.new_items.cpu().numpy()


@dataclass
class Batch:
    """A training mini-batch: users, their positive items and one sampled negative each."""

    users: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor


@dataclass
class LossOutput:
    """Total loss plus named components (floats, for the log)."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class Recommender(nn.Module):
    """Base class: subclasses set ``name`` and implement ``loss``, ``prepare_eval`` and ``score_users``.

    Class attributes
    ----------------
    name: registry name (``--model``).
    uses_features: whether the model reads modality features.
    """

    name: ClassVar[str] = ""
    uses_features: ClassVar[bool] = True
    #: string options and their allowed values, checked on construction
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: the fewest modalities the model works with
    min_modalities: ClassVar[int] = 0

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__()
        for key, allowed in self.choices.items():
            if str(config[key]) not in allowed:
                raise ConfigError(f"key '{key}' must be one of {', '.join(allowed)}, got {config[key]!r}",
                                  source=key)
        if data.n_modalities < self.min_modalities:
            raise ConfigError(f"{self.name} needs at least {self.min_modalities} modalities", source="--modalities")
        self._eval_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n_users = data.n_users
        self.n_items = data.n_items
        self.modalities = list(data.modalities)
        self.config = dict(config)
        self.device = data.device

    # ---------------------------------------------------------------- required
    def loss(self, batch: Batch) -> LossOutput:
        raise NotImplementedError

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """User and item representations whose dot product is the score (for the default scoring)."""
        raise NotImplementedError

    def prepare_eval(self) -> None:
        """Compute and cache the final user/item representations for a whole evaluation pass."""
        with torch.no_grad():
            self._eval_cache = self.final_embeddings()

    def score_users(self, users: torch.Tensor, items: slice | None = None) -> torch.Tensor:
        """Scores of every item (or of the items of the slice ``items``) for ``users`` (call :meth:`prepare_eval`
        first). The evaluation asks for item slices when the catalogue is large."""
        if self._eval_cache is None:
            raise RuntimeError("call prepare_eval() before score_users()")
        user_rep, item_rep = self._eval_cache
        return user_rep[users] @ (item_rep if items is None else item_rep[items]).T

    def train(self, mode: bool = True) -> Recommender:
        self._eval_cache = None  # parameters are about to change
        return super().train(mode)

    # ------------------------------------------------------------------- hooks
    def before_epoch(self, epoch: int) -> dict[str, float] | None:
        """Called before each training epoch; may return numbers for the log."""
        return None

    def after_epoch(self, epoch: int) -> dict[str, float] | None:
        return None

    def before_evaluation(self, epoch: int) -> None:
        """Called before each evaluation pass (before :meth:`prepare_eval`)."""

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of the trainer's optimiser (``torch.optim`` format; a group may set its own ``lr``).

        Default: one group with every trainable parameter. A model whose auxiliary parts are trained by an
        optimiser of its own (DGMRec's CLUB estimators) leaves them out here.
        """
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # ------------------------------------------------------------ generation
    def completed_features(self) -> dict[str, torch.Tensor] | None:
        """Feature tables with generated rows for missing items (models that generate), else None."""
        return None

    def generate_for_retrieval(self) -> dict[str, torch.Tensor] | None:
        """Generated raw features for *every* item and modality (for cross-modal retrieval), else None."""
        return None

    def generation_inputs(self) -> dict[str, torch.Tensor] | None:
        """What a generating model decodes into :meth:`generate_for_retrieval`'s features, else None."""
        return None

    # ------------------------------------------------------------ extra state
    def get_extra_state(self) -> dict[str, Any]:
        return {}

    def set_extra_state(self, state: Any) -> None:
        return None


class NodeTableRecommender(Recommender):
    """A model whose forward pass is one ``(U + I) x D`` table of user and item rows (MMGCN, GRCN).

    The loss is BPR on the table's rows plus ``reg_weight * (mean(E_id[u]^2) + (mean(E_id[i+]^2) +
    mean(E_id[i-]^2)) / 2 + extra_reg(batch))`` over the batch's ID embeddings; ``use_stale_cache`` scores with
    the table of the last training step, as the references do, instead of recomputing it. Subclasses set
    ``id_embedding``, ``reg_weight`` and ``use_stale_cache`` and implement ``forward_all`` and ``extra_reg``.
    """

    id_embedding: torch.Tensor
    reg_weight: float
    use_stale_cache: bool
    _stale: torch.Tensor | None = None  # the last training forward (use_stale_cache)

    def forward_all(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_reg(self, batch: Batch) -> torch.Tensor:
        """The model's own regulariser (added to the ID-embedding penalty before ``reg_weight``)."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> LossOutput:
        z = self.forward_all()
        if self.use_stale_cache:
            self._stale = z.detach().float()  # scores in float32 also after a mixed-precision step
        u = F.embedding(batch.users, z)
        pos, neg = F.embedding(torch.cat([batch.pos, batch.neg]) + self.n_users, z).split(len(batch.pos))
        parts = {"bpr": bpr_loss((u * pos).sum(1), (u * neg).sum(1))}
        if self.reg_weight:
            ids = self.id_embedding
            reg = ids[batch.users].pow(2).mean() + 0.5 * (ids[batch.pos + self.n_users].pow(2).mean()
                                                          + ids[batch.neg + self.n_users].pow(2).mean())
            parts["reg"] = self.reg_weight * (reg + self.extra_reg(batch))
        total = sum(parts.values())
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._stale if self.use_stale_cache and self._stale is not None else self.forward_all()
        return z[: self.n_users], z[self.n_users:]
