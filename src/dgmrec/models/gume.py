r"""GUME: graphs and user modalities enhancement for long-tail multimodal recommendation (Lin et al., CIKM 2024).

Per modality an *explicit* view (item ID embeddings gated by the modality features, smoothed on the modality's
kNN graph and lifted to users) and an *extended* view (LightGCN over a per-modality user table and the explicit
item view); an MGCN-like fuser splits the explicit views into an attention-weighted coarse part and
behaviour-gated fine parts. Alignment losses tie modalities, fused and ID views together, and noise-perturbed
views enhance the user modality representation. Optionally the user-item graph is enhanced with item-item
edges between items that are neighbours in every modality.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.graphs import SparseOp, inverse_degree, knn_edges, lightgcn_propagate, sym_row_normalize
from dgmrec.losses import bpr_loss, info_nce, moment_alignment, perturb, sq_reg
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender

_CHOICES = {
    "gume_knn_isolation": ("auto", "before_topk", "after_topk"),
    "gume_vt_rows": ("reference", "items_complete", "all_nodes"),
    "gume_item_cl_rows": ("complete", "positives"),
    "gume_new_item_mask": ("reference", "zero_rows"),
}


def shared_neighbour_edges(graphs: list[sp.spmatrix]) -> sp.csr_matrix:
    """Binary item-item graph with an edge ``i -> j`` (``j != i``) when ``j`` is a neighbour of ``i`` in every
    one of ``graphs`` (GUME's graph enhancement: the intersection of the per-modality kNN sets)."""
    out = sp.csr_matrix(graphs[0], dtype=np.float32, copy=True)
    out.data[:] = 1.0
    for g in graphs[1:]:
        other = sp.csr_matrix(g, dtype=np.float32, copy=True)
        other.data[:] = 1.0
        out = out.multiply(other).tocsr()
    out.setdiag(0.0)
    out.eliminate_zeros()
    out.data[:] = 1.0
    return out


def enhanced_adjacency(train: sp.spmatrix, item_item: sp.spmatrix | None) -> sp.csr_matrix:
    """``D^-1/2 [[0, R], [R^T, B]] D^-1/2`` with row-sum degrees (``1/sqrt(0) -> 0``); ``B`` may be None."""
    n_users = train.shape[0]
    block = None if item_item is None or item_item.nnz == 0 else sp.csr_matrix(item_item, dtype=np.float32)
    a = sp.bmat([[sp.csr_matrix((n_users, n_users), dtype=np.float32), train], [train.T, block]],
                format="csr", dtype=np.float32)
    d = inverse_degree(np.asarray(a.sum(axis=1)).ravel(), eps=None, power=0.5)
    return sp.csr_matrix(sp.diags(d) @ a @ sp.diags(d), dtype=np.float32)


class GUME(Recommender):
    r"""GUME for any number ``M >= 2`` of modalities.

    Architecture
    ------------
    * Fixed modality graphs :math:`O_m = \mathrm{SymRow}(\mathrm{kNN}_{k}(\cos X_m))` (similarities kept) from
      the imputed features; items missing ``m`` keep only a self-loop in ``O_m`` (``gume_knn_isolation``).
    * Enhanced user-item adjacency :math:`\hat A^+` from ``[[0, R], [R^T, B]]`` (symmetric, row-sum degrees,
      ``1/0 -> 0``), ``B`` the item-item enhancement (empty by default, ``gume_item_item_edges``), and
      :math:`R^+` its user-item block.
    * Extended ID view :math:`X = \mathrm{LGC}_{L_{ui}}(E_u, E_i; \hat A^+)`.
    * Per modality: trainable feature table ``T_m`` (initialised with the imputed features),
      :math:`\tilde E_m = E_i \odot \sigma(W_2 W_1 T_m)`; explicit item view :math:`Q_{m,i} = O_m^{L} \tilde E_m`,
      users :math:`Q_{m,u} = R^+ Q_{m,i}`; extended view :math:`X_m = \mathrm{LGC}(E^{ext}_{m,u}, Q_{m,i};
      \hat A^+)` with a per-modality user table; :math:`X_{mm} = \mathrm{mean}_m X_m`.
    * Separation: :math:`\beta = \mathrm{softmax}_m(\mathrm{coarse}(Q_m))`, :math:`Q_c = \sum_m \beta_m Q_m`,
      fine parts :math:`\sigma(B_m X) \odot (Q_m - Q_c)`, integration :math:`I = (\sum_m \mathrm{fine}_m +
      Q_c)/(M+1)`; final :math:`Z = X + I`, score :math:`z_u^\top z_i`.

    Losses
    ------
    ``BPR + reg_weight_1 SqReg(z_u, z_pos, z_neg) + vt_loss L_vt + bm_loss L_bm + um_loss L_um +
    reg_weight_2 SqReg(X_mm[pos])`` (``SqReg`` divides by the configured batch size):
    ``L_vt`` = mean over modality pairs of ``|var - var| + |mean - mean|`` of the explicit views (rows:
    ``gume_vt_rows``); ``L_bm`` = InfoNCE(``bm_temp``) of integration vs extended ID view for the batch users
    and items (``gume_item_cl_rows``); ``L_um`` = InfoNCE(``um_temp``) of ``X_mm`` vs integration for the batch
    users plus, for each of the two, an InfoNCE between two noise-perturbed copies
    (``x + sign(x) rownorm(U[0,1)) 0.1``).

    Missing modalities
    ------------------
    Imputed features, isolation of missing items in the modality graphs, and item-side alignment restricted
    to the batch positives observed in every modality. In the new-item setting the training graphs leave the
    new items out (and, like the reference, do not isolate missing items), new items' gated embeddings are
    zeroed during training, and scoring uses the graphs above.

    Options (defaults reproduce the DGMRec release; ``auto`` picks its two- or three-modality code path)
    ------------------------------------------------------------------------------------------------
    ``gume_item_item_edges``
        ``false`` (default): no item-item block (the release's two-modality code has the intersection routine
        commented out, so ``A+`` is the plain user-item graph). ``true``: GUME's enhancement (the original
        paper/code): ``B_ij = 1`` when ``j != i`` is a kNN neighbour of ``i`` in every modality's graph.
    ``gume_vt_rows``
        ``reference`` (default): the stacked ``[users; items]`` explicit views are indexed with the item ids of
        the complete batch positives, i.e. the *users* with those ids are aligned (the release's bug).
        ``items_complete``: the complete batch positives' item rows. ``all_nodes``: every user and item row
        (original GUME).
    ``gume_item_cl_rows``
        ``complete`` (default): unique batch positives observed in every modality. ``positives``: every batch
        positive (original GUME).
    ``gume_knn_isolation``
        ``before_topk`` (the release's two-modality path): missing items are removed from the candidates, so
        observed items keep ``k`` observed neighbours. ``after_topk`` (its three-modality path): top-k first,
        then missing rows/columns are cut (observed items may keep fewer than ``k``). ``auto`` (default): the
        former for two modalities, the latter otherwise.
    ``gume_new_item_mask``
        ``reference`` (default): in new-item training the gated embeddings are masked inside ``no_grad``, so
        the feature tables and gates receive no gradient at all in that setting (the release's behaviour).
        ``zero_rows``: only the new items' rows are zeroed; gradients reach the rest.
    """

    name = "GUME"
    summary = "modality kNN graphs and enhanced user modality views for long-tail items (CIKM 2024)"
    missing_aware = True
    choices = _CHOICES
    min_modalities = 2

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        c = config
        d = int(c["embedding_size"])
        self.d = d
        self.M = data.n_modalities
        self.n_ui_layers = int(c["n_ui_layers"])
        self.n_layers = int(c["n_layers"])
        self.knn_k = int(c["knn_k"])
        self.w = {k: float(c[k]) for k in ("reg_weight_1", "reg_weight_2", "vt_loss", "bm_loss", "um_loss")}
        self.bm_temp = float(c["bm_temp"])
        self.um_temp = float(c["um_temp"])
        self.noise_scale = float(c["um_noise"])
        self.batch_size = int(c["train_batch_size"])
        self.opts = {k: str(c[k]) for k in _CHOICES}
        self.pairs = list(combinations(range(self.M), 2))

        obs = data.observed_np()
        new = data.new_items_np()
        self.new_item_setting = bool(new.any())
        self.register_buffer("complete", torch.from_numpy(obs.all(axis=1).copy()), persistent=False)
        self.register_buffer("old_items", torch.from_numpy((~new).astype(np.float32))[:, None], persistent=False)

        # ------------------------------------------------------------- graphs
        isolation = self.opts["gume_knn_isolation"]
        if isolation == "auto":  # the release's two- and three-modality code paths
            isolation = "before_topk" if self.M == 2 else "after_topk"
        before = isolation == "before_topk"
        n = self.n_items
        score_raw, train_raw = [], []
        for j, m in enumerate(self.modalities):
            x = data.features[m].detach().float()
            r, cc, v = knn_edges(x, self.knn_k, isolate=~obs[:, j], isolate_before_topk=before)
            score_raw.append(sp.csr_matrix((v, (r, cc)), shape=(n, n), dtype=np.float32))
            if self.new_item_setting:
                r, cc, v = knn_edges(x, self.knn_k, isolate=new, isolate_before_topk=True)
                train_raw.append(sp.csr_matrix((v, (r, cc)), shape=(n, n), dtype=np.float32))
        self.score_graphs = [SparseOp(sym_row_normalize(g), data.device) for g in score_raw]
        self.train_graphs = ([SparseOp(sym_row_normalize(g), data.device) for g in train_raw]
                             if self.new_item_setting else self.score_graphs)
        item_item = None
        if bool(c["gume_item_item_edges"]):
            item_item = shared_neighbour_edges(train_raw if self.new_item_setting else score_raw)
        self.n_item_item_edges = 0 if item_item is None else int(item_item.nnz)
        adj = enhanced_adjacency(data.train, item_item)
        self.ui_adj = SparseOp(adj, data.device)
        self.user_item = SparseOp(adj[: self.n_users, self.n_users:], data.device)

        # ------------------------------------------------------------- parameters
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self.extended_user = nn.ParameterList(
            nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d))) for _ in range(self.M))
        self.features = nn.ParameterList(nn.Parameter(data.features[m].detach().clone().float())
                                         for m in self.modalities)
        self.reduce = nn.ModuleList(nn.Linear(int(data.features[m].shape[1]), d) for m in self.modalities)
        self.space = nn.ModuleList(nn.Linear(d, d) for _ in range(self.M))
        self.behaviour = nn.ModuleList(nn.Linear(d, d) for _ in range(self.M))
        self.coarse = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))

    # ------------------------------------------------------------------------------------------ forward
    def forward_all(self, training: bool) -> dict[str, torch.Tensor]:
        """Final embeddings and the views the losses need (``N = n_users + n_items`` rows each)."""
        d, M, n_u = self.d, self.M, self.n_users
        graphs = self.train_graphs if training else self.score_graphs
        explicit_items = []
        for j in range(M):
            gate = torch.sigmoid(self.space[j](self.reduce[j](self.features[j])))
            gated = self.item_embedding * gate
            if training and self.new_item_setting:
                gated = gated * self.old_items
                if self.opts["gume_new_item_mask"] == "reference":
                    gated = gated.detach()
            for _ in range(self.n_layers):
                gated = graphs[j] @ gated
            explicit_items.append(gated)
        items_mm = torch.cat(explicit_items, dim=1)  # (I, M d)
        users_mm = self.user_item @ items_mm
        # the extended ID view and the M extended modality views share one propagation
        ego = torch.cat([torch.cat([self.user_embedding, *self.extended_user], dim=1),
                         torch.cat([self.item_embedding, items_mm], dim=1)], dim=0)
        ext = lightgcn_propagate(self.ui_adj, ego, self.n_ui_layers)
        ext_id = ext[:, :d]
        ext_mm = ext[:, d:].view(-1, M, d).mean(dim=1)
        explicit = torch.cat([users_mm, items_mm], dim=0).view(-1, M, d)  # (N, M, d)
        weights = torch.softmax(self.coarse(explicit), dim=1)  # (N, M, 1)
        coarse = (weights * explicit).sum(dim=1)
        gates = torch.sigmoid(F.linear(ext_id, torch.cat([b.weight for b in self.behaviour]),
                                       torch.cat([b.bias for b in self.behaviour]))).view(-1, M, d)
        integration = ((gates * (explicit - coarse.unsqueeze(1))).sum(dim=1) + coarse) / (M + 1)
        final = ext_id + integration
        return {"user": final[:n_u], "item": final[n_u:], "explicit": explicit, "integration": integration,
                "ext_id": ext_id, "ext_mm": ext_mm}

    # --------------------------------------------------------------------------------------------- loss
    def loss(self, batch: Batch) -> LossOutput:
        f = self.forward_all(training=True)
        users, pos, neg = batch.users, batch.pos, batch.neg
        n_u = self.n_users
        u = F.embedding(users, f["user"])
        pn = F.embedding(torch.cat([pos, neg]), f["item"])
        p, n = pn[: len(pos)], pn[len(pos):]
        bpr = bpr_loss((u * p).sum(1), (u * n).sum(1))
        parts = {"bpr": bpr, "reg": self.w["reg_weight_1"] * sq_reg(u, p, n, batch_size=self.batch_size)}
        zero = torch.zeros((), device=bpr.device)
        complete_pos = torch.unique(pos)
        complete_pos = complete_pos[self.complete[complete_pos]]

        if self.w["vt_loss"]:
            rows_opt = self.opts["gume_vt_rows"]
            explicit = f["explicit"]
            if rows_opt != "all_nodes":
                explicit = explicit[complete_pos + (n_u if rows_opt == "items_complete" else 0)]
            vt = zero
            if explicit.shape[0]:
                vt = sum(moment_alignment(explicit[:, a], explicit[:, b]) for a, b in self.pairs) / len(self.pairs)
            parts["vt"] = self.w["vt_loss"] * vt

        integ_u, integ_i = f["integration"][:n_u], f["integration"][n_u:]
        ext_u, ext_i = f["ext_id"][:n_u], f["ext_id"][n_u:]
        if self.w["bm_loss"]:
            bm = info_nce(F.embedding(users, integ_u), F.embedding(users, ext_u), self.bm_temp)
            rows = complete_pos if self.opts["gume_item_cl_rows"] == "complete" else pos
            if len(rows):
                bm = bm + info_nce(F.embedding(rows, integ_i), F.embedding(rows, ext_i), self.bm_temp)
            parts["bm"] = self.w["bm_loss"] * bm

        ext_mm_u = f["ext_mm"][:n_u]
        if self.w["um_loss"]:
            um = info_nce(F.embedding(users, ext_mm_u), F.embedding(users, integ_u), self.um_temp)
            for table in (integ_u, ext_mm_u):
                one = F.embedding(users, perturb(table, self.noise_scale))
                two = F.embedding(users, perturb(table, self.noise_scale))
                um = um + info_nce(one, two, self.um_temp)
            parts["um"] = self.w["um_loss"] * um

        if self.w["reg_weight_2"]:
            ext_mm_pos = F.embedding(pos, f["ext_mm"][n_u:])
            parts["reg_mm"] = self.w["reg_weight_2"] * sq_reg(ext_mm_pos, batch_size=self.batch_size)
        total = sum(parts.values())
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    # ------------------------------------------------------------------------------------------ scoring
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.forward_all(training=False)
        return f["user"], f["item"]
