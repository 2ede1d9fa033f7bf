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
from dgmrec.data.impute import FeatureOptions, prepare_features
from dgmrec.errors import ConfigError, DataError, InputError
from dgmrec.losses import bpr_loss
from dgmrec.models.coldstart import ColdStart, ColdStartOptions


def cold_demand(ds: RecDataset) -> float | None:
    """Share of the validation interactions on new items (None outside the new-item setting or without any)."""
    if ds.new_items is None or len(ds.valid) == 0:
        return None
    share = float(np.asarray(ds.new_items, dtype=bool)[ds.valid[:, 1]].mean())
    return share if share > 0 else None


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
    #: share of the validation interactions that fall on new items (new-item setting; cold-start ``demand``)
    cold_demand: float | None = None
    setting: str = "missing"
    dataset_name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_dataset(cls, ds: RecDataset, imputation: str = "mean", device: torch.device | str = "cpu",
                     config: Mapping[str, Any] | None = None) -> ModelInput:
        """The model input of ``ds``, features scaled and imputed (:func:`dgmrec.data.impute.prepare_features`).

        ``config`` (a resolved configuration) sets every feature option (``missing_imputation``,
        ``imputation_k``, ``imputation_steps``, ``feature_scaling``); without it, ``imputation`` with the
        other options at their defaults.
        """
        device = torch.device(device)
        options = FeatureOptions.from_config(config) if config is not None else FeatureOptions(imputation)
        imputed = prepare_features(ds, options)
        return cls(
            n_users=ds.n_users,
            n_items=ds.n_items,
            train=ds.train_matrix(),
            modalities=ds.modalities,
            features={m: torch.from_numpy(x).to(device) for m, x in imputed.items()},
            observed=torch.from_numpy(ds.observed.copy()).to(device),
            new_items=None if ds.new_items is None else torch.from_numpy(ds.new_items.copy()).to(device),
            cold_demand=cold_demand(ds),
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
    summary: one line saying what the model is (``dgmrec models``).
    uses_features: whether the model reads modality features (without, it trains on a folder with none).
    missing_aware: whether the model treats missing modalities itself (beyond the initial imputation).
    generates: whether the model generates features for missing modalities (``dgmrec generate``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    uses_features: ClassVar[bool] = True
    missing_aware: ClassVar[bool] = False
    generates: ClassVar[bool] = False
    #: string options and their allowed values, checked on construction
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: the fewest modalities the model works with
    min_modalities: ClassVar[int] = 0
    #: whether cold items (new items, items added after training) can be given representations generated from
    #: their content (``cold_start`` options, :meth:`add_items`): models that read features and score with the
    #: dot product of :meth:`final_embeddings`
    cold_start_capable: ClassVar[bool] = True

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__()
        for key, allowed in self.choices.items():
            if str(config[key]) not in allowed:
                raise ConfigError(f"key '{key}' must be one of {', '.join(allowed)}, got {config[key]!r}",
                                  source=key)
        if self.uses_features and data.n_modalities == 0:
            raise DataError(f"{self.name} needs item features and the dataset has none (no <modality>_feat.npy "
                            "files); the models that use no features (`dgmrec models`) train on it", source="--data")
        if data.n_modalities < self.min_modalities:
            raise ConfigError(f"{self.name} needs at least {self.min_modalities} modalities", source="--modalities")
        self._eval_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n_users = data.n_users
        self.n_items = data.n_items
        self.modalities = list(data.modalities)
        self.config = dict(config)
        self.device = data.device
        self.cold_start = self._cold_start(data, config)

    # ---------------------------------------------------------------- required
    def loss(self, batch: Batch) -> LossOutput:
        raise NotImplementedError

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """User and item representations whose dot product is the score (for the default scoring)."""
        raise NotImplementedError

    def prepare_eval(self) -> None:
        """Compute and cache the final user/item representations for a whole evaluation pass (cold items'
        rows generated from their content when the ``cold_start`` options or :meth:`add_items` ask for it)."""
        with torch.no_grad():
            users, items = self.final_embeddings()
            if self.cold_start is not None:
                items = self.cold_start.complete(users, items, self._trained_items)
            self._eval_cache = users, items

    def score_users(self, users: torch.Tensor, items: slice | None = None) -> torch.Tensor:
        """Scores of every item (or of the items of the slice ``items``) for ``users`` (call :meth:`prepare_eval`
        first). The evaluation asks for item slices when the catalogue is large."""
        if self._eval_cache is None:
            raise RuntimeError("call prepare_eval() before score_users()")
        user_rep, item_rep = self._eval_cache
        return user_rep[users] @ (item_rep if items is None else item_rep[items]).T

    def eval_representations(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``(n_users, d)`` user and ``(n_items, d)`` item representations that the default
        :meth:`score_users` multiplies (items added with :meth:`add_items` included), as cached by the last
        :meth:`prepare_eval`; None when nothing is cached (before :meth:`prepare_eval`, or after training or
        :meth:`add_items` changed the model). The tensors are the cache itself: copy them before changing them."""
        return self._eval_cache

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

    # ------------------------------------------------------------ cold start
    def _cold_start(self, data: ModelInput, config: Mapping[str, Any]) -> ColdStart | None:
        options = ColdStartOptions.from_config(config)
        if not (self.uses_features and self.cold_start_capable):
            if options.method != "none":
                raise ConfigError(f"{self.name} has no cold-start path; use cold_start: none", source="cold_start")
            return None
        self._trained_items = torch.as_tensor(np.asarray(data.train.getnnz(axis=0) > 0).ravel(), device=self.device)
        cold = data.new_items if data.new_items is not None else torch.zeros(data.n_items, dtype=torch.bool)
        # the item features are kept for the cold path only when it is on (add_items can hand them over later)
        features = [data.features[m] for m in data.modalities] if options.method != "none" else None
        return ColdStart(options, features, data.observed, cold.to(self.device), demand=data.cold_demand,
                         seen=data.train)

    def add_items(self, features: Mapping[str, torch.Tensor], observed: torch.Tensor,
                  item_features: Mapping[str, torch.Tensor] | None = None) -> None:
        """Make items added after training scorable: they get ids ``n_items, n_items + 1, ...`` in the score matrix.

        ``features`` maps every modality to a float ``(n, d_m)`` matrix in the model's feature space with every
        unobserved row imputed; ``observed`` is the bool ``(n, M)`` mask. Models with a cold-start path
        generate the items' representations from their content (:mod:`dgmrec.models.coldstart`); a model built
        with ``cold_start: none`` needs ``item_features``, the features of its own items (``ModelInput``'s),
        the first time (see ``needs_item_features``).
        """
        if self.cold_start is None:
            raise InputError(f"{self.name} cannot score items added after training (it has no cold-start path "
                             f"from item content)", source="add_items")
        if item_features is not None and self.cold_start.needs_item_features:
            self.cold_start.set_item_features([item_features[m].to(self.device).float() for m in self.modalities])
        self.cold_start.add([features[m].to(self.device).float() for m in self.modalities], observed.to(self.device))
        self._eval_cache = None

    def added_generated_features(self) -> dict[str, torch.Tensor] | None:
        """Completed features (model space) of the added items, for models that generate missing modalities."""
        return None

    @property
    def n_added_items(self) -> int:
        """Items added after training (:meth:`add_items`)."""
        return 0 if self.cold_start is None else self.cold_start.n_added

    @property
    def needs_item_features(self) -> bool:
        """Whether the first :meth:`add_items` call must hand over the model's own item features."""
        return self.cold_start is not None and self.cold_start.needs_item_features

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
            reg = F.embedding(batch.users, ids).pow(2).mean() + 0.5 * (
                F.embedding(batch.pos + self.n_users, ids).pow(2).mean()
                + F.embedding(batch.neg + self.n_users, ids).pow(2).mean())
            parts["reg"] = self.reg_weight * (reg + self.extra_reg(batch))
        total = sum(parts.values())
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._stale if self.use_stale_cache and self._stale is not None else self.forward_all()
        return z[: self.n_users], z[self.n_users:]
