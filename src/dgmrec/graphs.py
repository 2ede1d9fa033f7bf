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


def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scaled to unit L2 norm (all-zero rows stay zero) and the mask of the all-zero rows."""
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
    xt = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad(), torch.autocast(device_type=xt.device.type, enabled=False):  # similarities in float32
        xn, zero = normalize_rows(xt)
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
