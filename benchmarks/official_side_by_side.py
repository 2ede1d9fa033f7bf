"""Every model, ours against the official DGMRec release, in one sitting: s/epoch, evaluation pass, peak RSS.

The official code runs unmodified through the measurement harness in ``../shared/tools/official`` (its README
says how to export the official tree and build its data folders: ``setup_tree.sh``). For each model the two
implementations run back to back, each in its own process with the same thread count, so that drift of the
machine affects both alike; the ratio is the number to read.

Usage::

    python benchmarks/official_side_by_side.py --official WORK/official [--harness ../shared/tools/official]
        [--models DGMRec,LightGCN,...] [--cases tiktok,baby] [--epochs 3] [--threads 2] [--precision fp32,bf16]
        [--official-python PYTHON]

* ``tiktok``: TikTok image + audio, the paper's 0.6 mask, missing setting, each side's shipped TikTok best
  configuration; ``baby``: the Baby graph with random placeholder features (4,096-d image, 384-d text) and the
  2/3 mask, the Baby best configuration (speed only).
* s/epoch is the mean of the epochs after the first (the first includes one-off work on both sides): ours is
  the trainer's epoch (pre-epoch generation plus the batch loop), the official one ``pre_epoch_processing`` plus
  the batch loop, as the harness times it. The evaluation pass is the median validation pass.
* The official DA-MRS needs ``item_graph_dict.npy`` in its data folder; it is written with our co-occurrence
  builder when absent (the release does not build it).
* The official MMGCN gets ``--missing_imputation 1`` (a scalar; it rejects the list the others take).
* Every child runs with ``OMP_NUM_THREADS=--threads`` and the passive OpenMP wait policy.

Prints a Markdown table and writes ``benchmarks/results/official_side_by_side.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODELS = ["MFBPR", "LightGCN", "VBPR", "MMGCN", "GRCN", "SLMRec", "BM3", "LATTICE", "MGCN", "LGMRec", "DAMRS",
          "GUME", "CI2MG", "MILK", "SIBRAR", "DGMRec"]
CASES = {"tiktok": ("tiktokav", "0.6", "tiktok"), "baby": ("babyph", "0.666", "baby")}


def ours(model: str, case: str, precision: str, args: argparse.Namespace, work: Path,
         env: dict[str, str]) -> dict[str, object]:
    cmd = [sys.executable, str(HERE / "speed.py"), "--child", model, case, precision, "--shared", args.shared,
           "--epochs", str(args.epochs), "--work", str(work)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"s_per_epoch": r["s_per_epoch"], "s_per_eval": r["s_per_eval_pass"], "peak_rss_mb": r["peak_rss_mb"]}


def damrs_item_graph(folder: Path) -> None:
    """The official DA-MRS reads a precomputed ``item_graph_dict.npy`` (co-occurrence neighbours) that the release
    neither ships nor builds; write it with our builder (10 neighbours sharing >= 2 training users)."""
    target = folder / "item_graph_dict.npy"
    if target.is_file():
        return
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from dgmrec.models.damrs import cooccurrence_edges

    inter = pd.read_csv(next(folder.glob("*.inter")), sep="\t")
    train = inter[inter["x_label"] == 0]
    n_users, n_items = int(inter["userID"].max()) + 1, int(inter["itemID"].max()) + 1
    matrix = sp.csr_matrix((np.ones(len(train), dtype=np.float32), (train["userID"], train["itemID"])),
                           shape=(n_users, n_items))
    rows, cols, counts = cooccurrence_edges(matrix)
    graph = {int(i): (cols[rows == i].tolist(), counts[rows == i].tolist()) for i in np.unique(rows)}
    np.save(target, np.array(graph, dtype=object), allow_pickle=True)


def official(model: str, case: str, args: argparse.Namespace, runs: Path, env: dict[str, str]) -> dict[str, object]:
    dataset, ratio, cfg_name = CASES[case]
    src = Path(args.official) / "src"
    if model == "DAMRS":
        damrs_item_graph(Path(args.official) / "data" / dataset)
    best = src / "configs" / "best" / f"{model}_{cfg_name}.json"
    name = f"{model}_{case}"
    cmd = [str(Path(args.harness) / "run_one.sh"), str(src), str(runs), name, model, dataset, ratio,
           str(best) if best.is_file() else "none", json.dumps({"epochs": args.epochs})]
    # the official MMGCN reads missing_imputation as a scalar (it is no hyper-parameter there)
    env = {**env, "IMPUTATION": "1"} if model == "MMGCN" else env
    subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    timing = runs / name / "timing.json"
    if not timing.is_file():
        return {"error": "no timing record"}
    t = json.loads(timing.read_text())
    epochs = [e["train_total_s"] for e in t.get("epochs", []) if e.get("train_total_s") is not None]
    if t.get("status") != "ok" or not epochs:
        err = (runs / name / "stderr.log").read_text().strip().splitlines()
        return {"error": err[-1][:160] if err else str(t.get("status"))}
    valid = [e["seconds"] for e in t.get("evals", []) if not e["is_test"]]
    return {"s_per_epoch": round(statistics.fmean(epochs), 3),
            "s_per_eval": round(statistics.median(valid), 3) if valid else None,
            "peak_rss_mb": round(t["maxrss_mb"], 1)}


def fmt(x: object) -> str:
    return "—" if x is None else str(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="the exported official tree (with src/ and data/)")
    p.add_argument("--harness", default=str(HERE.parent.parent / "shared" / "tools" / "official"))
    p.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    p.add_argument("--official-python", default=sys.executable, help="interpreter for the official code")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--cases", default="tiktok,baby")
    p.add_argument("--baby-models", default="DGMRec", help="models measured on the Baby placeholder case")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32,bf16", help="our precisions (comma-separated)")
    args = p.parse_args()
    for c in args.cases.split(","):
        if c not in CASES:
            sys.exit(f"error: --cases: unknown case {c!r} (choose from {', '.join(CASES)})")
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "OFFICIAL_THREADS": threads, "PYTHON": args.official_python, "CAP_S": "1800"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    precisions = args.precision.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dgmrec-side-by-side-") as tmp:
        work = Path(tmp)
        for case in args.cases.split(","):
            models = args.models.split(",") if case == "tiktok" else args.baby_models.split(",")
            for model in models:
                row: dict[str, Any] = {"model": model, "case": case}
                for prec in precisions:
                    row[f"ours_{prec}"] = ours(model, case, prec, args, work, env)
                row["official"] = official(model, case, args, work / "official_runs", env)
                rows.append(row)
                print(f"done: {model} on {case}: {json.dumps(row)}", file=sys.stderr, flush=True)
    lines = [f"Side by side, {args.threads} threads, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, {args.epochs} epochs "
             "(first excluded); seconds per training epoch, per validation pass, peak RSS (MB).", "",
             "| model | case | " + " | ".join(f"ours {p} s/ep" for p in precisions)
             + " | official s/ep | " + " | ".join(f"ratio {p}" for p in precisions)
             + " | eval ours / official s | RSS ours / official MB |",
             "|---|---|" + "---|" * (2 * len(precisions) + 3)]
    for r in rows:
        off, mine = r["official"], [r[f"ours_{p}"] for p in precisions]
        ratios = [f"{m['s_per_epoch'] / off['s_per_epoch']:.2f}" if "s_per_epoch" in m and "s_per_epoch" in off
                  else "—" for m in mine]
        lines.append(
            f"| {r['model']} | {r['case']} | " + " | ".join(fmt(m.get("s_per_epoch", m.get("error"))) for m in mine)
            + f" | {fmt(off.get('s_per_epoch', off.get('error')))} | " + " | ".join(ratios)
            + f" | {fmt(mine[0].get('s_per_eval'))} / {fmt(off.get('s_per_eval'))}"
            + f" | {fmt(mine[0].get('peak_rss_mb'))} / {fmt(off.get('peak_rss_mb'))} |")
    text = "\n".join(lines)
    print(text)
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    (res / "official_side_by_side.json").write_text(json.dumps(rows, indent=2))
    (res / "official_side_by_side.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
