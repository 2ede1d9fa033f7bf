"""Nearest-neighbour search behind the item kNN graphs of :mod:`dgmrec.graphs`, for catalogues of any size.

Three methods find each item's top-``k`` inner products with the (row-normalised) features:

* ``torch``: the exact search of :func:`dgmrec.graphs.knn_edges`, row chunks of the similarity times all
  items (``O(n^2 d)``; no extra dependency);
* ``flat``: faiss's exact inner-product index (``IndexFlatIP``), the same neighbours as ``torch``;
* ``ivf``: faiss's inverted-file index (``IndexIVFFlat``, ``nlist ~ 8 sqrt(n)`` cells from a seeded spherical
  k-means, of which ``nprobe`` are searched per query: by default enough for ~4,096 candidates, key
  ``knn_nprobe``): approximate, ``O(n * 4096 d)`` plus the k-means, and deterministic (no graph index whose
  construction depends on thread timing).

The configuration keys ``knn_backend`` (``auto``, ``exact``, ``faiss``) and ``knn_exact_max_items`` select
the method (:func:`method_for`): ``exact`` always searches exactly with torch; ``faiss`` uses ``flat`` up
to ``knn_exact_max_items`` items and ``ivf`` above; ``auto`` (the default) uses torch up to
``knn_exact_max_items`` items, so a run's graphs do not depend on whether faiss is installed, and ``ivf``
above when the ``scale`` extra (``faiss-cpu``) is installed (else torch, with a warning). With CUDA and a
faiss built with GPU support, the faiss indexes run on the GPU. :func:`dgmrec.models.build_model` applies the
configuration with :func:`set_knn_options`; it stays in effect for the graphs a model rebuilds while training.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from dgmrec.errors import ConfigError

KNN_BACKENDS = ("auto", "exact", "faiss")
METHODS = ("torch", "flat", "ivf")


@dataclass(frozen=True)
class KnnOptions:
    """How kNN graphs are searched (see the module documentation)."""

    backend: str = "auto"
    exact_max_items: int = 100_000
    #: IVF cells searched per query (0: :func:`ivf_probes`)
    nprobe: int = 0


_options = KnnOptions()


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def set_knn_options(config: Mapping[str, Any]) -> KnnOptions:
    """Apply the kNN keys of a configuration (absent keys keep their defaults); returns the new options."""
    global _options
    backend = str(config.get("knn_backend", "auto"))
    if backend not in KNN_BACKENDS:
        raise ConfigError(f"key 'knn_backend' must be one of {', '.join(KNN_BACKENDS)}, got {backend!r}",
                          source="knn_backend")
    _options = KnnOptions(backend=backend, exact_max_items=int(config.get("knn_exact_max_items", 100_000)),
                          nprobe=int(config.get("knn_nprobe", 0)))
    return _options


def knn_options() -> KnnOptions:
    return _options


@contextlib.contextmanager
def using(**changes: Any) -> Iterator[KnnOptions]:
    """Temporarily change the options (``backend``, ``exact_max_items``, ``nprobe``)."""
    global _options
    saved = _options
    _options = replace(saved, **changes)
    try:
        yield _options
    finally:
        _options = saved


def method_for(n_items: int, options: KnnOptions | None = None) -> str:
    """The search method (one of :data:`METHODS`) for a graph over ``n_items`` items."""
    opt = options or _options
    large = n_items > opt.exact_max_items
    if opt.backend == "exact":
        return "torch"
    if opt.backend == "faiss":
        if not faiss_available():
            raise ConfigError("knn_backend faiss needs the faiss package (pip install 'dgmrec[scale]')",
                              source="knn_backend")
        return "ivf" if large else "flat"
    if not large:
        return "torch"
    if faiss_available():
        return "ivf"
    warnings.warn(f"{n_items} items exceed knn_exact_max_items={opt.exact_max_items} but faiss is not "
                  f"installed (pip install 'dgmrec[scale]'): searching exactly", stacklevel=3)
    return "torch"


def ivf_cells(n: int) -> int:
    """Number of IVF cells for ``n`` vectors: ``8 sqrt(n)``, at most ``n / 39`` (faiss's training minimum)."""
    return max(1, min(int(8 * math.sqrt(n)), n // 39))


def ivf_probes(n: int, nlist: int) -> int:
    """Default number of cells searched per query: enough for about 4,096 candidates, at least 16."""
    return min(nlist, max(16, math.ceil(4096 * nlist / max(1, n))))


def search(xn: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int, method: str,
           nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest inner products of rows ``queries`` of ``xn`` with rows ``candidates`` of ``xn``.

    Returns ``(similarities, items)``, both ``(len(queries), k)``, in decreasing similarity; ``items`` are
    row ids of ``xn`` (``-1`` where fewer than ``k`` candidates were found). ``method`` is ``flat`` or ``ivf``;
    ``nprobe`` (IVF cells searched per query) defaults to the configured ``knn_nprobe``, else :func:`ivf_probes`.
    """
    import faiss

    xn = np.ascontiguousarray(xn, dtype=np.float32)
    cand = np.asarray(candidates, dtype=np.int64)
    n_q = len(queries)
    if n_q == 0 or len(cand) == 0 or k == 0:
        return np.zeros((n_q, k), dtype=np.float32), np.full((n_q, k), -1, dtype=np.int64)
    base = xn if len(cand) == xn.shape[0] else np.ascontiguousarray(xn[cand])
    d = xn.shape[1]
    faiss.omp_set_num_threads(torch.get_num_threads())
    if method == "flat":
        index = faiss.IndexFlatIP(d)
    elif method == "ivf":
        nlist = ivf_cells(len(cand))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # cosine k-means: centroids renormalised
        index.cp.seed = 1234
        index.cp.niter = 10
        index.cp.max_points_per_centroid = 64  # k-means on at most 64 sampled vectors per cell
        index.nprobe = min(nlist, nprobe or _options.nprobe or ivf_probes(len(cand), nlist))
    else:
        raise ValueError(f"unknown faiss search method {method!r}")
    index = _on_gpu(faiss, index)
    if method == "ivf":
        index.train(base)
    index.add(base)
    sims = np.empty((n_q, k), dtype=np.float32)
    ids = np.empty((n_q, k), dtype=np.int64)
    step = 65536  # queries per call: bounds faiss's per-call buffers
    for start in range(0, n_q, step):
        q = np.ascontiguousarray(xn[queries[start:start + step]])
        sims[start:start + step], ids[start:start + step] = index.search(q, k)
    found = ids >= 0
    ids[found] = cand[ids[found]]
    return sims, ids


def _on_gpu(faiss: Any, index: Any) -> Any:
    """The index on the first GPU when CUDA is available and faiss has GPU support (untested on GPU)."""
    if not (torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")):
        return index
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, torch.cuda.current_device(), index)
    gpu_index.dgmrec_resources = resources  # the GPU memory pool must live as long as the index
    return gpu_index
