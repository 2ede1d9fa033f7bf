"""Graph builders against dense reference implementations on small inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dgmrec.graphs import SparseOp, blend_rows, knn_graph, lightgcn_propagate, mean_aggregator, normalized_adjacency


def dense_knn(x, k, isolate=None, before=False):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    n = len(x)
    iso = np.zeros(n, bool) if isolate is None else isolate
    if before:
        sim[:, iso] = 0
        sim[iso] = 0
        sim[iso, iso] = 1
    K = np.zeros_like(sim)
    for i in range(n):
        idx = np.argsort(-sim[i], kind="stable")[:k]
        K[i, idx] = sim[i, idx]
    if not before:
        K[iso] = 0
        K[:, iso] = 0
        K[iso, iso] = 1
    r = K.sum(1)
    d = np.where(r > 0, r ** -0.5, 0)
    return d[:, None] * K * d[None, :]


@pytest.mark.parametrize("before", [False, True])
def test_knn_matches_dense(before):
    rng = np.random.default_rng(0)
    x = rng.random((40, 6)).astype(np.float32) + 0.1
    iso = rng.random(40) < 0.3
    got = knn_graph(x, 5, isolate=iso, isolate_before_topk=before, chunk_size=7).toarray()
    np.testing.assert_allclose(got, dense_knn(x.astype(np.float64), 5, iso, before), atol=1e-5)


def test_isolated_items_keep_only_self_loop():
    rng = np.random.default_rng(1)
    x = rng.random((20, 4)).astype(np.float32)
    iso = np.zeros(20, bool)
    iso[[3, 7]] = True
    g = knn_graph(x, 4, isolate=iso).toarray()
    for z in (3, 7):
        assert g[z, z] == pytest.approx(1.0)
        assert np.count_nonzero(g[z]) == 1 and np.count_nonzero(g[:, z]) == 1


def test_zero_rows_are_isolated_not_nan():
    x = np.ones((6, 3), dtype=np.float32)
    x[2] = 0
    g = knn_graph(x, 3).toarray()
    assert np.isfinite(g).all() and g[2, 2] == pytest.approx(1.0)


def test_normalized_adjacency_and_lightgcn():
    r = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 0]], dtype=np.float32))
    a = normalized_adjacency(r).toarray()
    dense = np.zeros((5, 5))
    dense[:2, 2:] = r.toarray()
    dense[2:, :2] = r.toarray().T
    deg = dense.sum(1)
    expect = dense / np.sqrt(np.outer(deg + 1e-7, deg + 1e-7))
    np.testing.assert_allclose(a, expect, atol=1e-6)
    ego = torch.randn(5, 3, requires_grad=True)
    out = lightgcn_propagate(SparseOp(a), ego, 2)
    t = torch.tensor(expect, dtype=torch.float32)
    np.testing.assert_allclose(out.detach().numpy(), ((ego + t @ ego + t @ (t @ ego)) / 3).detach().numpy(),
                               atol=1e-5)
    out.sum().backward()  # gradient flows through the sparse operator with its transpose
    np.testing.assert_allclose(ego.grad.numpy(), ((1 + t.sum(0) + (t @ t).sum(0)) / 3)[:, None].expand(5, 3).numpy(),
                               atol=1e-5)


def test_mean_aggregator_zero_for_empty_rows():
    r = sp.csr_matrix(np.array([[1, 1, 0], [0, 0, 0]], dtype=np.float32))
    agg = mean_aggregator(r).toarray()
    np.testing.assert_allclose(agg[0], [0.5, 0.5, 0], atol=1e-6)
    assert not agg[1].any()


def test_blend_rows():
    old = sp.csr_matrix(np.eye(3, dtype=np.float32))
    new = sp.csr_matrix(np.full((3, 3), 0.5, dtype=np.float32))
    out = blend_rows(old, new, np.array([1]), 0.4).toarray()
    np.testing.assert_allclose(out[0], [1, 0, 0])
    np.testing.assert_allclose(out[1], [0.2, 0.6 + 0.2, 0.2])
    np.testing.assert_allclose(out[2], [0, 0, 1])


def test_sparse_rows_match_the_dense_rows_with_gradients():
    rng = np.random.default_rng(0)
    a = sp.random(30, 20, density=0.2, random_state=1, format="csr", dtype=np.float32)
    op = SparseOp(a)
    rows = torch.tensor([3, 7, 8, 21])
    x = torch.tensor(rng.normal(size=(20, 5)), dtype=torch.float32, requires_grad=True)
    sub = op.rows(rows) @ x
    dense = torch.tensor(a.toarray())[rows] @ x.detach()
    np.testing.assert_allclose(sub.detach().numpy(), dense.numpy(), rtol=1e-6, atol=1e-6)
    weights = torch.tensor(rng.normal(size=(4, 5)), dtype=torch.float32)
    (sub * weights).sum().backward()
    expected = torch.tensor(a.toarray())[rows].T @ weights
    np.testing.assert_allclose(x.grad.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
