"""kNN item graphs through faiss: the exact index gives the torch graph, the approximate one finds planted
neighbours, and the configuration selects the search method."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from dgmrec import knn
from dgmrec.config import resolve_config
from dgmrec.errors import ConfigError
from dgmrec.graphs import knn_edges, knn_graph
from dgmrec.models import build_model

faiss = pytest.importorskip("faiss")


def _matrix(edges: tuple[np.ndarray, np.ndarray, np.ndarray], n: int) -> sp.csr_matrix:
    r, c, v = edges
    m = sp.csr_matrix((v, (r, c)), shape=(n, n))
    m.sum_duplicates()
    return m


def _neighbours(edges: tuple[np.ndarray, np.ndarray, np.ndarray]) -> set[tuple[int, int]]:
    return set(zip(edges[0].tolist(), edges[1].tolist(), strict=True))


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("exclude", [False, True])
def test_faiss_exact_index_gives_the_torch_graph(small3, before, exclude):
    rng = np.random.default_rng(0)
    n = small3.n_items
    isolate = rng.random(n) < 0.2
    excluded = rng.random(n) < 0.1 if exclude else None
    for x in small3.features.values():
        x = x.copy()
        x[rng.random(n) < 0.05] = 0.0  # all-zero rows are isolated too
        args = {"k": 10, "isolate": isolate, "isolate_before_topk": before, "exclude_columns": excluded}
        exact = knn_edges(x, backend="torch", chunk_size=64, **args)
        flat = knn_edges(x, backend="flat", **args)
        assert _neighbours(flat) == _neighbours(exact)
        assert abs(_matrix(flat, n) - _matrix(exact, n)).max() < 1e-5  # the same cosine weights


def test_faiss_exact_keeps_negative_similarities_as_the_torch_search_does():
    # k close to n: rows take negative similarities, unless the zeroed (excluded / isolated) columns fill the list
    rng = np.random.default_rng(1)
    negative = 0
    for _ in range(20):
        x = rng.normal(size=(30, 4)).astype(np.float32)
        isolate, excluded = rng.random(30) < 0.2, rng.random(30) < 0.2
        for before in (False, True):
            args = {"k": 25, "isolate": isolate, "isolate_before_topk": before, "exclude_columns": excluded}
            exact = knn_edges(x, backend="torch", **args)
            negative += int((exact[2] < 0).sum())
            assert _neighbours(knn_edges(x, backend="flat", **args)) == _neighbours(exact)
    assert negative > 0  # the case is exercised


def test_knn_graph_passes_the_backend_on():
    x = np.random.default_rng(2).random((50, 8)).astype(np.float32)
    a = knn_graph(x, 5, backend="torch")
    b = knn_graph(x, 5, backend="flat")
    assert (a != 0).sum() == (b != 0).sum() and abs(a - b).max() < 1e-5


def planted_clusters(n_clusters: int = 300, per_cluster: int = 10, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Items in noisy clusters around random directions: an item's neighbours are mostly its cluster's."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    x = np.repeat(centres, per_cluster, axis=0) + 0.6 * rng.normal(size=(n_clusters * per_cluster, dim))
    return x.astype(np.float32)


def test_approximate_index_recovers_the_exact_neighbours_of_planted_clusters():
    x = planted_clusters()
    exact = _neighbours(knn_edges(x, 10, backend="torch"))
    nlist = knn.ivf_cells(len(x))
    recall = {}
    for nprobe in (1, 4):  # of 76 cells
        with knn.using(nprobe=nprobe):
            recall[nprobe] = len(exact & _neighbours(knn_edges(x, 10, backend="ivf"))) / len(exact)
    assert nlist > 50 and recall[4] >= 0.9
    assert recall[1] < recall[4] < 1.0  # really approximate: fewer cells, fewer neighbours found


def test_method_follows_backend_and_size(monkeypatch):
    opts = knn.KnnOptions(backend="auto", exact_max_items=100)
    assert knn.method_for(100, opts) == "torch"
    assert knn.method_for(101, opts) == "ivf"
    assert knn.method_for(10**6, knn.KnnOptions(backend="exact", exact_max_items=100)) == "torch"
    faiss_opts = knn.KnnOptions(backend="faiss", exact_max_items=100)
    assert (knn.method_for(100, faiss_opts), knn.method_for(101, faiss_opts)) == ("flat", "ivf")
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    with pytest.warns(UserWarning, match="faiss is not installed"):
        assert knn.method_for(101, opts) == "torch"
    with pytest.raises(ConfigError, match="knn_backend faiss needs"):
        knn.method_for(10, faiss_opts)


def test_build_model_applies_the_knn_keys(small2, monkeypatch):
    calls: list[str] = []
    search = knn.search

    def spy(xn, queries, candidates, k, method, nprobe=0):
        calls.append(method)
        return search(xn, queries, candidates, k, method, nprobe)

    monkeypatch.setattr(knn, "search", spy)
    cfg, _ = resolve_config("MGCN", small2.name, overrides={"knn_backend": "faiss", "knn_exact_max_items": 0})
    try:
        build_model("MGCN", small2, cfg)
        assert calls and set(calls) == {"ivf"}
        cfg["knn_backend"] = "exact"
        calls.clear()
        build_model("MGCN", small2, cfg)
        assert calls == []
    finally:
        knn.set_knn_options({})


def test_unknown_backend_is_a_config_error(small2):
    with pytest.raises(ConfigError, match="knn_backend"):
        resolve_config("MGCN", small2.name, overrides={"knn_backend": "annoy"})
