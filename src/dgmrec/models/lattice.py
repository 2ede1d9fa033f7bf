r"""LATTICE (Zhang et al., ACM MM 2021): mining latent item-item structure for multimodal recommendation.

Per modality a fixed kNN graph of the raw features and a learned kNN graph of trainable projections are mixed
into one item graph (learned modality weights ``w = softmax(omega)``, ratio ``lambda`` for the fixed part):

.. math::  S = (1-\lambda)\,\mathrm{SymRow}\Big(\sum_m w_m L_m\Big) + \lambda \sum_m w_m O_m, \qquad
           h = S^{n} E_i, \qquad \hat y_{ui} = z_u^\top (z_i + h_i / \|h_i\|)

where ``z`` comes from LightGCN on the row-normalised user-item graph with self-loops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.errors import ConfigError
from dgmrec.graphs import SparseOp, knn_edges, knn_graph, lightgcn_propagate, normalized_adjacency
from dgmrec.losses import bpr_loss, sq_reg
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender

# ------------------------------------------------------------------- learned item graphs as edge lists (autograd)


def edge_weighted_sum(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor | None,
                      n_out: int) -> torch.Tensor:
    """``out[t] = sum_{e: dst_e = t} weight_e * x[src_e]`` (no weight: plain sum); gradients reach ``x`` and
    ``weight``. The sparse product with edge weights that are themselves learned (attention, learned graphs)."""
    msg = x.index_select(0, src)
    if weight is not None:
        msg = msg * weight.unsqueeze(1)
    return torch.zeros(n_out, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, dst, msg)


def edge_sym_row_normalize(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """Edge-list :func:`sym_row_normalize` with autograd: ``v_e / sqrt(r_row r_col)``, ``r`` the row sums
    (rows summing to ``<= 0`` get scale 0). Duplicate ``(row, col)`` pairs act as their sum."""
    r = torch.zeros(n, dtype=vals.dtype, device=vals.device).index_add(0, rows, vals)
    scale = torch.where(r > 0, r.clamp_min(1e-30).rsqrt(), torch.zeros_like(r))
    return scale.index_select(0, rows) * vals * scale.index_select(0, cols)


def knn_edges_with_grad(x: torch.Tensor, k: int, isolate: np.ndarray | None = None,
                        chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine top-``k`` graph of the rows of ``x`` whose edge weights carry gradient to ``x``.

    The neighbours are found chunk by chunk without gradient (:func:`knn_edges`, ``isolate`` applied before the
    top-k); the kept weights are then recomputed as the cosines of the selected pairs, so memory stays
    ``O(n k d)`` and the gradients equal those of a dense top-k on the full similarity matrix. Self-loops weigh
    exactly 1 (their cosine, whose gradient is zero). Returns ``(rows, cols, weights)`` as tensors.
    """
    r, c, _ = knn_edges(x.detach(), k, isolate=isolate, isolate_before_topk=True, chunk_size=chunk_size)
    rows = torch.from_numpy(r).to(x.device)
    cols = torch.from_numpy(c).to(x.device)
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    vals = (xn.index_select(0, rows) * xn.index_select(0, cols)).sum(dim=1)
    vals = torch.where(rows == cols, torch.ones_like(vals), vals)
    return rows, cols, vals


class LATTICE(Recommender):
    """LATTICE with a LightGCN backbone for any number ``M >= 1`` of modalities.

    Architecture
    ------------
    * Fixed graphs (built once from the imputed features): ``O_m = SymRow(kNN_k(cos(X_m)))`` (similarities kept),
      items missing modality ``m`` isolated *after* the top-k (self-loop only; observed items may keep fewer than
      ``k`` neighbours).
    * Learned graphs: ``P_m = trs_m(T_m)`` with ``T_m`` a *trainable* copy of the feature table and ``trs_m`` a
      linear map to ``feat_embed_dim``; ``L_m = kNN_k(cos(P_m))`` (not isolated). They are rebuilt with gradient on
      the first training batch of every epoch; later batches of the epoch reuse the detached graph, so
      ``T_m``, ``trs_m`` and ``omega`` learn from one batch per epoch (as in the reference). The top-k is found in
      row chunks without gradient and the kept cosines are recomputed with gradient (no ``I x I`` matrix).
    * Item graph ``S`` as in the module docstring, ``h = S^{n_layers} E_i``; backbone
      ``[Z_u; Z_i] = LightGCN_{n_ui_layers}(E_u, E_i; D~^{-1}(A + I))``; item output ``z_i + rownorm(h_i)``.

    Loss
    ----
    ``BPR(s+, s-)`` (log-sigmoid) ``+ reg_weight * SqReg(z_u, z_i+, z_i-)`` (``0.5 * sum of squares`` divided by
    the configured ``train_batch_size``).

    Missing modalities
    ------------------
    Imputed features plus isolation of the missing items in the fixed graphs. New-item setting (reference):
    new items' ID rows start at zero (``lattice_zero_new_item_id``); in training the fixed and learned graphs
    are built with new items cut out before the top-k (self-loop only) and *without* isolating missing items;
    scoring uses the missing-isolated fixed graphs and an unmasked learned graph, so new items are scored through
    their content neighbours.

    Options (departures from the reference, default = reference)
    ----------------------------------------------------------
    ``lattice_infer_normalize_learned``: false (default) = at scoring the learned part is
    ``(1-lambda) sum_m w_m L_m`` *without* ``SymRow`` (the DGMRec two-modality inference path; rows sum to about
    ``k``, so the learned part dominates); true = the training graph (normalised), as MMRec and the original.
    ``lattice_modal_weight_init``: initial logits ``omega`` (one per modality); empty (default) = equal (the
    reference's ``[0.5, 0.5]``; its three-modality TikTok run used ``[0.3, 0.3, 0.4]``).
    ``lattice_zero_new_item_id``: zero the ID rows of new items at construction (reference, two modalities).
    The unused NGCF backbone and message dropout of the reference are not implemented; evaluation batches do not
    change scores (the reference's 128-user evaluation batch only mattered for its per-batch graph rebuilds).
    """

    name = "LATTICE"
    summary = "item-item graphs learned from the modality features, LightGCN backbone (MM 2021)"
    missing_aware = True
    min_modalities = 1

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        d = int(config["embedding_size"])
        M = data.n_modalities
        self.M = M
        self.knn_k = int(config["knn_k"])
        self.n_layers = int(config["n_layers"])
        self.n_ui_layers = int(config["n_ui_layers"])
        self.lam = float(config["lambda_coeff"])
        self.reg_weight = float(config["reg_weight"])
        self.batch_size_cfg = int(config["train_batch_size"])
        self.infer_normalize = bool(config["lattice_infer_normalize_learned"])
        init: Sequence[Any] = config["lattice_modal_weight_init"] or [1.0 / M] * M
        if len(init) != M:
            raise ConfigError(f"needs one value per modality ({M}), got {list(init)}",
                              source="lattice_modal_weight_init")

        self.new_items_np = data.new_items_np()
        self.new_item_setting = data.setting == "new-items" and bool(self.new_items_np.any())
        obs = data.observed_np()

        self.ui_adj = SparseOp(normalized_adjacency(data.train, eps=None, self_loops=True, mode="rw"), data.device)
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        item = nn.init.xavier_uniform_(torch.empty(self.n_items, d))
        if self.new_item_setting and bool(config["lattice_zero_new_item_id"]):
            item[torch.as_tensor(self.new_items_np)] = 0.0
        self.item_embedding = nn.Parameter(item)
        self.features = nn.ParameterList(
            nn.Parameter(data.features[m].detach().clone().float()) for m in self.modalities)
        self.projection = nn.ModuleList(
            nn.Linear(int(data.features[m].shape[1]), int(config["feat_embed_dim"])) for m in self.modalities)
        self.modal_weight = nn.Parameter(torch.tensor([float(v) for v in init]))

        # fixed graphs from the initial (imputed) features
        self.fixed_eval: list[SparseOp] = []
        self.fixed_train: list[SparseOp] = []
        for j, m in enumerate(self.modalities):
            x = data.features[m].detach()
            scoring = knn_graph(x, self.knn_k, isolate=~obs[:, j], isolate_before_topk=False)
            self.fixed_eval.append(SparseOp(scoring, data.device))
            if self.new_item_setting:
                train = knn_graph(x, self.knn_k, isolate=self.new_items_np, isolate_before_topk=True)
                self.fixed_train.append(SparseOp(train, data.device))
            else:
                self.fixed_train.append(self.fixed_eval[-1])
        self._rebuild = True
        self._item_graph: SparseOp | None = None  # detached training item graph of the current epoch

    # ------------------------------------------------------------------------------------------ graphs
    def learned_edges(self, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edges of ``sum_m w_m L_m`` (unnormalised; duplicates across modalities are summed by consumers)."""
        w = torch.softmax(self.modal_weight, dim=0)
        isolate = self.new_items_np if (training and self.new_item_setting) else None
        rows, cols, vals = [], [], []
        for j in range(self.M):
            r, c, v = knn_edges_with_grad(self.projection[j](self.features[j]), self.knn_k, isolate=isolate)
            rows.append(r)
            cols.append(c)
            vals.append(w[j] * v)
        return torch.cat(rows), torch.cat(cols), torch.cat(vals)

    def _merged_graph(self, fixed: list[SparseOp], rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor
                      ) -> SparseOp:
        """``lambda * sum_m w_m O_m + (1 - lambda) * learned`` as one constant sparse matrix."""
        w = torch.softmax(self.modal_weight.detach(), dim=0).cpu().numpy()
        n = self.n_items
        out = sp.csr_matrix((n, n), dtype=np.float32)
        for j, g in enumerate(fixed):
            out = out + (self.lam * float(w[j])) * g.scipy
        learned = sp.csr_matrix(((1.0 - self.lam) * vals.detach().float().cpu().numpy(),
                                 (rows.cpu().numpy(), cols.cpu().numpy())), shape=(n, n), dtype=np.float32)
        return SparseOp(sp.csr_matrix(out + learned, dtype=np.float32), self.device)

    def _propagate_items(self, graph: SparseOp) -> torch.Tensor:
        h = self.item_embedding
        for _ in range(self.n_layers):
            h = graph @ h
        return h

    def item_graph_signal(self) -> torch.Tensor:
        """``h`` for training: rebuilds the learned graph with gradient on the first batch of an epoch."""
        if not self._rebuild and self._item_graph is not None:
            return self._propagate_items(self._item_graph)
        rows, cols, vals = self.learned_edges(training=True)
        norm = edge_sym_row_normalize(rows, cols, vals, self.n_items)
        w = torch.softmax(self.modal_weight, dim=0)
        h = self.item_embedding
        for _ in range(self.n_layers):
            fixed = sum(w[j] * (self.fixed_train[j] @ h) for j in range(self.M))
            h = self.lam * fixed + (1.0 - self.lam) * edge_weighted_sum(h, cols, rows, norm, self.n_items)
        self._item_graph = self._merged_graph(self.fixed_train, rows, cols, norm)
        self._rebuild = False
        return h

    def backbone(self) -> tuple[torch.Tensor, torch.Tensor]:
        ego = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        out = lightgcn_propagate(self.ui_adj, ego, self.n_ui_layers)
        return out[: self.n_users], out[self.n_users:]

    # ------------------------------------------------------------------------------------------ training
    def before_epoch(self, epoch: int) -> dict[str, float] | None:
        self._rebuild = True
        return None

    def loss(self, batch: Batch) -> LossOutput:
        h = self.item_graph_signal()
        users, items = self.backbone()
        items = items + F.normalize(h, dim=1)
        u = F.embedding(batch.users, users)
        pos = F.embedding(batch.pos, items)
        neg = F.embedding(batch.neg, items)
        bpr = bpr_loss((u * pos).sum(1), (u * neg).sum(1))
        parts = {"bpr": bpr}
        if self.reg_weight:
            parts["reg"] = self.reg_weight * sq_reg(u, pos, neg, batch_size=self.batch_size_cfg)
        total = sum(parts.values())
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    # ------------------------------------------------------------------------------------------- scoring
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scoring representations: the learned graph is rebuilt from the current projections (no masking)."""
        rows, cols, vals = self.learned_edges(training=False)
        if self.infer_normalize:
            vals = edge_sym_row_normalize(rows, cols, vals, self.n_items)
        h = self._propagate_items(self._merged_graph(self.fixed_eval, rows, cols, vals))
        users, items = self.backbone()
        return users, items + F.normalize(h, dim=1)
