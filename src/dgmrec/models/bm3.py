r"""BM3 (Zhou et al., WWW 2023): bootstrapped multimodal recommendation without negative sampling.

A LightGCN "online" embedding is passed through a shared predictor and pulled (cosine) towards a
dropout-perturbed, stop-gradient copy of itself (user <-> item), and projected modality features are pulled
towards the item target and towards their own perturbed copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.graphs import SparseOp, lightgcn_propagate, normalized_adjacency
from dgmrec.losses import dropout, emb_norm, negative_cosine
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender

MASK_MODES = ("auto", "zero_proj", "exclude_rows", "none")
_CHOICES = {"bm3_mask_mode": MASK_MODES}


class BM3(Recommender):
    """BM3 for any number ``M >= 1`` of modalities.

    Architecture
    ------------
    ``[H_u; H_i] = LightGCN(E_u, E_i)`` (``n_ui_layers``, ``D^-1/2 A D^-1/2`` with ``+1e-7``, mean over layers incl.
    the ego layer), then ``H_i <- H_i + E_i``. Per modality a *trainable* feature table ``T_m`` initialised from the
    imputed features and ``trs_m: Linear(d_m -> d)``; ``F_m = trs_m(T_m)``. One predictor ``pred: Linear(d -> d)``
    is shared by users, items and every modality. Score ``pred(h_u) . pred(h_i)`` (features do not enter scoring).
    Xavier-uniform ``E``, Xavier-normal weights of ``pred`` and ``trs_m`` (default biases).

    Loss
    ----
    On a batch of users and their positive items (no negatives, ``use_neg_sampling`` off), with stop-gradient
    targets ``~x = dropout_p(x)`` (dropout always in training mode)::

        L = [1 - cos(pred(h_u), ~h_i)] + [1 - cos(pred(h_i), ~h_u)] + reg_weight * (||H_u|| + ||H_i||) / I
            + cl_weight * sum_m ([1 - cos(pred(f_m), ~h_i)] + [1 - cos(pred(f_m), ~f_m)])

    with batch means of the cosines and unsquared Frobenius norms of the *full* tables in the regulariser.
    Only the batch's rows are projected and predicted (identical values and gradients, much cheaper than the
    release's full-table projection; the dropout masks of duplicated batch rows are drawn independently).

    Missing modalities
    ------------------
    Imputed features plus ``bm3_mask_mode``. In the new-item setting the ID embeddings of new items start at zero
    (release behaviour) and stay zero (they never receive a gradient), so new items are scored by ``pred``'s bias.

    Options (departures)
    --------------------
    ``bm3_mask_mode``
        ``zero_proj``: projected features of items missing the modality are zeroed, the rows stay in the modality
        losses (bias-only prediction, constant 1 in the self term; the release's two-modality path).
        ``exclude_rows``: those rows are left out of the two modality losses instead. ``none``: no masking (the
        release's three-modality path). ``auto`` (default): the release -- ``zero_proj`` for two modalities,
        ``none`` otherwise.

    The release's three-modality path leaves the audio projection at PyTorch's default initialisation (a typo
    re-initialises the text one); here every projection is Xavier-normal.
    """

    name = "BM3"
    summary = "bootstrapped LightGCN pulled to perturbed copies of itself and the features, no negatives (WWW 2023)"
    missing_aware = True
    choices = _CHOICES

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        mode = str(config["bm3_mask_mode"])
        M = data.n_modalities
        if mode == "auto":
            mode = "zero_proj" if M == 2 else "none"
        self.mask_mode = mode
        d = int(config["embedding_size"])
        self.d = d
        self.M = M
        self.n_layers = int(config["n_ui_layers"])
        self.reg_weight = float(config["reg_weight"])
        self.cl_weight = float(config["cl_weight"])
        self.dropout = float(config["dropout"])
        self.adj = SparseOp(normalized_adjacency(data.train, eps=1e-7), data.device)

        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        item = nn.init.xavier_uniform_(torch.empty(self.n_items, d))
        if data.setting == "new-items" and data.new_items is not None:
            item[data.new_items.cpu()] = 0.0
        self.item_embedding = nn.Parameter(item)
        self.predictor = nn.Linear(d, d)
        nn.init.xavier_normal_(self.predictor.weight)
        self.features = nn.ParameterList(nn.Parameter(data.features[m].detach().clone().float())
                                         for m in self.modalities)
        self.projections = nn.ModuleList(nn.Linear(int(data.features[m].shape[1]), d) for m in self.modalities)
        for layer in self.projections:
            nn.init.xavier_normal_(layer.weight)
        self.register_buffer("observed", data.observed.clone(), persistent=False)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Online embeddings ``H_u`` and ``H_i`` (with the residual item ID embedding)."""
        ego = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        out = lightgcn_propagate(self.adj, ego, self.n_layers)
        return out[: self.n_users], out[self.n_users:] + self.item_embedding

    def loss(self, batch: Batch) -> LossOutput:
        h_u, h_i = self.propagate()
        users, items = batch.users, batch.pos
        B = len(items)
        u = F.embedding(users, h_u)
        i = F.embedding(items, h_i)
        observed = F.embedding(items, self.observed.float()) > 0  # (B, M)
        feats = []
        for j in range(self.M):
            f = self.projections[j](F.embedding(items, self.features[j]))
            if self.mask_mode == "zero_proj":
                f = f * observed[:, j : j + 1]
            feats.append(f)
        # one predictor pass over users, items and every modality's rows
        online = self.predictor(torch.cat([u, i, *feats], dim=0)).split(B)
        with torch.no_grad():
            u_target = dropout(u, self.dropout)
            i_target = dropout(i, self.dropout)
        loss_ui = negative_cosine(online[0], i_target)
        loss_iu = negative_cosine(online[1], u_target)
        reg = self.reg_weight * emb_norm(h_u, h_i)
        modal = h_u.new_zeros(())
        for j in range(self.M):
            rows = observed[:, j] if self.mask_mode == "exclude_rows" else None
            with torch.no_grad():
                f_target = dropout(feats[j], self.dropout)
            modal = modal + negative_cosine(online[2 + j], i_target, rows) + negative_cosine(online[2 + j], f_target,
                                                                                             rows)
        cl = self.cl_weight * modal
        total = loss_ui + loss_iu + reg + cl
        return LossOutput(total, {"ui": float((loss_ui + loss_iu).detach()), "reg": float(reg.detach()),
                                  "cl": float(cl.detach())})

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        h_u, h_i = self.propagate()
        return self.predictor(h_u), self.predictor(h_i)
