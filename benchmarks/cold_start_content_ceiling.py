"""How far can content take the cold ranking? Training-free content scorers against a new-item run's cold path.

Cold Recall@20 (only new items ranked, truth = their test interactions) and the same on the validation split
(``valid_cold``, the split that chooses every weight here; the test split is only reported) for:

* ``Content``: the registered content-only floor (a user's mean content profile, cosine per modality);
* ``Content, graph profile (beta)``: the same scorer with each user's profile mixed with a profile propagated
  three hops over the normalised user-item training graph, ``unit(p + beta * unit(A A^T A X))``; ``beta`` is
  chosen on ``valid_cold``;
* ``content popularity``: every user gets the same ranking, the new items' predicted log-degree (ridge from
  their scaled content, fitted on old items);
* the run's own scores (its cold path, as evaluated);
* the run's scores plus ``w`` times the graph-profile scores (both z-scored over the new items per user),
  ``w`` chosen on ``valid_cold``;
* two upper estimates read off the test split: that blend with the predicted popularity as a third z-scored
  term (the best of a grid), and the new items ranked by their actual test degree (an oracle).

::

    python benchmarks/cold_start_content_ceiling.py --run RUN [--json F]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from dgmrec import api
from dgmrec.config import resolve_config
from dgmrec.evaluation.protocol import Evaluator
from dgmrec.graphs import normalized_adjacency
from dgmrec.losses import ridge_fit
from dgmrec.models import build_model

BETAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)
POPULARITY_WEIGHTS = (0.25, 0.5, 1.0, 2.0)
Score = Callable[[torch.Tensor], torch.Tensor]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _zscored(scores: Score, cols: np.ndarray) -> Score:
    """Scores standardised per user over the columns ``cols`` (the ranked candidates)."""
    def fn(users: torch.Tensor) -> torch.Tensor:
        s = scores(users)
        c = s[:, torch.as_tensor(cols)]
        return (s - c.mean(1, keepdim=True)) / c.std(1, keepdim=True).clamp_min(1e-12)
    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained new-item run (its cold path is evaluated as is)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    lr = api.load_run(args.run)
    ds, model = lr.dataset, lr.model
    if ds.new_items is None:
        raise SystemExit("needs a run trained in the new-item setting")
    new = ds.new_items.astype(bool)
    cols = np.flatnonzero(new)
    train = ds.train_matrix()
    ev = Evaluator.from_pairs(train, {"valid_cold": ds.valid, "test_cold": ds.test}, ks=[20], metrics=["recall"],
                              candidates={"valid_cold": new, "test_cold": new})

    def measure(fn: Score) -> dict[str, float]:
        with torch.no_grad():
            return {s: round(ev.evaluate(fn, s)[0]["recall@20"], 5) for s in ev.splits}

    rows: dict[str, dict[str, float]] = {}

    def report(name: str, fn: Score) -> dict[str, float]:
        rows[name] = measure(fn)
        print(f"{name:55s} " + " ".join(f"{s}={v:.4f}" for s, v in rows[name].items()), flush=True)
        return rows[name]

    config, _ = resolve_config("Content", ds.name)
    content = build_model("Content", ds, config)
    content.eval()
    report("Content", content.score_users)

    # graph profiles: each modality block of the user profile mixed with its three-hop propagation
    a = normalized_adjacency(train, eps=None)[: ds.n_users, ds.n_users:]  # the user x item block
    items = content.item_content.numpy()
    plain = content.user_content.numpy()
    edges = np.cumsum([0] + [ds.features[m].shape[1] for m in content.content_modalities])
    blocks = [slice(int(lo), int(hi)) for lo, hi in pairwise(edges)]
    far = np.hstack([_unit(a @ (a.T @ (a @ items[:, b]))) for b in blocks])

    def use_profiles(beta: float) -> None:
        mixed = np.hstack([_unit(plain[:, b] + beta * far[:, b]) for b in blocks])
        content.user_content = torch.as_tensor(mixed.astype(np.float32))

    best_beta, best_valid = 0.0, -1.0
    for beta in BETAS:
        use_profiles(beta)
        r = report(f"Content, graph profile (beta={beta:g})", content.score_users)
        if r["valid_cold"] > best_valid:
            best_beta, best_valid = beta, r["valid_cold"]
    use_profiles(best_beta)
    rows["Content, graph profile (chosen on valid_cold)"] = {**rows[f"Content, graph profile (beta={best_beta:g})"],
                                                             "beta": best_beta}
    graph_scores = content.score_users

    # content -> popularity
    design = torch.as_tensor(np.hstack([items, ds.observed.astype(np.float32)]))
    degree = torch.as_tensor(np.log1p(np.asarray(train.sum(0)).ravel()).astype(np.float32))[:, None]
    w, b = ridge_fit(design[~torch.as_tensor(new)], degree[~torch.as_tensor(new)], 10.0)
    popularity = (design @ w + b).ravel()
    report("content popularity (ridge, strength 10)", lambda u: popularity.expand(len(u), -1))

    model.eval()
    with torch.no_grad():
        model.prepare_eval()
    report(f"{lr.model.name} (the run)", model.score_users)
    best_w, best_valid = 0.0, -1.0
    zr, zc = _zscored(model.score_users, cols), _zscored(graph_scores, cols)
    for weight in WEIGHTS:
        r = report(f"{lr.model.name} + {weight:g} x graph profile", lambda u, k=weight: zr(u) + k * zc(u))
        if r["valid_cold"] > best_valid:
            best_w, best_valid = weight, r["valid_cold"]
    rows[f"{lr.model.name} + graph profile (chosen on valid_cold)"] = {
        **rows[f"{lr.model.name} + {best_w:g} x graph profile"], "weight": best_w}
    # upper estimates, read off the test split: the blend with predicted popularity as a third term, and the
    # new items ranked by their actual test degree (an oracle no model has)
    zp = _zscored(lambda u: popularity.expand(len(u), -1), cols)
    grid = {(k, q): measure(lambda u, k=k, q=q: zr(u) + k * zc(u) + q * zp(u))
            for k in WEIGHTS for q in POPULARITY_WEIGHTS}
    (k, q), r = max(grid.items(), key=lambda kv: kv[1]["test_cold"])
    rows[f"{lr.model.name} + graph profile + popularity (best on test_cold)"] = {**r, "weight": k, "popularity": q}
    test_degree = torch.as_tensor(np.bincount(ds.test[:, 1], minlength=ds.n_items).astype(np.float32))
    report("oracle: new items by their test degree", lambda u: test_degree.expand(len(u), -1))
    floor = rows["Content"]["test_cold"]
    print(f"\ntest_cold relative to Content ({floor:.4f}):")
    for name, r in rows.items():
        print(f"  {name:55s} {r['test_cold'] / floor:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": Path(args.run).name, "recall@20": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
