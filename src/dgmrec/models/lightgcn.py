r"""LightGCN (He et al., SIGIR 2020): ID embeddings propagated on the normalised user-item graph.

.. math::  E^{(l+1)} = \hat A E^{(l)}, \qquad E = \frac{1}{L+1}\sum_{l=0}^{L} E^{(l)}, \qquad
           \hat y_{ui} = e_u^\top e_i

Loss: BPR on the propagated embeddings plus ``reg_weight`` times the unsquared norms of the batch's layer-0
embeddings divided by the batch size (the reference ``EmbLoss``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.graphs import SparseOp, lightgcn_propagate, normalized_adjacency
from dgmrec.losses import bpr_loss, emb_norm
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender


class LightGCN(Recommender):
    """LightGCN with ``n_ui_layers`` propagation layers; ignores modality features."""

    name = "LightGCN"
    summary = "ID embeddings propagated on the user-item graph; no item features (SIGIR 2020)"
    uses_features = False

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        d = int(config["embedding_size"])
        self.n_layers = int(config["n_ui_layers"])
        self.reg_weight = float(config["reg_weight"])
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.adj = SparseOp(normalized_adjacency(data.train, eps=1e-7), data.device)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        ego = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        out = lightgcn_propagate(self.adj, ego, self.n_layers)
        return out[: self.n_users], out[self.n_users:]

    def loss(self, batch: Batch) -> LossOutput:
        users, items = self.propagate()
        # F.embedding, not ``t[idx]``: its CPU backward is deterministic under threads (and faster)
        u = F.embedding(batch.users, users)
        pos = (u * F.embedding(batch.pos, items)).sum(1)
        neg = (u * F.embedding(batch.neg, items)).sum(1)
        if self.reg_weight:
            bpr = bpr_loss(pos, neg, eps=1e-10)
            reg = self.reg_weight * emb_norm(F.embedding(batch.users, self.user_embedding),
                                             F.embedding(batch.pos, self.item_embedding),
                                             F.embedding(batch.neg, self.item_embedding))
        else:
            bpr = bpr_loss(pos, neg)
            reg = torch.zeros((), device=pos.device)
        return LossOutput(bpr + reg, {"bpr": float(bpr.detach()), "reg": float(reg.detach())})

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.propagate()
