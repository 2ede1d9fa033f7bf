r"""Content: a training-free content-based baseline (no collaborative signal, no trainable parameter).

Per modality ``m`` of ``content_modalities`` (``all`` or a comma list), the item vectors are the modality's
features after ``content_scaling`` (``standardize`` by default: statistics over the observed rows of the old
items, see :mod:`dgmrec.data.scaling`). A user's profile in ``m`` is the mean vector of their training items
that observe ``m``; the score of item ``i`` for user ``u`` is the mean, over the modalities that ``i``
observes and ``u`` has a profile in, of the cosine between profile and item vector:

.. math:: s(u, i) = \frac{1}{|M_{u,i}|} \sum_{m \in M_{u,i}} \cos(p_{u,m}, x_{i,m}).

Missing rows are *skipped*, never imputed: they neither enter profiles nor get a score in their modality.
An item without any modality in common with the user's profiles (for instance an item missing every modality
used) scores ``LOWEST = -2``, below every cosine average, so it is never ranked above an item with content.

Training: there is nothing to fit. The trainer's optimiser gets no parameter, and :meth:`Content.loss`
reports the BPR loss of the fixed scores on the batch as a tensor that needs no gradient (the trainer takes
no step then); ``epochs: 1`` in ``configs/models/Content.yaml`` so a run is one pass plus one evaluation.
New items need no interaction: their score comes from their content alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from dgmrec.data.scaling import SCALINGS, FeatureScaler
from dgmrec.errors import ConfigError
from dgmrec.losses import bpr_loss
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender

LOWEST = -2.0


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class Content(Recommender):
    """Cosine between a user's mean content profile and the item content, averaged over modalities."""

    name = "Content"
    summary = "content-only floor: cosine between a user's mean content profile and each item's content"
    missing_aware = True  # missing rows are skipped, never imputed
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"content_scaling": SCALINGS}
    min_modalities = 1
    cold_start_capable = False  # every item is scored from its content already (see add_items)

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        names = self._modalities(str(config["content_modalities"]), data.modalities)
        cols = [data.modalities.index(m) for m in names]
        observed = data.observed_np()[:, cols]
        feats = {m: data.features[m].cpu().numpy() for m in names}
        scaler = FeatureScaler.fit(feats, observed, str(config["content_scaling"]), ~data.new_items_np())
        train = data.train.astype(np.float32)
        profiles, items = [], []
        for j, m in enumerate(names):
            x = np.where(observed[:, j, None], scaler.transform(m, feats[m]), 0.0).astype(np.float32)
            counts = np.asarray(train @ observed[:, j].astype(np.float32)).ravel()  # user's items observing m
            profile = np.asarray(train @ x) / np.maximum(counts, 1.0)[:, None]
            profiles.append(np.where(counts[:, None] > 0, _unit_rows(profile), 0.0))
            items.append(_unit_rows(x))
        has_profile = np.stack([np.asarray(train @ observed[:, j].astype(np.float32)).ravel() > 0
                                for j in range(len(names))], axis=1)
        self.content_modalities = names
        self._scaler = scaler
        self._n_added = 0
        # derived from the data on construction: not parameters, not checkpointed
        for key, value in (("user_content", np.hstack(profiles)), ("item_content", np.hstack(items)),
                           ("user_has", has_profile), ("item_has", observed)):
            self.register_buffer(key, torch.as_tensor(np.asarray(value, dtype=np.float32)).to(self.device),
                                 persistent=False)

    @staticmethod
    def _modalities(option: str, available: list[str]) -> list[str]:
        if option.strip() == "all":
            return list(available)
        names = [m.strip() for m in option.split(",") if m.strip()]
        unknown = [m for m in names if m not in available]
        if not names or unknown or len(set(names)) != len(names):
            raise ConfigError(f"key 'content_modalities' must be 'all' or a comma list of distinct modalities of "
                              f"{', '.join(available)}, got {option!r}", source="content_modalities")
        return names

    def _scores(self, num: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return torch.where(count > 0, num / count.clamp_min(1.0), torch.full_like(num, LOWEST))

    def pair_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of the ``(users[k], items[k])`` pairs."""
        num = (self.user_content[users] * self.item_content[items]).sum(1)
        return self._scores(num, (self.user_has[users] * self.item_has[items]).sum(1))

    def loss(self, batch: Batch) -> LossOutput:
        with torch.no_grad():
            bpr = bpr_loss(self.pair_scores(batch.users, batch.pos), self.pair_scores(batch.users, batch.neg))
        return LossOutput(bpr, {"bpr": float(bpr)})

    def prepare_eval(self) -> None:
        """Nothing to compute: the profiles are fixed."""

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        num = self.user_content[users] @ self.item_content.T
        return self._scores(num, self.user_has[users] @ self.item_has.T)

    def add_items(self, features: Mapping[str, torch.Tensor], observed: torch.Tensor,
                  item_features: Mapping[str, torch.Tensor] | None = None) -> None:
        """Items added after training are scored like every other item: from their (scaled) content."""
        cols = [self.modalities.index(m) for m in self.content_modalities]
        obs = observed[:, cols].cpu().numpy().astype(bool)
        rows = [_unit_rows(np.where(obs[:, j, None], self._scaler.transform(m, features[m].cpu().numpy()), 0.0))
                for j, m in enumerate(self.content_modalities)]
        self.item_content = torch.cat([self.item_content, torch.as_tensor(np.hstack(rows), device=self.device)])
        self.item_has = torch.cat([self.item_has, torch.as_tensor(obs, dtype=torch.float32, device=self.device)])
        self._n_added += len(obs)

    @property
    def n_added_items(self) -> int:
        return self._n_added
