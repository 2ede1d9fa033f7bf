"""The computations behind a study's tables and figures.

Two kinds: *post-training* analyses that need the trained model and its dataset (recall by missing level,
cross-modal retrieval, disentanglement diagnostics), run once per run by the study runner and stored beside the
run; and *aggregations* that read only the stored run records (mean and spread over seeds, improvement, paired
significance tests, relative drops) and are what ``dgmrec study report`` uses.

Definitions:

* **Recall by missing level**: the test interactions are grouped by how many modalities their item misses
  (0..M). Every user is ranked against all items as usual (full ranking, training items masked) and, for a
  group g, ``recall_g@K(u) = |top-K(u) ∩ T_g(u)| / |T_g(u)|`` with ``T_g(u)`` the user's test items in g; the
  group's value is the mean over the users with ``T_g(u)`` non-empty. The group ``all`` is the usual Recall@K.
* **Paired tests** compare two table rows on one column: over users, the Wilcoxon signed-rank test of the
  per-user metric (each user's value averaged over the seeds); over seeds, the paired t-test of the per-seed
  means (needs two or more seeds). Both two-sided.
* **Disentanglement**: per modality, the mean cosine between an item's general and specific encoder outputs
  (items observing the modality), and per pair of modalities the mean cosine between the items' general
  outputs (items observing both); plus a 2-D t-SNE of the general and specific features of sampled items.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BY_LEVEL_FILE = "by_missing_level.json"
RETRIEVAL_FILE = "retrieval.json"
DISENTANGLE_FILE = "disentanglement.json"
TSNE_FILE = "tsne.csv"


# ====================================================================================== post-training
def grouped_recall(top: np.ndarray, users: np.ndarray, test_pairs: np.ndarray, item_group: np.ndarray,
                   ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """Recall@K per item group (see the module notes).

    ``top`` holds the ranked items of ``users`` (one row each, at least ``max(ks)`` long); ``test_pairs`` are
    ``(user, item)`` rows (duplicates count once; users not in ``users`` are ignored); ``item_group[i]`` is the
    group of item ``i`` (a small non-negative integer). Returns ``{group: {"recall@K": mean, "users": n}}``
    with the groups as strings and ``"all"`` for the whole test set.
    """
    n_items = len(item_group)
    row_of = {int(u): r for r, u in enumerate(users)}
    pairs = np.unique(np.asarray(test_pairs, dtype=np.int64), axis=0)
    keep = np.fromiter((int(u) in row_of for u in pairs[:, 0]), dtype=bool, count=len(pairs))
    pairs = pairs[keep]
    rows = np.fromiter((row_of[int(u)] for u in pairs[:, 0]), dtype=np.int64, count=len(pairs))
    groups = item_group[pairs[:, 1]]
    out: dict[str, dict[str, float]] = {}
    labels: list[tuple[str, np.ndarray]] = [(str(g), groups == g) for g in sorted(set(groups.tolist()))]
    labels.append(("all", np.ones(len(pairs), dtype=bool)))
    for k in ks:
        top_codes = (np.arange(len(users))[:, None] * n_items + top[:, :k]).ravel()
        hit = np.isin(rows * n_items + pairs[:, 1], top_codes)
        for label, sel in labels:
            n_truth = np.bincount(rows[sel], minlength=len(users))
            n_hit = np.bincount(rows[sel], weights=hit[sel].astype(np.float64), minlength=len(users))
            has = n_truth > 0
            entry = out.setdefault(label, {"users": int(has.sum())})
            entry[f"recall@{k}"] = float(np.mean(n_hit[has] / n_truth[has])) if has.any() else float("nan")
    return out


def evaluated_users(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Users the protocol evaluates on a split: with a test item and at least one training interaction."""
    return np.intersect1d(np.unique(test[:, 0]), np.unique(train[:, 0]))


def by_missing_level(loaded: Any, ks: Sequence[int]) -> dict[str, Any]:
    """Recall@K by number of missing modalities of a loaded run (:class:`dgmrec.api.LoadedRun`)."""
    from dgmrec import api

    ds = loaded.dataset
    users = evaluated_users(ds.train, ds.test)
    k = max(ks)
    recs = api.recommend(loaded, k=k, users=users.tolist(), exclude="train", ids="internal")
    top = recs["item"].to_numpy().reshape(len(users), -1)
    groups = grouped_recall(top, users, ds.test, ds.missing_count, ks)
    return {"ks": list(ks), "modalities": ds.modalities, "groups": groups}


def retrieval(loaded: Any, nn_k: int, similarity: str) -> dict[str, Any]:
    from dgmrec import api
    from dgmrec.errors import InputError

    try:
        res = api.retrieval(loaded, nn_k=nn_k, similarity=similarity)
    except InputError as exc:  # a model that does not generate features
        return {"applicable": False, "reason": str(exc)}
    return {"applicable": True, "n_modalities": len(loaded.dataset.modalities), **res}


def general_specific(loaded: Any) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Per modality, the general and specific encoder outputs of every item (None for other models)."""
    import torch

    from dgmrec.models.dgmrec import DGMRec

    model = loaded.model
    if not isinstance(model, DGMRec):
        return None
    with torch.no_grad():
        parts = [model.encode(j) for j in range(len(loaded.dataset.modalities))]
    return [g.cpu().numpy() for g, _ in parts], [s.cpu().numpy() for _, s in parts]


def disentanglement(general: Sequence[np.ndarray], specific: Sequence[np.ndarray], observed: np.ndarray,
                    modalities: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean cosines general/specific per modality and general/general per modality pair (module notes)."""
    import torch

    from dgmrec.models.dgmrec import disentanglement_cosines

    cosines = disentanglement_cosines([torch.as_tensor(g) for g in general], [torch.as_tensor(x) for x in specific],
                                      torch.as_tensor(observed), modalities)
    return {name: {"cosine": value, "items": n} for name, (value, n) in cosines.items()}


def tsne_points(general: Sequence[np.ndarray], specific: Sequence[np.ndarray], modalities: Sequence[str],
                n_items: int, seed: int) -> list[tuple[int, str, str, float, float]]:
    """2-D t-SNE of the general and specific features of ``n_items`` random items (scikit-learn)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        from dgmrec.errors import InputError

        raise InputError("the t-SNE of the disentanglement analysis needs scikit-learn: pip install "
                         "'dgmrec[experiments]'", source="analyses: disentanglement") from None

    total = general[0].shape[0]
    items = np.sort(np.random.default_rng(seed).choice(total, size=min(n_items, total), replace=False))
    blocks, labels = [], []
    for j, m in enumerate(modalities):
        for part, x in (("general", general[j]), ("specific", specific[j])):
            blocks.append(x[items])
            labels += [(int(i), m, part) for i in items]
    x = np.concatenate(blocks).astype(np.float64)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return [(i, m, part, float(px), float(py)) for (i, m, part), (px, py) in zip(labels, xy, strict=True)]


def run_post_analysis(name: str, loaded: Any, folder: Path, options: Mapping[str, Any]) -> None:
    """Compute one post-training analysis of a loaded run and store it in the run folder."""
    if name == "by_missing_level":
        _write_json(folder / BY_LEVEL_FILE, by_missing_level(loaded, [int(k) for k in options["k"]]))
    elif name == "retrieval":
        _write_json(folder / RETRIEVAL_FILE, retrieval(loaded, int(options["nn_k"]), str(options["similarity"])))
    elif name == "disentanglement":
        parts = general_specific(loaded)
        if parts is None:
            _write_json(folder / DISENTANGLE_FILE, {"applicable": False})
            return
        ds = loaded.dataset
        general, specific = parts
        res = {"applicable": True, "modalities": ds.modalities,
               "cosines": disentanglement(general, specific, ds.observed, ds.modalities)}
        points = tsne_points(general, specific, ds.modalities, int(options["items"]), int(options["seed"]))
        lines = ["item,modality,part,x,y"] + [f"{i},{m},{p},{x:.6f},{y:.6f}" for i, m, p, x, y in points]
        tmp = folder / f".{TSNE_FILE}.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(folder / TSNE_FILE)
        _write_json(folder / DISENTANGLE_FILE, res)
    else:
        raise ValueError(f"unknown post-training analysis {name!r}")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)


# ======================================================================================== aggregation
@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over ``n`` values (std is NaN for one value)."""

    mean: float
    std: float
    n: int
    digits: int | None = None  # decimals when printed (None: the table's default)

    @classmethod
    def of(cls, values: Sequence[float], digits: int | None = None) -> Stat | None:
        vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not vals:
            return None
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
        return cls(mean=float(np.mean(vals)), std=std, n=len(vals), digits=digits)


def improvement(best: float, other: float) -> float:
    """Relative improvement of ``best`` over ``other`` in percent."""
    return (best - other) / other * 100.0 if other else float("nan")


def relative_drop(reference: float, value: float) -> float:
    """Drop of ``value`` below ``reference`` in percent of the reference (positive = worse)."""
    return (reference - value) / reference * 100.0 if reference else float("nan")


def wilcoxon_users(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired per-user values (NaN when every difference is 0)."""
    from scipy.stats import wilcoxon

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) == 0 or not np.any(d != 0):
        return float("nan")
    return float(wilcoxon(a, b, alternative="two-sided").pvalue)


def ttest_seeds(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided paired t-test p-value over seeds (NaN with fewer than two seeds or constant differences)."""
    from scipy.stats import ttest_rel

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(d) < 2 or np.allclose(d, d[0]):
        return float("nan")
    return float(ttest_rel(a, b).pvalue)


def read_per_user(folder: Path, split: str, metric: str) -> dict[int, float]:
    """A run's per-user metric at its best-validation epoch (``per_user_<split>.csv``)."""
    path = folder / f"per_user_{split}.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        header = f.readline().strip().split(",")
        if metric not in header:
            return {}
        col = header.index(metric)
        out = {}
        for line in f:
            parts = line.strip().split(",")
            if len(parts) == len(header):
                out[int(float(parts[0]))] = float(parts[col])
    return out


def paired_user_vectors(runs_a: Sequence[Path], runs_b: Sequence[Path], split: str, metric: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per-user values of two rows (each averaged over the row's seeds), over the users both have."""
    def averaged(runs: Sequence[Path]) -> dict[int, float]:
        tables = [read_per_user(r, split, metric) for r in runs]
        tables = [t for t in tables if t]
        if not tables:
            return {}
        users = set.intersection(*(set(t) for t in tables))
        return {u: float(np.mean([t[u] for t in tables])) for u in users}

    a, b = averaged(runs_a), averaged(runs_b)
    users = sorted(set(a) & set(b))
    return np.array([a[u] for u in users]), np.array([b[u] for u in users])
