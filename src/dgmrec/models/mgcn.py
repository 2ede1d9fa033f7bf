r"""MGCN (Yu et al., ACM MM 2023): multi-view graph convolutional network for multimedia recommendation.

A behaviour-guided purifier gates the item ID embedding with each projected modality feature; each purified view
is smoothed on a fixed modality kNN graph and lifted to users; a behaviour-aware fuser splits the views into an
attention-weighted common part and preference-gated specific parts:

.. math::  \tilde E_m = E_i \odot \sigma(g_m(t_m(T_m))), \quad H_m = [R_{sym} O_m^{n} \tilde E_m;\ O_m^{n}\tilde E_m],
           \quad Z = C + \frac{1}{M+1}\Big(\bar H + \sum_m \sigma(p_m(C)) \odot (H_m - \bar H)\Big)

with ``C`` the LightGCN view and ``bar H = sum_m beta_m H_m`` (``beta = softmax_m(query(H_m))`` per node).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.graphs import SparseOp, knn_graph, lightgcn_propagate, normalized_adjacency
from dgmrec.losses import bpr_loss, info_nce, sq_reg
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender


class MGCN(Recommender):
    """Multi-View Graph Convolutional Network for any number ``M >= 1`` of modalities.

    Architecture
    ------------
    * Fixed graphs (built once from the imputed features): ``O_m = SymRow(kNN_k(cos(X_m)))`` (similarities kept)
      with the items missing modality ``m`` isolated *before* the top-k: they keep only a self-loop and observed
      items get ``k`` observed neighbours.
    * Purifier: ``E~_m = E_i * sigmoid(gate_m(trs_m(T_m)))`` with ``T_m`` a *trainable* copy of the feature table.
    * Collaborative view ``C = LightGCN_{n_ui_layers}(E_u, E_i; D^{-1/2} A D^{-1/2})`` (isolated nodes -> 0).
    * Item-item views ``H_m,i = O_m^{n_layers} E~_m`` (last layer), ``H_m,u = R_sym H_m,i`` with ``R_sym`` the
      user-item block of the normalised adjacency.
    * Fuser: ``beta = softmax_m(query(H_m))``; ``common = sum_m beta_m H_m``;
      ``side = (common + sum_m sigmoid(pref_m(C)) * (H_m - common)) / (M + 1)``; ``Z = C + side``;
      ``score = z_u . z_i``.

    Loss
    ----
    ``BPR(s+, s-)`` (log-sigmoid) ``+ reg_weight * SqReg(z_u, z_i+, z_i-)`` (divided by the configured
    ``train_batch_size``) ``+ cl_loss * [InfoNCE(side_i+, C_i+) + InfoNCE(side_u, C_u)]`` (cosine, temperature
    ``cl_temperature``, in-batch negatives, duplicates kept).

    Missing modalities
    ------------------
    Imputed features plus isolation of missing items in the fixed graphs (a missing item's view is its own
    purified vector; observed items never aggregate missing ones). New-item setting (reference): training uses
    graphs with the new items cut out before the top-k and no isolation of missing items, and zeroes the new items'
    purified views; scoring uses the missing-isolated graphs over all items.

    Options (departures from the reference, default = reference)
    ----------------------------------------------------------
    ``mgcn_detach_masked_views``: new-item setting only. true (default) = the reference zeroes the new items'
    views inside ``no_grad``, which cuts the gradient of *every* item's purified view during training (the
    purifier, projections and feature tables then learn nothing); false = zero the new items' rows only.
    """

    name = "MGCN"
    summary = "behaviour-purified modality views on kNN graphs, fused by a preference gate (MM 2023)"
    missing_aware = True
    min_modalities = 1

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        d = int(config["embedding_size"])
        M = data.n_modalities
        self.M = M
        self.d = d
        self.knn_k = int(config["knn_k"])
        self.n_layers = int(config["n_layers"])
        self.n_ui_layers = int(config["n_ui_layers"])
        self.reg_weight = float(config["reg_weight"])
        self.cl_weight = float(config["cl_loss"])
        self.cl_tau = float(config["cl_temperature"])
        self.batch_size_cfg = int(config["train_batch_size"])
        self.detach_masked = bool(config["mgcn_detach_masked_views"])
        new_items = data.new_items_np()
        self.new_item_setting = data.setting == "new-items" and bool(new_items.any())
        self.register_buffer("new_items", torch.as_tensor(new_items, device=data.device), persistent=False)
        obs = data.observed_np()

        adj = normalized_adjacency(data.train, eps=None)
        self.ui_adj = SparseOp(adj, data.device)
        self.r_sym = SparseOp(sp.csr_matrix(adj[: self.n_users, self.n_users:]), data.device)

        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.features = nn.ParameterList(
            nn.Parameter(data.features[m].detach().clone().float()) for m in self.modalities)
        self.projection = nn.ModuleList(nn.Linear(int(data.features[m].shape[1]), d) for m in self.modalities)
        self.purifier_gate = nn.ModuleList(nn.Linear(d, d) for _ in self.modalities)
        self.preference_gate = nn.ModuleList(nn.Linear(d, d) for _ in self.modalities)
        self.query = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))

        self.graphs_eval: list[SparseOp] = []
        self.graphs_train: list[SparseOp] = []
        for j, m in enumerate(self.modalities):
            x = data.features[m].detach()
            self.graphs_eval.append(SparseOp(knn_graph(x, self.knn_k, isolate=~obs[:, j], isolate_before_topk=True),
                                             data.device))
            if self.new_item_setting:
                train = knn_graph(x, self.knn_k, isolate=new_items, isolate_before_topk=True)
                self.graphs_train.append(SparseOp(train, data.device))
            else:
                self.graphs_train.append(self.graphs_eval[-1])

    def forward_all(self, training: bool) -> dict[str, torch.Tensor]:
        """Final user/item representations plus the side and collaborative views (``(U+I) x d`` each)."""
        ego = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        collab = lightgcn_propagate(self.ui_adj, ego, self.n_ui_layers)
        graphs = self.graphs_train if training else self.graphs_eval
        views = []
        for j in range(self.M):
            purified = self.item_embedding * torch.sigmoid(self.purifier_gate[j](self.projection[j](self.features[j])))
            if training and self.new_item_setting:
                if self.detach_masked:
                    purified = purified.detach()
                purified = purified.masked_fill(self.new_items.unsqueeze(1), 0.0)
            h = purified
            for _ in range(self.n_layers):
                h = graphs[j] @ h
            views.append(h)
        user_views = (self.r_sym @ torch.cat(views, dim=1)).split(self.d, dim=1)
        stacked = torch.stack([torch.cat([u, i], dim=0) for u, i in zip(user_views, views, strict=True)])  # M,N,d
        beta = torch.softmax(self.query(stacked), dim=0)
        common = (beta * stacked).sum(dim=0)
        prefs = [torch.sigmoid(gate(collab)) for gate in self.preference_gate]
        specific = sum(p * (stacked[j] - common) for j, p in enumerate(prefs))
        side = (specific + common) / (self.M + 1)
        final = collab + side
        return {"final": final, "side": side, "collab": collab}

    def loss(self, batch: Batch) -> LossOutput:
        f = self.forward_all(training=True)
        U = self.n_users
        table = torch.cat([f["final"], f["side"], f["collab"]], dim=1)  # users' rows, then items'
        u_rows = F.embedding(batch.users, table[:U])
        u, u_side, u_collab = u_rows.split(self.d, dim=1)
        item_tab = table[U:]
        p_final, p_side, p_collab = F.embedding(batch.pos, item_tab).split(self.d, dim=1)
        neg = F.embedding(batch.neg, f["final"][U:])
        bpr = bpr_loss((u * p_final).sum(1), (u * neg).sum(1))
        parts = {"bpr": bpr}
        if self.reg_weight:
            parts["reg"] = self.reg_weight * sq_reg(u, p_final, neg, batch_size=self.batch_size_cfg)
        if self.cl_weight:
            cl = info_nce(p_side, p_collab, self.cl_tau) + info_nce(u_side, u_collab, self.cl_tau)
            parts["cl"] = self.cl_weight * cl
        total = sum(parts.values())
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        final = self.forward_all(training=False)["final"]
        return final[: self.n_users], final[self.n_users:]
