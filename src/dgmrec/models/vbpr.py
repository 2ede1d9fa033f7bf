r"""VBPR (He & McAuley, AAAI 2016): BPR matrix factorisation with a content-projected half of every item vector.

.. math::  e_i = [\, q_i \,\|\, W f_i + b \,] \in \mathbb{R}^{2d}, \qquad \hat y_{ui} = p_u^\top e_i,
           \quad p_u \in \mathbb{R}^{2d}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.errors import ConfigError
from dgmrec.losses import bpr_loss, emb_norm
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender


def select_modalities(spec: str, modalities: list[str]) -> list[int]:
    """Positions of the modalities named by ``vbpr_modalities``.

    ``reference``: the second modality of the data's canonical order (image, text, audio, ...), the table the
    DGMRec release feeds to VBPR (text on Amazon and on three-modality TikTok, audio for TikTok as image+audio);
    ``all``: every modality in data order; otherwise a comma-separated list of modality names.
    """
    if spec == "reference":
        if len(modalities) < 2:
            raise ConfigError("vbpr_modalities=reference needs at least two modalities", source="vbpr_modalities")
        return [1]
    if spec == "all":
        return list(range(len(modalities)))
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in modalities]
    if not names or unknown:
        raise ConfigError(f"vbpr_modalities must be reference, all or names among {', '.join(modalities)}; "
                          f"got {spec!r}", source="vbpr_modalities")
    return [modalities.index(n) for n in names]


class VBPR(Recommender):
    """Visual BPR: a free ID factor plus a linear projection of frozen content features per item.

    Architecture
    ------------
    Users have one factor ``p_u`` of width ``2d``; items have an ID factor ``q_i`` (width ``d``) concatenated with
    ``W f_i + b`` (width ``d``), where ``f_i`` is the item's row of the selected feature table(s). ``P`` and ``Q``
    are Xavier-uniform, ``W`` Xavier-normal with a zero bias. Features are a frozen buffer (not trained).

    Loss
    ----
    ``BPR(s+, s-)`` in log-sigmoid form (no epsilon) plus ``reg_weight`` times the unsquared norms of the batch's
    user vectors and *full* (ID and projected) positive and negative item vectors, divided by the batch size.

    Missing modalities
    ------------------
    Only through the data layer's imputation (mean of observed rows); the observed mask is not used otherwise.
    New items keep their untrained random ID factor; their projected half comes from their (imputed) features.

    Options (departures)
    --------------------
    ``vbpr_modalities``
        ``reference`` (default, DGMRec release): a single table, the second modality of the data order (the
        release's "text" slot). ``all``: the concatenation of every modality in data order (MMRec concatenates
        text and image; the original paper uses visual features). Or an explicit comma-separated list of names.
    """

    name = "VBPR"
    summary = "BPR matrix factorisation plus a linear projection of the content features (AAAI 2016)"

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        d = int(config["embedding_size"])
        self.reg_weight = float(config["reg_weight"])
        chosen = select_modalities(str(config["vbpr_modalities"]), self.modalities)
        self.used_modalities = [self.modalities[j] for j in chosen]
        feats = torch.cat([data.features[m].float() for m in self.used_modalities], dim=1)
        self.register_buffer("content", feats.contiguous(), persistent=False)
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, 2 * d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.item_linear = nn.Linear(feats.shape[1], d)
        nn.init.xavier_normal_(self.item_linear.weight)
        nn.init.zeros_(self.item_linear.bias)

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """``[q_i || W f_i + b]`` for ``items`` (every item when None)."""
        if items is None:
            return torch.cat([self.item_embedding, self.item_linear(self.content)], dim=1)
        content = self.item_linear(F.embedding(items, self.content))
        return torch.cat([F.embedding(items, self.item_embedding), content], dim=1)

    def loss(self, batch: Batch) -> LossOutput:
        u = F.embedding(batch.users, self.user_embedding)
        both = self.item_vectors(torch.cat([batch.pos, batch.neg]))
        p, n = both.split(len(batch.pos))
        bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
        reg = self.reg_weight * emb_norm(u, p, n)
        return LossOutput(bpr + reg, {"bpr": float(bpr.detach()), "reg": float(reg.detach())})

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding, self.item_vectors()
