"""Graphs shared by every model: the normalised user-item adjacency and per-modality item kNN graphs.

Everything stays sparse: kNN graphs are built from row chunks of the cosine similarity (never a dense
items x items matrix) and stored as sparse CSR tensors. :class:`SparseOp` wraps a sparse matrix together with
its transpose so that ``A @ X`` back-propagates with a second sparse product instead of a generic kernel.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from dgmrec import knn

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# ------------------------------------------------------------------------------------------- sparse helpers


def to_torch_csr(m: sp.spmatrix, device: torch.device | str = "cpu") -> torch.Tensor:
    m = sp.csr_matrix(m, dtype=np.float32)
    m.sort_indices()
    # 32-bit indices make the CPU sparse-dense product markedly faster; fall back to 64-bit for huge graphs
    index_dtype = np.int32 if m.nnz < 2**31 - 1 and max(m.shape) < 2**31 - 1 else np.int64
    return torch.sparse_csr_tensor(
        torch.from_numpy(m.indptr.astype(index_dtype)),
        torch.from_numpy(m.indices.astype(index_dtype)),
        torch.from_numpy(m.data),
        size=m.shape,
        device=device,
        check_invariants=False,
    )


def torch_to_scipy(t: torch.Tensor) -> sp.csr_matrix:
    t = t.detach().to("cpu")
    if t.layout == torch.sparse_csr:
        return sp.csr_matrix((t.values().numpy(), t.col_indices().numpy(), t.crow_indices().numpy()),
                             shape=tuple(t.shape))
    t = t.coalesce()
    idx = t.indices().numpy()
    return sp.csr_matrix((t.values().numpy(), (idx[0], idx[1])), shape=tuple(t.shape))


def sparse_mm(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``a @ x`` for a sparse ``a``, in float32 also inside an autocast region (the sparse kernels have no
    bfloat16 path, and a graph's weights keep their precision)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.sparse.mm(a, x.float().contiguous())


class _SparseMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, a_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.a_t = a_t
        return sparse_mm(a, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # sparse kernels are far slower on strided inputs (gradients of slices often are)
        return None, None, torch.sparse.mm(ctx.a_t, grad.contiguous())


class SparseOp:
    """A constant sparse matrix ``A`` (CSR) with its transpose, applied as ``op @ x`` with autograd."""

    def __init__(self, matrix: sp.spmatrix, device: torch.device | str = "cpu") -> None:
        matrix = sp.csr_matrix(matrix, dtype=np.float32)
        self.shape = matrix.shape
        self.scipy = matrix
        self.a = to_torch_csr(matrix, device)
        self.a_t = to_torch_csr(matrix.T.tocsr(), device)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return _SparseMM.apply(self.a, self.a_t, x)
        return sparse_mm(self.a, x)

    def rows(self, index: torch.Tensor | np.ndarray) -> SparseOp:
        """The operator made of the given rows of ``A`` (in that order)."""
        index = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        return SparseOp(self.scipy[index], self.a.device)

    @property
    def nnz(self) -> int:
        return int(self.scipy.nnz)

    def to(self, device: torch.device | str) -> SparseOp:
        return SparseOp(self.scipy, device)


# --------------------------------------------------------------------------------------- user-item graphs


def inverse_degree(deg: np.ndarray, eps: float | None = 1e-7, power: float = 1.0) -> np.ndarray:
    """``1/(deg+eps)**power``; with ``eps=None`` zero degrees give 0 instead of a huge value."""
    deg = np.asarray(deg, dtype=np.float64)
    if eps is None:
        out = np.zeros_like(deg)
        nz = deg > 0
        out[nz] = deg[nz] ** -power
        return out
    return (deg + eps) ** -power


def bipartite_adjacency(train: sp.csr_matrix) -> sp.csr_matrix:
    """``A = [[0, R], [R^T, 0]]`` over ``n_users + n_items`` nodes."""
    return sp.bmat([[None, train], [train.T, None]], format="csr", dtype=np.float32)


def normalized_adjacency(train: sp.csr_matrix, eps: float | None = 1e-7, self_loops: bool = False,
                         mode: str = "sym") -> sp.csr_matrix:
    """Normalised bipartite adjacency: ``sym`` = ``D^-1/2 A D^-1/2``, ``rw`` = ``D^-1 A``.

    ``self_loops`` adds the identity before normalising. ``eps`` is added to degrees (None: 1/0 -> 0).
    """
    a = bipartite_adjacency(train)
    if self_loops:
        a = (a + sp.identity(a.shape[0], dtype=np.float32, format="csr")).tocsr()
    deg = np.asarray(a.sum(axis=1)).ravel()
    if mode == "sym":
        d = inverse_degree(deg, eps, 0.5)
        return sp.csr_matrix(sp.diags(d) @ a @ sp.diags(d), dtype=np.float32)
    if mode == "rw":
        return sp.csr_matrix(sp.diags(inverse_degree(deg, eps)) @ a, dtype=np.float32)
    raise ValueError(f"unknown normalisation {mode!r}")


def mean_aggregator(train: sp.csr_matrix, eps: float = 1e-7) -> sp.csr_matrix:
    """``diag(1/(deg+eps)) R``: averages item rows over each user's training items."""
    deg = np.asarray(train.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(inverse_degree(deg, eps)) @ train, dtype=np.float32)


def lightgcn_propagate(adj: SparseOp, ego: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Mean of ``ego, A ego, ..., A^L ego`` (the LightGCN readout, ego layer included)."""
    out = ego
    h = ego
    for _ in range(n_layers):
        h = adj @ h
        out = out + h
    return out / (n_layers + 1)


# ----------------------------------------------------------------------------------------- item kNN graphs


def _row_normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = x.norm(dim=1, keepdim=True)
    zero = norm.squeeze(1) <= 1e-12
    return x / norm.clamp_min(1e-12), zero


def knn_edges(
    x: torch.Tensor | np.ndarray,
    k: int,
    isolate: np.ndarray | None = None,
    isolate_before_topk: bool = False,
    binarize: bool = False,
    chunk_size: int = 2048,
    exclude_columns: np.ndarray | None = None,
    backend: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine top-``k`` neighbours of every row, as raw (unnormalised) edges ``(rows, cols, weights)``.

    Each row keeps its ``k`` largest similarities (itself included, as a weighted self-loop) with the similarity
    as weight (1 when ``binarize``). Rows in ``isolate`` keep only a self-loop of weight 1 and nobody links to
    them; ``isolate_before_topk`` removes them from the candidates before the top-k (others get k neighbours),
    otherwise after (others may be left with fewer). All-zero rows are isolated. ``exclude_columns`` removes
    those items from every row's candidates (their similarity counts as 0, as does an isolated column's before
    the top-k). ``backend`` is a search method of :mod:`dgmrec.knn` (``torch``, ``flat``, ``ivf``); by default
    the configured one for this number of rows (:func:`dgmrec.knn.method_for`). ``torch`` and ``flat`` are
    exact; ``ivf`` may miss some neighbours (and then keeps the next best).
    """
    xt = torch.as_tensor(x).float()
    with torch.no_grad(), torch.autocast(device_type=xt.device.type, enabled=False):  # similarities in float32
        xn, zero = _row_normalize(xt)
        n = xn.shape[0]
        iso = torch.zeros(n, dtype=torch.bool, device=xn.device)
        if isolate is not None:
            iso |= torch.as_tensor(np.asarray(isolate, dtype=bool), device=xn.device)
        iso |= zero
        kk = min(k, n)
        method = backend or knn.method_for(n)
        if method != "torch":
            excluded = None if exclude_columns is None else np.asarray(exclude_columns, dtype=bool)
            return _searched_knn_edges(xn.cpu().numpy(), zero.cpu().numpy(), iso.cpu().numpy(), excluded, kk,
                                       isolate_before_topk, binarize, method)
        rows, cols, vals = [], [], []
        excl = None
        if exclude_columns is not None:
            excl = torch.as_tensor(np.asarray(exclude_columns, dtype=bool), device=xn.device)
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            sim = xn[start:stop] @ xn.T
            if excl is not None:
                sim[:, excl] = 0.0
            if isolate_before_topk:
                sim[:, iso] = 0.0
                sim[iso[start:stop]] = 0.0
                local = torch.arange(start, stop, device=xn.device)
                sim[(local - start)[iso[start:stop]], local[iso[start:stop]]] = 1.0
            v, idx = torch.topk(sim, kk, dim=1)
            r = torch.arange(start, stop, device=xn.device).unsqueeze(1).expand_as(idx)
            keep = v != 0
            if not isolate_before_topk:
                keep &= ~iso[idx] & ~iso[r]
            rows.append(r[keep])
            cols.append(idx[keep])
            vals.append(torch.ones_like(v[keep]) if binarize else v[keep])
        r_all = torch.cat(rows).cpu().numpy()
        c_all = torch.cat(cols).cpu().numpy()
        v_all = torch.cat(vals).cpu().numpy().astype(np.float32)
        if not isolate_before_topk:
            iso_idx = torch.nonzero(iso).squeeze(1).cpu().numpy()
            r_all = np.concatenate([r_all, iso_idx])
            c_all = np.concatenate([c_all, iso_idx])
            v_all = np.concatenate([v_all, np.ones(len(iso_idx), dtype=np.float32)])
    return r_all.astype(np.int64), c_all.astype(np.int64), v_all


def _searched_knn_edges(xn: np.ndarray, zero: np.ndarray, iso: np.ndarray, excluded: np.ndarray | None, kk: int,
                        isolate_before_topk: bool, binarize: bool,
                        method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`knn_edges` through a faiss index: the same edges as the exact chunked search (``flat``).

    The exact search takes the top-``kk`` of a row in which excluded (and, before the top-k, isolated) columns
    read 0 and drops zero entries; a negative similarity therefore survives only when fewer than ``kk`` entries
    lie above it, the ``n_zero`` zeroed columns included. The index holds the other columns and applies that rule.
    """
    n = xn.shape[0]
    cand = ~zero
    if excluded is not None:
        cand &= ~excluded
    if isolate_before_topk:
        cand &= ~iso
    n_zero = n - int(cand.sum())  # columns read as 0 by the exact search
    queries = np.flatnonzero(~iso)
    sims, idx = knn.search(xn, queries, np.flatnonzero(cand), kk, method)
    rank = np.arange(kk)[None, :]
    keep = (idx >= 0) & (sims != 0) & ((sims > 0) | (rank + n_zero < kk))
    if not isolate_before_topk:
        keep &= ~iso[np.maximum(idx, 0)]
    rows = np.broadcast_to(queries[:, None], idx.shape)[keep]
    cols = idx[keep]
    vals = np.ones(len(cols), dtype=np.float32) if binarize else sims[keep].astype(np.float32)
    iso_idx = np.flatnonzero(iso)
    return (np.concatenate([rows, iso_idx]).astype(np.int64), np.concatenate([cols, iso_idx]).astype(np.int64),
            np.concatenate([vals, np.ones(len(iso_idx), dtype=np.float32)]))


def sym_row_normalize(m: sp.spmatrix) -> sp.csr_matrix:
    """``K_ij / sqrt(r_i r_j)`` with ``r`` the row sums (directed graphs; 1/sqrt(0) -> 0)."""
    m = sp.csr_matrix(m, dtype=np.float32)
    r = np.asarray(m.sum(axis=1)).ravel()
    d = np.zeros_like(r, dtype=np.float64)
    pos = r > 0
    d[pos] = r[pos] ** -0.5
    out = sp.diags(d) @ m @ sp.diags(d)
    return sp.csr_matrix(out, dtype=np.float32)


def knn_graph(
    x: torch.Tensor | np.ndarray,
    k: int = 10,
    isolate: np.ndarray | None = None,
    isolate_before_topk: bool = False,
    binarize: bool = False,
    normalize: bool = True,
    chunk_size: int = 2048,
    backend: str | None = None,
) -> sp.csr_matrix:
    """A per-modality item kNN graph (see :func:`knn_edges`), normalised with :func:`sym_row_normalize`."""
    r, c, v = knn_edges(x, k, isolate, isolate_before_topk, binarize, chunk_size, backend=backend)
    n = int(torch.as_tensor(x).shape[0])
    m = sp.csr_matrix((v, (r, c)), shape=(n, n), dtype=np.float32)
    m.sum_duplicates()
    return sym_row_normalize(m) if normalize else m


def blend_rows(old: sp.spmatrix, new: sp.spmatrix, rows: np.ndarray, weight: float) -> sp.csr_matrix:
    """Replace rows ``rows`` of ``old`` by ``weight * new + (1 - weight) * old`` (no renormalisation)."""
    old = sp.csr_matrix(old, dtype=np.float32)
    new = sp.csr_matrix(new, dtype=np.float32)
    sel = np.zeros(old.shape[0], dtype=np.float32)
    sel[np.asarray(rows, dtype=np.int64)] = 1.0
    keep = sp.diags(1.0 - sel * weight) @ old
    add = sp.diags(sel * weight) @ new
    out = sp.csr_matrix(keep + add, dtype=np.float32)
    out.eliminate_zeros()
    return out


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


# ------------------------------------------------------------------ denoised kNN and co-occurrence item graphs


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
        normed = [_row_normalize(torch.as_tensor(x, dtype=torch.float32)) for x in xs]
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
    (``s_e = a[dst_e] . b[src_e]``) give the same values and gradients as :func:`edge_weighted_sum` and a gathered
    row-wise dot product, but run as CSR sparse products (the index structures of both directions are built once)
    and never keep ``|E| x d`` intermediates for the backward pass; the dot products are evaluated in edge chunks.
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

    def propagate(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out[t] = sum_{e: dst_e = t} w_e x[src_e]`` (``n_dst x d``), differentiable in ``w`` and ``x``."""
        return _EdgePropagate.apply(w, x, self)

    def edge_dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``s_e = a[dst_e] . b[src_e]`` for every edge, differentiable in ``a`` and ``b``."""
        return _EdgeDot.apply(a, b, self)


# ------------------------------------------------------------------------------- chunked Sinkhorn transport


class _GaussianKernel:
    """Row blocks of ``K_ij = exp(-||x_i - y_j||^2 / epsilon)``: one GEMM into a reused buffer, one exp.

    The exponent ``(2 x.y - |x|^2 - |y|^2) / epsilon`` is a single product of augmented rows
    ``[x, -|x|^2/eps, 1]`` and ``[2y/eps, 1, -|y|^2/eps]``. A block is only valid until the next call.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, epsilon: float, chunk_size: int) -> None:
        ones_x = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        ones_y = torch.ones(y.shape[0], 1, dtype=y.dtype, device=y.device)
        self.x = torch.cat([x, (x * x).sum(1, keepdim=True) / -epsilon, ones_x], dim=1)
        self.y_t = torch.cat([y * (2.0 / epsilon), ones_y, (y * y).sum(1, keepdim=True) / -epsilon], dim=1).T
        self.y_t = self.y_t.contiguous()
        self.n, self.m, self.chunk_size = x.shape[0], y.shape[0], chunk_size
        self.buffer = torch.empty(min(chunk_size, self.n) * self.m, dtype=x.dtype, device=x.device)

    def ranges(self) -> list[tuple[int, int]]:
        return [(s, min(self.n, s + self.chunk_size)) for s in range(0, self.n, self.chunk_size)]

    def block(self, start: int, stop: int) -> torch.Tensor:
        k = self.buffer[: (stop - start) * self.m].view(stop - start, self.m)
        torch.mm(self.x[start:stop], self.y_t, out=k)
        return k.exp_()


def _sinkhorn_scalings(kernel: _GaussianKernel, n: int, m: int, n_iter: int, transposed: bool,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Scalings ``u, v`` of ``Sinkhorn(K)`` and ``u'`` of ``Sinkhorn(K^T)`` (see :func:`sinkhorn_transport`).

    One pass over the row blocks of ``K`` per iteration serves both problems: ``K v`` and ``K u'`` are local to
    a block, ``K^T u`` and ``K^T v'`` accumulate over blocks. ``v'`` of the last iteration is left to the caller.
    """
    x = kernel.x
    u = torch.empty(n, dtype=x.dtype, device=x.device)
    v = torch.ones(m, dtype=x.dtype, device=x.device)
    u_t = torch.ones(m, dtype=x.dtype, device=x.device)  # only read from the second iteration on
    for it in range(n_iter):
        acc = torch.zeros(2 if transposed else 1, m, dtype=x.dtype, device=x.device)
        right = torch.stack([v, u_t], dim=1) if transposed else v.unsqueeze(1)
        for start, stop in kernel.ranges():
            k = kernel.block(start, stop)
            kv = k @ right  # K v (and K u')
            u[start:stop] = 1.0 / (n * kv[:, 0])  # rows of Sinkhorn(K) sum to 1/n
            left = u[start:stop].unsqueeze(0)
            if transposed:
                # v' of the previous iteration (all ones before the first one)
                v_t = 1.0 / (n * kv[:, 1]) if it > 0 else torch.ones_like(kv[:, 1])
                left = torch.stack([u[start:stop], v_t])
            acc.addmm_(left, k)
        v = 1.0 / (m * acc[0])  # columns of Sinkhorn(K) sum to 1/m
        if transposed:
            u_t = 1.0 / (m * acc[1])  # rows of Sinkhorn(K^T) sum to 1/m
    return u, v, (u_t if transposed else None)


class _TransportApply(torch.autograd.Function):
    """``Gamma @ values`` (and ``Gamma' @ values_t``) with the plans held fixed; block-wise in both directions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, values: torch.Tensor,  # type: ignore[override]
                values_t: torch.Tensor | None, u: torch.Tensor, v: torch.Tensor, u_t: torch.Tensor | None,
                epsilon: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, m = x.shape[0], y.shape[0]
        kernel = _GaussianKernel(x, y, epsilon, chunk_size)
        out = torch.empty(n, values.shape[1], dtype=values.dtype, device=values.device)
        scaled = v.unsqueeze(1) * values
        out_t = v_t = None
        if values_t is not None and u_t is not None:
            out_t = torch.zeros(m, values_t.shape[1], dtype=values_t.dtype, device=values_t.device)
            v_t = torch.empty(n, dtype=x.dtype, device=x.device)
            scaled = torch.cat([scaled, u_t.unsqueeze(1)], dim=1)
        for start, stop in kernel.ranges():
            k = kernel.block(start, stop)
            if out_t is not None and v_t is not None and values_t is not None and u_t is not None:
                both = k @ scaled
                out[start:stop] = (n * u[start:stop]).unsqueeze(1) * both[:, :-1]
                v_t[start:stop] = 1.0 / (n * both[:, -1])  # v' of the last iteration
                out_t.addmm_(k.T, v_t[start:stop].unsqueeze(1) * values_t[start:stop])
            else:
                out[start:stop] = (n * u[start:stop]).unsqueeze(1) * (k @ scaled)
        if out_t is not None and u_t is not None:
            out_t *= (m * u_t).unsqueeze(1)
        ctx.save_for_backward(x, y, u, v, u_t, v_t)
        ctx.epsilon, ctx.chunk_size = epsilon, chunk_size
        return out, out_t

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, grad_t: torch.Tensor | None):  # type: ignore[override]
        x, y, u, v, u_t, v_t = ctx.saved_tensors
        n, m = x.shape[0], y.shape[0]
        g_values = g_values_t = scaled_t = None
        if ctx.needs_input_grad[2] and grad is not None:
            g_values = torch.zeros(m, grad.shape[1], dtype=x.dtype, device=x.device)
        if ctx.needs_input_grad[3] and grad_t is not None and v_t is not None and u_t is not None:
            g_values_t = torch.empty(n, grad_t.shape[1], dtype=x.dtype, device=x.device)
            scaled_t = (m * u_t).unsqueeze(1) * grad_t
        if g_values is not None or g_values_t is not None:
            kernel = _GaussianKernel(x, y, ctx.epsilon, ctx.chunk_size)
            for start, stop in kernel.ranges():
                k = kernel.block(start, stop)
                if g_values is not None and grad is not None:
                    g_values.addmm_(k.T, (n * u[start:stop]).unsqueeze(1) * grad[start:stop])
                if g_values_t is not None and scaled_t is not None:
                    g_values_t[start:stop] = v_t[start:stop].unsqueeze(1) * (k @ scaled_t)
            if g_values is not None:
                g_values *= v.unsqueeze(1)
        return None, None, g_values, g_values_t, None, None, None, None, None


def sinkhorn_transport(
    x: torch.Tensor,
    y: torch.Tensor,
    values: torch.Tensor,
    epsilon: float = 5.0,
    n_iter: int = 10,
    values_t: torch.Tensor | None = None,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Entropic transport between the rows of ``x`` (n) and ``y`` (m), applied to ``values`` without an n x m matrix.

    Kernel :math:`K_{ij} = \exp(-\|x_i - y_j\|^2/\epsilon)`; the plan is the reference's fixed-iteration Sinkhorn
    (CI2MG): start from :math:`K/\sum K`, repeat ``n_iter`` times "rows sum to 1/n, then columns sum to 1/m", and
    multiply by ``n``, i.e. :math:`\Gamma = n\,\mathrm{diag}(u) K \mathrm{diag}(v)` (columns sum to ``n/m``).
    Returns :math:`\Gamma\,` ``values`` (``values``: m rows) and, when ``values_t`` (n rows) is given,
    :math:`\Gamma'\,` ``values_t`` with :math:`\Gamma'` the same algorithm run on :math:`K^\top` (the reverse
    direction, sharing the passes over ``K``); otherwise ``None``. The plans are constants (no gradient to
    ``x``/``y``); the outputs are differentiable with respect to ``values``/``values_t``. ``K`` is rebuilt in row
    blocks of ``chunk_size`` in every pass (``n_iter + 1`` passes forward, one backward), so memory stays
    ``O(chunk_size * m)``. As in the reference there is no log-domain stabilisation: a row or column whose
    squared distances all exceed ~``85 * epsilon`` underflows.
    """
    with torch.no_grad():
        xd, yd = x.detach(), y.detach()
        kernel = _GaussianKernel(xd, yd, float(epsilon), int(chunk_size))
        u, v, u_t = _sinkhorn_scalings(kernel, xd.shape[0], yd.shape[0], int(n_iter), values_t is not None)
    return _TransportApply.apply(xd, yd, values, values_t, u, v, u_t, float(epsilon), int(chunk_size))
