"""Where does cross-modal content get lost? Retrieval of masked features by several readouts of one run.

For a trained DGMRec run and the true features, every item missing exactly one modality ``m`` is queried
with (protocol of ``dgmrec.experiments.retrieval``: candidates are the true ``m`` features of all items):

* ``generated``: the run's generated feature (what ``dgmrec retrieval`` reports);
* ``ridge(generator input)``: a ridge readout of the true ``m`` features from the decoder's generation-time
  input (translated general + generated specific features), fitted on the items that observe every
  modality: the best any linear decoder could do with what the generator produces;
* ``ridge(other raw features)``: a ridge readout from the other modalities' raw true features, fitted on
  the same items: the best linear generation from the observed content;
* ``NN imputation``: the baseline (``nn`` of :mod:`dgmrec.data.impute`: mean true ``m`` features of the 10
  nearest items in each observed modality, averaged over those modalities).

Usage::

    python benchmarks/retrieval_readouts.py --run RUN_DIR --truth DATA_DIR [--ridge 1.0]

Prints Hit@10 and mean rank (0.5 = chance) under plain and centred cosine and writes
``benchmarks/results/retrieval_readouts_<dataset>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before the OpenMP runtime loads (with numpy / torch)

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from dgmrec import api
from dgmrec.data.impute import impute_features
from dgmrec.experiments.retrieval import Candidates, load_truth
from dgmrec.losses import ridge_fit

HERE = Path(__file__).resolve().parent


def ridge_readout(z: np.ndarray, y: np.ndarray, fit_rows: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge regression of ``y`` on ``z`` fitted on ``fit_rows``, applied to every row."""
    zt = torch.as_tensor(np.asarray(z, dtype=np.float32))
    w, b = ridge_fit(zt[torch.as_tensor(fit_rows)], torch.as_tensor(y[fit_rows]), ridge)
    return (zt @ w + b).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--truth", required=True, type=Path)
    ap.add_argument("--ridge", type=float, default=1.0)
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    lr = api.load_run(args.run)
    ds, model = lr.dataset, lr.model
    inputs_t = model.generation_inputs()
    if inputs_t is None:
        raise SystemExit(f"error: {args.run}: model {model.name} does not generate features")
    inputs = {m: v.numpy() for m, v in inputs_t.items()}
    truth_map = load_truth(args.truth, ds.modalities, ds.n_items)
    truth = [np.nan_to_num(truth_map[m]).astype(np.float32) for m in ds.modalities]
    observed = ds.observed
    generated = {m: v.numpy() for m, v in model.generate_for_retrieval().items()}
    complete = observed.all(axis=1)
    missing_count = (~observed).sum(axis=1)
    nn = impute_features(dict(zip(ds.modalities, truth, strict=True)), observed, "nn", k=10)
    results = []
    for j, m in enumerate(ds.modalities):
        items = np.flatnonzero(~observed[:, j] & (missing_count == 1))
        if len(items) == 0:
            continue
        others = np.hstack([truth[k] for k in range(len(truth)) if k != j])
        queries = {
            "generated": generated[m][items],
            "ridge(generator input)": ridge_readout(inputs[m], truth[j], complete, args.ridge)[items],
            "ridge(other raw features)": ridge_readout(others, truth[j], complete, args.ridge)[items],
            "NN imputation": nn[m][items],
        }
        for similarity in ("cosine", "centered"):
            cand = Candidates(truth_map[m], observed[:, j], similarity)
            for name, q in queries.items():
                scores = cand.score(q, items, (10,))
                results.append({"modality": m, "queries": len(items), "readout": name, "similarity": similarity,
                                "hit@10": float(scores["hit@10"].mean()), "rank": float(scores["rank"].mean())})

    table = Table(title=f"Readouts of masked features ({ds.name}, {args.run.name}; chance Hit@10 "
                        f"{10 / ds.n_items:.4f}, rank 0.5; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})")
    for col in ("modality", "queries", "readout", "cosine Hit@10", "cosine rank", "centred Hit@10",
                "centred rank"):
        table.add_column(col, justify="left" if col == "readout" else "right")
    by_key = {(r["modality"], r["readout"], r["similarity"]): r for r in results}
    for r in results:
        if r["similarity"] != "cosine":
            continue
        c = by_key[(r["modality"], r["readout"], "centered")]
        table.add_row(r["modality"], str(r["queries"]), r["readout"], f"{r['hit@10']:.4f}", f"{r['rank']:.3f}",
                      f"{c['hit@10']:.4f}", f"{c['rank']:.3f}")
    Console(width=160).print(table)
    out = HERE / "results" / f"retrieval_readouts_{ds.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"run": args.run.name, "ridge": args.ridge, "rows": results}, indent=2))
    print(f"written: {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
