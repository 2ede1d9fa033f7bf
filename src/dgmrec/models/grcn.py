r"""GRCN (Wei et al., ACM MM 2020): graph-refined convolution on the user-item graph.

Per modality, attention on every user-item edge (from the affinity of user preferences and item content)
is combined with learned per-node confidences into one pruned edge weight; a weighted GCN on ID embeddings runs
with these refined weights, and nodes are represented by the ID output concatenated with every modality's
content representation:

.. math::  w_e = \mathrm{ReLU}\big(\max_m \alpha^m_e\, c_{\mathrm{src}(e), m}\big), \qquad
           Z = [\,x^0 + x^1 + x^2 \,\|\, C_1 \,\|\, \dots \,\|\, C_M\,], \qquad \hat y_{ui} = z_u^\top z_i
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dgmrec.models.base import Batch, ModelInput, NodeTableRecommender
from dgmrec.ops.fused import in_float32

# ------------------------------------------------------------------- edge-list message passing (autograd)


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Softmax of ``scores`` within each group of entries sharing ``index`` (e.g. a node's incoming edges).

    ``out_e = exp(s_e - max_g) / (sum_{e' in g} exp(s_e' - max_g) + 1e-16)`` with ``g = index[e]`` (the
    PyTorch-Geometric convention); differentiable in ``scores`` (the shift by the group maximum is constant).
    """
    seg_max = torch.full((n_segments,), float("-inf"), dtype=scores.dtype, device=scores.device)
    seg_max = seg_max.scatter_reduce(0, index, scores.detach(), reduce="amax", include_self=True)
    expo = (scores - seg_max.index_select(0, index)).exp()
    denom = torch.zeros(n_segments, dtype=scores.dtype, device=scores.device).index_add(0, index, expo)
    return expo / (denom.index_select(0, index) + 1e-16)


class _EdgePropagate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, x: torch.Tensor, graph: EdgeGraph) -> torch.Tensor:  # type: ignore[override]
        ctx.graph = graph
        ctx.save_for_backward(w, x)
        return torch.sparse.mm(graph.matrix(w.detach()), x.detach().contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w, x = ctx.saved_tensors
        g: EdgeGraph = ctx.graph
        grad_w = g.sddmm(grad, x) if ctx.needs_input_grad[0] else None
        grad_x = torch.sparse.mm(g.matrix_t(w.detach()), grad.contiguous()) if ctx.needs_input_grad[1] else None
        return grad_w, grad_x, None


class _EdgeDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, graph: EdgeGraph) -> torch.Tensor:  # type: ignore[override]
        ctx.graph = graph
        ctx.save_for_backward(a, b)
        return graph.sddmm(a.detach(), b.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        g: EdgeGraph = ctx.graph
        grad_a = torch.sparse.mm(g.matrix(grad), b.detach().contiguous()) if ctx.needs_input_grad[0] else None
        grad_b = torch.sparse.mm(g.matrix_t(grad), a.detach().contiguous()) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


class EdgeGraph:
    """A fixed directed edge list ``src -> dst`` whose edge *values* are computed (attention, learned weights).

    :meth:`propagate` (``out[t] = sum_{e: dst_e = t} w_e x[src_e]``) and :meth:`edge_dot`
    (``s_e = a[dst_e] . b[src_e]``) give the same values and gradients as a gather, weighting and ``index_add``
    over the edges and a gathered row-wise dot product, but run as CSR sparse products (the index structures of
    both directions are built once) and never keep ``|E| x d`` intermediates for the backward pass; the dot
    products are evaluated in edge chunks.
    """

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, n_dst: int, n_src: int | None = None,
                 chunk_size: int = 16384) -> None:
        self.src = src.long()
        self.dst = dst.long()
        self.n_dst = int(n_dst)
        self.n_src = int(n_dst if n_src is None else n_src)
        self.chunk_size = int(chunk_size)
        self._perm, self._crow, self._col = self._csr(self.dst, self.src, self.n_dst)
        self._perm_t, self._crow_t, self._col_t = self._csr(self.src, self.dst, self.n_src)

    @staticmethod
    def _csr(rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        perm = torch.argsort(rows * (int(cols.max()) + 1 if len(cols) else 1) + cols, stable=True)
        crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), dim=0)
        # 32-bit indices when they fit: the CPU sparse kernels run about twice as fast with them
        index_dtype = torch.int32 if max(len(cols), n_rows, int(cols.max()) + 1 if len(cols) else 0) < 2**31 \
            else torch.long
        return perm, crow.to(index_dtype), cols[perm].to(index_dtype).contiguous()

    def matrix(self, w: torch.Tensor) -> torch.Tensor:
        """``n_dst x n_src`` CSR matrix with entry ``(dst_e, src_e) = w_e`` (duplicates add up)."""
        return torch.sparse_csr_tensor(self._crow, self._col, w[self._perm], size=(self.n_dst, self.n_src),
                                       check_invariants=False)

    def matrix_t(self, w: torch.Tensor) -> torch.Tensor:
        """The transpose: ``n_src x n_dst`` with entry ``(src_e, dst_e) = w_e``."""
        return torch.sparse_csr_tensor(self._crow_t, self._col_t, w[self._perm_t], size=(self.n_src, self.n_dst),
                                       check_invariants=False)

    def sddmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a[dst_e] . b[src_e]`` for every edge, without gradient, in chunks of edges."""
        out = torch.empty(len(self.src), dtype=a.dtype, device=a.device)
        for start in range(0, len(self.src), self.chunk_size):
            stop = min(len(self.src), start + self.chunk_size)
            rows = a.index_select(0, self.dst[start:stop])
            out[start:stop] = (rows * b.index_select(0, self.src[start:stop])).sum(dim=1)
        return out

    @in_float32
    def propagate(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out[t] = sum_{e: dst_e = t} w_e x[src_e]`` (``n_dst x d``), differentiable in ``w`` and ``x``."""
        return _EdgePropagate.apply(w, x, self)

    @in_float32
    def edge_dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``s_e = a[dst_e] . b[src_e]`` for every edge, differentiable in ``a`` and ``b``."""
        return _EdgeDot.apply(a, b, self)


def attention_pass(x: torch.Tensor, graph: EdgeGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """GRCN's parameter-free attention layer over the directed edges of ``graph``.

    ``alpha_e = softmax over dst's incoming edges of x_src . x_dst``; returns ``(sum_e alpha_e x_src at dst,
    alpha)``.
    """
    alpha = segment_softmax(graph.edge_dot(x, x), graph.dst, graph.n_dst)
    return graph.propagate(alpha, x), alpha


class GRCN(NodeTableRecommender):
    """Graph-Refined Convolutional Network for any number ``M >= 1`` of modalities.

    Architecture
    ------------
    Edges ``E`` are the training pairs (user ``u`` -> item node ``U + i``); ``E2 = [E; reversed E]``.
    Content branch, per modality ``m``: ``c = rownorm(lrelu(MLP_m(X_m)))`` (``MLP_m``: ``d_m -> latent_embedding``,
    Xavier-normal weight), ``p = rownorm(P_m)`` (``P_m``: a ``U x latent_embedding`` preference table); over
    ``E2`` with ``x = [p; c]``: ``alpha^m_e = softmax_{e into dst}(x_src . x_dst)``, ``C_m = x + sum alpha x_src``.
    Edge refinement: ``w_e = ReLU(max_m alpha^m_e * conf[src(e), m])`` with ``conf`` an ``(U+I) x M`` table
    (confidence of the message *source*). ID branch: ``x0 = rownorm(E_id)``, ``x1 = sum_e w_e x0_src``,
    ``x2 = sum_e w_e x1_src``, ``Z_id = x0 + x1 + x2``. Representation ``Z = [Z_id || C_1 || ... || C_M]``
    (modality order does not change any score); ``score = z_u . z_i``. Raw features are frozen buffers.

    Loss
    ----
    ``BPR(s+, s-)`` (log-sigmoid) ``+ reg_weight * (mean(E_id[u]^2 + E_id[i]^2) + mean(P_1^2) +
    sum_m mean(P_m[u]^2))`` (users repeated per positive/negative; the first modality's preference counted twice
    and the confidence not regularised, as in the reference). The released configurations use ``reg_weight = 0``.

    Missing modalities
    ------------------
    Only through the data layer's imputation; the observed mask is not used. New items have no edges, so their
    representation is their normalised ID row plus their content vectors.

    Options (departures from the reference, default = reference)
    ----------------------------------------------------------
    ``grcn_route_to_users``: false (default) = no routing. In the reference the routing iterations send messages
    along user -> item edges only, so user preferences never change and ``n_layers`` has no effect; we skip
    them. true = the paper's routing: ``n_layers`` times ``p <- rownorm(p + sum_{i in N(u)} alpha_ui c_i)`` with
    ``alpha`` the softmax over each user's items of ``p_u . c_i``.
    ``use_stale_cache``: false (default) = scoring recomputes ``Z`` in :meth:`prepare_eval`; true = score with
    the ``Z`` of the last training forward (one optimiser step stale), as the reference.
    """

    name = "GRCN"
    summary = "graph-refined convolution: modality attention re-weights the user-item edges (MM 2020)"
    min_modalities = 1

    def __init__(self, data: ModelInput, config: Mapping[str, Any]) -> None:
        super().__init__(data, config)
        d = int(config["embedding_size"])
        d_c = int(config["latent_embedding"])
        self.n_routing = int(config["n_layers"])
        self.route_to_users = bool(config["grcn_route_to_users"])
        self.reg_weight = float(config["reg_weight"])
        self.use_stale_cache = bool(config["use_stale_cache"])
        n_nodes = self.n_users + self.n_items
        self.n_nodes = n_nodes

        coo = data.train.tocoo()
        users = torch.as_tensor(coo.row.astype(np.int64), device=data.device)
        items = torch.as_tensor(coo.col.astype(np.int64), device=data.device) + self.n_users
        # E2 = [user -> item; item -> user]: message sources and targets
        self.graph = EdgeGraph(torch.cat([users, items]), torch.cat([items, users]), n_nodes)
        self.to_users = EdgeGraph(items, users, n_nodes)  # routing edges (item -> user)

        for j, m in enumerate(self.modalities):
            self.register_buffer(f"features_{j}", data.features[m].detach().clone().float(), persistent=False)
        self.id_embedding = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_nodes, d)))
        self.preference = nn.ParameterList(
            nn.Parameter(nn.init.xavier_normal_(torch.empty(self.n_users, d_c))) for _ in self.modalities)
        self.mlp = nn.ModuleList(nn.Linear(int(data.features[m].shape[1]), d_c) for m in self.modalities)
        for layer in self.mlp:
            nn.init.xavier_normal_(layer.weight)
        self.confidence = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_nodes, len(self.modalities))))

    def feature(self, j: int) -> torch.Tensor:
        return getattr(self, f"features_{j}")

    def content(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Content representation ``C_j`` (``(U+I) x d_C``) and the attention weights over ``E2``."""
        items = F.normalize(F.leaky_relu(self.mlp[j](self.feature(j))), dim=1)
        pref = F.normalize(self.preference[j], dim=1)
        if self.route_to_users:
            for _ in range(self.n_routing):
                agg, _ = attention_pass(torch.cat([pref, items], dim=0), self.to_users)
                pref = F.normalize(pref + agg[: self.n_users], dim=1)
        x = torch.cat([pref, items], dim=0)
        agg, alpha = attention_pass(x, self.graph)
        return x + agg, alpha

    def forward_all(self) -> torch.Tensor:
        """The ``(U+I) x (d + M d_C)`` representation ``[Z_id || C_1 || ... || C_M]``."""
        contents, alphas = zip(*(self.content(j) for j in range(len(self.modalities))), strict=True)
        conf = self.confidence.index_select(0, self.graph.src)  # confidence of each message's source
        weight = F.relu((torch.stack(alphas, dim=1) * conf).max(dim=1).values)
        x0 = F.normalize(self.id_embedding, dim=1)
        x1 = self.graph.propagate(weight, x0)
        x2 = self.graph.propagate(weight, x1)
        return torch.cat([x0 + x1 + x2, *contents], dim=1)

    def extra_reg(self, batch: Batch) -> torch.Tensor:
        return self.preference[0].pow(2).mean() + sum(F.embedding(batch.users, p).pow(2).mean()
                                                      for p in self.preference)
