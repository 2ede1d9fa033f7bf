"""MF-BPR: matrix factorisation trained with BPR (the simplest collaborative-filtering reference).

Score ``p_u . q_i``; loss ``BPR + reg_weight * (||p_u|| + ||q_pos|| + ||q_neg||) / B`` (unsquared norms, the
reference ``EmbLoss``; BPR with ``1e-10`` inside the log).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.losses import bpr_loss, emb_norm
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender


class MFBPR(Recommender):
    """Matrix factorisation with Xavier-initialised user and item factors."""

    name = "MFBPR"
    summary = "matrix factorisation trained with BPR; no item features"
    uses_features = False

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        d = int(config["embedding_size"])
        self.reg_weight = float(config["reg_weight"])
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))

    def loss(self, batch: Batch) -> LossOutput:
        u = F.embedding(batch.users, self.user_embedding)
        p = F.embedding(batch.pos, self.item_embedding)
        n = F.embedding(batch.neg, self.item_embedding)
        bpr = bpr_loss((u * p).sum(1), (u * n).sum(1), eps=1e-10)
        reg = self.reg_weight * emb_norm(u, p, n)
        return LossOutput(bpr + reg, {"bpr": float(bpr.detach()), "reg": float(reg.detach())})

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding, self.item_embedding
