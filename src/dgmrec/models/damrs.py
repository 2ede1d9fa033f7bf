r"""DA-MRS: denoising and aligning multimodal recommendation (Xv et al., KDD 2024), LightGCN backbone.

Modality features only shape *denoised* item-item graphs (kNN restricted to pairs that are similar in every
modality); with a behaviour co-occurrence graph they propagate the item ID embeddings into one view per graph.
Training adds a neighbour-discrimination contrast whose positives are pseudo-labels agreed across views, a KL
alignment of the user's item preferences between the collaborative and the modal views, and a BPR whose terms
are re-weighted by how consistently the views score each pair (denoising implicit feedback).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.graphs import SparseOp, lightgcn_propagate, normalize_rows, normalized_adjacency, sym_row_normalize
from dgmrec.losses import sym_bernoulli_kl, weighted_bpr_loss
from dgmrec.models.base import Batch, LossOutput, ModelInput, Recommender

_CHOICES = {"damrs_nd_rows": ("auto", "all", "complete"), "damrs_isolate_missing": ("auto", "never", "always")}


# ---------------------------------------------------------------- denoised kNN and co-occurrence item graphs


def denoised_knn_edges(
    xs: list[torch.Tensor | np.ndarray],
    k: int,
    isolate: list[np.ndarray | None] | None = None,
    chunk_size: int = 2048,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Binary cosine top-``k`` edges per modality, restricted to pairs similar in *every* modality (DA-MRS).

    With ``S_m`` the cosine matrix of ``xs[m]`` and ``mu_m`` its mean over all ``n^2`` entries (computed exactly
    as ``||sum_i x_i/||x_i||||^2 / n^2``, without the matrix), an entry ``(i, j)`` is zeroed in every modality
    as soon as ``S_m(i, j) < mu_m`` for some ``m``. Rows in ``isolate[m]`` are then cut off in modality ``m``
    (their row and column zeroed, a 1 on their diagonal). Each row finally keeps the columns of its (at most
    ``k``) largest remaining positive entries, as unweighted edges. All-zero feature rows count as isolated.
    Returns one ``(rows, cols)`` pair of int64 arrays per modality.
    """
    with torch.no_grad():
        normed = [normalize_rows(torch.as_tensor(x, dtype=torch.float32)) for x in xs]
        n = normed[0][0].shape[0]
        device = normed[0][0].device
        means = [float((xn.double().sum(dim=0) ** 2).sum()) / float(n) ** 2 for xn, _ in normed]
        iso = []
        for j, (_, zero) in enumerate(normed):
            mask = zero.clone()
            if isolate is not None and isolate[j] is not None:
                mask |= torch.as_tensor(np.asarray(isolate[j], dtype=bool), device=device)
            iso.append(mask)
        kk = min(k, n)
        out_rows: list[list[torch.Tensor]] = [[] for _ in xs]
        out_cols: list[list[torch.Tensor]] = [[] for _ in xs]
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            sims = [xn[start:stop] @ xn.T for xn, _ in normed]
            below = torch.zeros_like(sims[0], dtype=torch.bool)
            for sim, mu in zip(sims, means, strict=True):
                below |= sim < mu
            local = torch.arange(start, stop, device=device)
            for j, sim in enumerate(sims):
                sim[below] = 0.0
                rows_iso = iso[j][start:stop]
                sim[:, iso[j]] = 0.0
                sim[rows_iso] = 0.0
                sim[(local - start)[rows_iso], local[rows_iso]] = 1.0
                v, idx = torch.topk(sim, kk, dim=1)
                keep = v > 0
                out_rows[j].append(local.unsqueeze(1).expand_as(idx)[keep])
                out_cols[j].append(idx[keep])
    return [(torch.cat(r).cpu().numpy().astype(np.int64), torch.cat(c).cpu().numpy().astype(np.int64))
            for r, c in zip(out_rows, out_cols, strict=True)]


def cooccurrence_edges(train: sp.spmatrix, k: int = 10, min_shared: int = 2,
                       chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item-item co-occurrence neighbours: for each item, the (at most) ``k`` *other* items sharing the most
    training users, among those sharing at least ``min_shared`` (DA-MRS's behaviour graph).

    ``train`` is the binary user x item matrix; counts are ``R^T R`` computed in row chunks (sparse). Ties in
    the count are broken by the smaller item id. Returns ``(rows, cols, counts)``.
    """
    r = sp.csr_matrix(train, dtype=np.float32)
    r.data[:] = 1.0
    r_t = sp.csr_matrix(r.T)
    n = r.shape[1]
    rows_out, cols_out, vals_out = [], [], []
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        block = (r_t[start:stop] @ r).tocoo()
        rr, cc, vv = block.row.astype(np.int64) + start, block.col.astype(np.int64), block.data
        keep = (rr != cc) & (vv >= min_shared)
        rr, cc, vv = rr[keep], cc[keep], vv[keep]
        order = np.lexsort((cc, -vv, rr))
        rr, cc, vv = rr[order], cc[order], vv[order]
        first = np.searchsorted(rr, rr, side="left")
        rank = np.arange(len(rr)) - first
        keep = rank < k
        rows_out.append(rr[keep])
        cols_out.append(cc[keep])
        vals_out.append(vv[keep])
    return (np.concatenate(rows_out), np.concatenate(cols_out),
            np.concatenate(vals_out).astype(np.float32))


def _binary_graph(rows: np.ndarray, cols: np.ndarray, n: int, self_loops: bool = False) -> sp.csr_matrix:
    """Unweighted directed graph (duplicates collapse to one edge), ``SymRow``-normalised."""
    if self_loops:
        rows = np.concatenate([rows, np.arange(n)])
        cols = np.concatenate([cols, np.arange(n)])
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n))
    m.data[:] = 1.0
    return sym_row_normalize(m)


class _ExpCosineSum(torch.autograd.Function):
    """``T_i = sum_j exp(q_i . k_j / tau)`` from precomputed ``expo = exp((q k^T - 1) / tau)`` (rows of ``q`` and
    ``k`` L2-normalised, so the shift by the cosine bound 1 avoids overflow); the backward reuses ``expo``."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, key: torch.Tensor, expo: torch.Tensor,  # type: ignore[override]
                inv_tau: float) -> torch.Tensor:
        scale = float(np.exp(inv_tau))
        ctx.save_for_backward(q, key, expo)
        ctx.scale = scale * inv_tau
        return expo.sum(dim=1) * scale

    @staticmethod
    def backward(ctx, grad_t: torch.Tensor):  # type: ignore[override]
        q, key, expo = ctx.saved_tensors
        g = (grad_t * ctx.scale).unsqueeze(1)
        return (expo @ key) * g, expo.T @ (q * g), None, None


class DAMRS(Recommender):
    r"""DA-MRS (LightGCN backbone) for any number ``M >= 2`` of modalities.

    Architecture
    ------------
    * Graphs (built once from the imputed features and the training interactions): per modality a binary
      kNN graph (``knn_k``) on the cosine similarity, keeping only pairs whose similarity reaches the global
      mean similarity in *every* modality (:func:`denoised_knn_edges`); a co-occurrence graph
      (self-loop plus the ``cooc_k`` items sharing the most training users, at least ``cooc_min_shared``;
      counts ignored). All are ``SymRow``-normalised.
    * :math:`C = \mathrm{LGC}_{L_{ui}}(E_u, E_i; \hat A)`; per view ``x`` (``M`` modalities + co-occurrence)
      :math:`h_x = O_x^{L_{mm}} E_i` (last layer).
    * Item :math:`z_i = C_i + \mathrm{mean}_x h_x`; score :math:`C_u^\top z_i`. The only trainable tensors
      are the ID embeddings (the reference also creates unused feature projections; they are omitted).

    Losses
    ------
    ``L_wBPR + neighbor_weight * L_ND + kl_weight * L_KL``:

    * Weighted BPR: per view ``r_x = sigmoid(C_u . rownorm(h_x[i]))``; ``w+ = clamp(mean_x r+ exp(-var_x r+)^2,
      0, 1)``; with ``n`` the mean of every ``r-`` in the batch, ``w- = clamp(max_x r+ - n, 0, 1)`` when
      ``mean_x r+ < n`` else 0 (detached); ``-mean(w+ log s(s+ - s-) + w- log s(s- - s+))``.
    * Neighbour discrimination over the unique batch items: ``P_x = softmax(cos(h_x[B], h_x))``; for a target
      view ``y`` the ``damrs_pseudo_k`` best columns of ``sum_{x != y} P_x + 2 P_y`` are multi-view positives and
      the next ``damrs_pseudo_k`` of ``P_y`` single-view positives;
      ``-log(A/T + 1e-9) - log(S/(T - A) + 1e-9)`` with sums of ``exp(cos/0.2)`` over those sets (``A``, ``S``)
      and over all candidates (``T``); averaged over rows and views.
    * KL alignment over unique batch users x unique batch items of ``sigmoid(C_u . rownorm(C_i))`` vs
      ``sigmoid(C_u . rownorm(mean_x h_x))``: symmetric Bernoulli KL, computed from the logits
      (:func:`dgmrec.losses.sym_bernoulli_kl`), so it cannot become NaN where the reference's probability form
      saturates (the only departure from the reference's values).

    Missing modalities
    ------------------
    Imputed features build the graphs. In the new-item setting the training graphs cut new items off (row and
    column removed, self-loop kept), scoring uses graphs that include them, and pseudo-label candidates are
    the old items.

    Options (defaults reproduce the DGMRec release; ``auto`` picks its two- or three-modality code path)
    ------------------------------------------------------------------------------------------------
    ``damrs_isolate_missing``
        ``never``: no isolation, so with mean imputation all items missing a modality are identical in it and
        become each other's neighbours (the release's two-modality path). ``always`` (its three-modality
        TikTok path): items missing modality ``m`` keep only a self-loop in graph ``m`` (after the denoising
        mask, before top-k). ``auto`` (default): ``never`` for two modalities, ``always`` otherwise.
    ``damrs_nd_rows``, ``damrs_nd_scale``
        ``all``: the neighbour-discrimination rows are all unique batch items; ``complete``: only batch
        positives observed in every modality. Scale: an extra factor on the term. ``auto`` / 0 (default):
        ``all`` and 1 for two modalities, ``complete`` and 0.5 otherwise (the release's two paths).
    ``damrs_pseudo_k``
        pseudo-label set size; 0 (default) = the release's choice: 10 with two modalities, ``knn_k`` otherwise.
    ``cooc_k``, ``cooc_min_shared``
        the co-occurrence graph of DA-MRS's builder (10 neighbours, >= 2 shared users). The release reads a
        precomputed ``item_graph_dict.npy`` that it neither ships nor builds; here it is built from the
        training interactions.
    """

    name = "DAMRS"
    summary = "denoised modality item graphs and a view-consistency weighted BPR on LightGCN (KDD 2024)"
    missing_aware = True
    choices = _CHOICES
    min_modalities = 1

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        c = config
        d = int(c["embedding_size"])
        self.M = data.n_modalities
        self.n_ui_layers = int(c["n_ui_layers"])
        self.n_mm_layers = int(c["n_mm_layers"])
        self.knn_k = int(c["knn_k"])
        self.kl_weight = float(c["kl_weight"])
        self.neighbor_weight = float(c["neighbor_weight"])
        self.nd_temperature = float(c["nd_temperature"])
        # "auto" options follow the release: its two-modality path, or its three-modality (TikTok) path
        two = self.M == 2
        self.pseudo_k = int(c["damrs_pseudo_k"]) or (10 if two else self.knn_k)
        self.nd_rows = str(c["damrs_nd_rows"])
        if self.nd_rows == "auto":
            self.nd_rows = "all" if two else "complete"
        self.nd_scale = float(c["damrs_nd_scale"]) or (1.0 if two else 0.5)
        isolate = str(c["damrs_isolate_missing"])
        isolate_missing = isolate == "always" or (isolate == "auto" and not two)

        obs = data.observed_np()
        new = data.new_items_np()
        self.register_buffer("complete", torch.from_numpy(obs.all(axis=1).copy()), persistent=False)
        # pseudo-label candidates: the old items (all items outside the new-item setting)
        cand = np.flatnonzero(~new)
        self.register_buffer("candidates", torch.from_numpy(cand), persistent=False)
        self.all_candidates = len(cand) == self.n_items

        self.ui_adj = SparseOp(normalized_adjacency(data.train, eps=1e-7), data.device)
        feats = [data.features[m].detach().float() for m in self.modalities]
        missing = [~obs[:, j] if isolate_missing else np.zeros(self.n_items, dtype=bool) for j in range(self.M)]
        k = self.knn_k
        infer = [_binary_graph(r, cc, self.n_items) for r, cc in denoised_knn_edges(feats, k, isolate=missing)]
        if new.any():
            cut = [mj | new for mj in missing]
            train_graphs = [_binary_graph(r, cc, self.n_items) for r, cc in denoised_knn_edges(feats, k, isolate=cut)]
        else:
            train_graphs = infer
        r, cc, _ = cooccurrence_edges(data.train, k=int(c["cooc_k"]), min_shared=int(c["cooc_min_shared"]))
        cooc = SparseOp(_binary_graph(r, cc, self.n_items, self_loops=True), data.device)
        self.infer_views = [SparseOp(g, data.device) for g in infer] + [cooc]
        self.train_views = [SparseOp(g, data.device) for g in train_graphs] + [cooc]

        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, d)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, d)))
        self._buffers_nd: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------------------ forward
    def propagate(self, views: list[SparseOp]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Collaborative user and item embeddings and one item view per graph."""
        ego = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        cf = lightgcn_propagate(self.ui_adj, ego, self.n_ui_layers)
        hs = []
        for graph in views:
            h = self.item_embedding
            for _ in range(self.n_mm_layers):
                h = graph @ h
            hs.append(h)
        return cf[: self.n_users], cf[self.n_users:], hs

    # --------------------------------------------------------------------------------------------- loss
    def _pair_weights(self, user: torch.Tensor, views: list[torch.Tensor], pos: torch.Tensor,
                      neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoising weights of the positive and the reversed term of every batch triple (no gradient)."""
        with torch.no_grad():
            r_pos = torch.stack([torch.sigmoid((user * F.normalize(F.embedding(pos, h), dim=1)).sum(1))
                                 for h in views])
            r_neg = torch.stack([torch.sigmoid((user * F.normalize(F.embedding(neg, h), dim=1)).sum(1))
                                 for h in views])
            mean = r_pos.mean(0)
            w_pos = (mean * torch.exp(-r_pos.var(0)) ** 2).clamp(0.0, 1.0)
            n_bar = r_neg.mean()
            w_neg = (r_pos.max(0).values - n_bar).clamp(0.0, 1.0) * (mean < n_bar).to(mean.dtype)
        return w_pos, w_neg

    def _workspace(self, n: int, n_cand: int, count: int) -> list[torch.Tensor]:
        """``count`` reusable ``n x n_cand`` buffers (fresh large allocations cost page faults every batch)."""
        buf = self._buffers_nd
        if len(buf) != count or buf[0].shape[0] < n or buf[0].shape[1] != n_cand:
            rows = max(n, buf[0].shape[0] if buf else 0)
            self._buffers_nd = buf = [torch.empty(rows, n_cand, device=self.device) for _ in range(count)]
        return [b[:n] for b in buf]

    def _pseudo_labels(self, queries: list[torch.Tensor], keys: list[torch.Tensor], chunk: int = 256,
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Multi-view and single-view pseudo-positives of every query row, per view, and ``exp((cos - 1)/tau)``.

        Row chunks keep the ``rows x candidates`` work in cache; no gradient.
        """
        n, n_cand, V = queries[0].shape[0], keys[0].shape[0], len(queries)
        pk = min(self.pseudo_k, n_cand)
        inv_tau = 1.0 / self.nd_temperature
        expos = self._workspace(n, n_cand, V)
        multi = [torch.empty(n, pk, dtype=torch.long, device=queries[0].device) for _ in range(V)]
        single = [torch.empty(n, pk, dtype=torch.long, device=queries[0].device) for _ in range(V)]
        probs = [torch.empty(min(chunk, n), n_cand, device=queries[0].device) for _ in range(V)]
        agreed = torch.empty(min(chunk, n), n_cand, device=queries[0].device)
        score = torch.empty_like(agreed)
        with torch.no_grad():
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                rows = stop - start
                for x in range(V):
                    cos = torch.mm(queries[x][start:stop], keys[x].T, out=probs[x][:rows])
                    torch.mul(cos, inv_tau, out=expos[x][start:stop]).sub_(inv_tau).exp_()
                    prob = cos.sub_(1.0).exp_()  # softmax at temperature 1, shifted by the bound 1
                    prob /= prob.sum(dim=1, keepdim=True)
                    if x == 0:
                        agreed[:rows].copy_(prob)
                    else:
                        agreed[:rows] += prob
                for y in range(V):
                    prob = probs[y][:rows]
                    top = torch.topk(torch.add(agreed[:rows], prob, out=score[:rows]), pk, dim=1).indices
                    multi[y][start:stop] = top  # the other views plus twice the own view
                    prob.scatter_(1, top, 0.0)
                    single[y][start:stop] = torch.topk(prob, pk, dim=1).indices
        return multi, single, expos

    def _neighbour_discrimination(self, views: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """Mean over views of the pseudo-label contrast of the item ``rows`` against the candidates."""
        queries, keys = [], []
        for h in views:
            hn = F.normalize(h, dim=1)
            keys.append(hn if self.all_candidates else F.embedding(self.candidates, hn))
            queries.append(F.embedding(rows, hn))
        multi, single, expos = self._pseudo_labels([q.detach() for q in queries], [k.detach() for k in keys])
        inv_tau = 1.0 / self.nd_temperature
        loss = torch.zeros((), device=rows.device)
        for q, key, m, s, e in zip(queries, keys, multi, single, expos, strict=True):
            t = _ExpCosineSum.apply(q, key, e, inv_tau)
            a = torch.exp((q.unsqueeze(1) * F.embedding(m, key)).sum(-1) * inv_tau).sum(1)
            b = torch.exp((q.unsqueeze(1) * F.embedding(s, key)).sum(-1) * inv_tau).sum(1)
            loss = loss + (-torch.log(a / t + 1e-9) - torch.log(b / (t - a) + 1e-9)).mean()
        return loss / len(views)

    def loss(self, batch: Batch) -> LossOutput:
        users, pos, neg = batch.users, batch.pos, batch.neg
        u_cf, i_cf, views = self.propagate(self.train_views)
        modal = torch.stack(views).mean(0)
        item_rep = i_cf + modal
        user = F.embedding(users, u_cf)
        w_pos, w_neg = self._pair_weights(user, views, pos, neg)
        s_pos = (user * F.embedding(pos, item_rep)).sum(1)
        s_neg = (user * F.embedding(neg, item_rep)).sum(1)
        parts = {"bpr": weighted_bpr_loss(s_pos, s_neg, w_pos, w_neg)}

        items = torch.unique(torch.cat([pos, neg]))
        if self.neighbor_weight:
            rows = items
            if self.nd_rows == "complete":
                rows = torch.unique(pos)
                rows = rows[self.complete[rows]]
            if len(rows):
                parts["nd"] = self.neighbor_weight * self.nd_scale * self._neighbour_discrimination(views, rows)
        if self.kl_weight:
            uu = F.embedding(torch.unique(users), u_cf)
            logits_cf = uu @ F.normalize(F.embedding(items, i_cf), dim=1).T
            logits_mm = uu @ F.normalize(F.embedding(items, modal), dim=1).T
            parts["kl"] = self.kl_weight * sym_bernoulli_kl(logits_cf, logits_mm).mean()
        total = sum(parts.values())
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    # ------------------------------------------------------------------------------------------ scoring
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        u_cf, i_cf, views = self.propagate(self.infer_views)
        return u_cf, i_cf + torch.stack(views).mean(0)

    def train(self, mode: bool = True) -> DAMRS:
        if not mode:
            self._buffers_nd = []
        return super().train(mode)
