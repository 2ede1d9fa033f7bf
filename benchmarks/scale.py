"""Large catalogues: peak memory, graph building, training and evaluation time; kNN search agreement.

Two subcommands:

``catalogue``: a synthetic catalogue of a given size, one model per child process (so peak RSS is per case)::

    python benchmarks/scale.py catalogue --case elec    [--models DGMRec,LightGCN] [--batches 20]
    python benchmarks/scale.py catalogue --case million [--models DGMRec,LightGCN] [--batches 10]

* ``elec``: Amazon-Electronics-sized: 192,403 users, 63,001 items, ~1.7M interactions, placeholder image
  (4,096-d) and text (384-d) features, 2/3 of the items missing a modality (the reference mask recipe),
  dataset name ``elec`` (so DGMRec takes ``configs/best/DGMRec_elec.yaml``);
* ``million``: 500,000 users, 1,000,000 items, ~5M interactions, two 128-d placeholder modalities.

Interactions follow a power-law item popularity. Placeholder features are noisy clusters around random
directions (uniform noise has no neighbourhood structure: any approximate index would scan everything).
Measured per model: dataset generation, model construction (graphs; the kNN part separately), the model's
``before_epoch`` hook, a fixed number of training steps (extrapolated to a whole epoch: steps per epoch x
seconds per step + hooks), the evaluation of a subset of the validation users (extrapolated to all), and the
peak RSS of the process. Times are wall-clock seconds and, on a shared machine more telling, CPU seconds of
the process (user + system, all threads; ``*_cpu_s``). ``--set key=value`` overrides configuration keys
(e.g. ``knn_backend=faiss``).

``recall``: exact vs approximate kNN graphs of feature files (neighbour recall and time per method)::

    python benchmarks/scale.py recall --features ../shared/data/tiktok/image_feat.npy [--nprobe 4,8,16,0]

Both print a table and write JSON to ``benchmarks/results/``. The environment's ``OMP_WAIT_POLICY`` and
``OMP_NUM_THREADS`` are passed on (``dgmrec`` itself defaults to the passive policy) and printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CASES = {
    "elec": {"n_users": 192_403, "n_items": 63_001, "interactions": 1_689_188,
             "modalities": (("image", 4096), ("text", 384)), "clusters": 1000, "missing": 2 / 3},
    "million": {"n_users": 500_000, "n_items": 1_000_000, "interactions": 5_000_000,
                "modalities": (("image", 128), ("text", 128)), "clusters": 5000, "missing": 2 / 3},
}


def make_catalogue(case: str, seed: int = 0) -> Any:
    """The synthetic catalogue of ``case`` (deterministic)."""
    from dgmrec.data.dataset import RecDataset
    from dgmrec.data.masks import generate_missing_mask
    from dgmrec.data.raw import chronological_labels

    spec = CASES[case]
    rng = np.random.default_rng(seed)
    n_users, n_items = int(spec["n_users"]), int(spec["n_items"])
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    per_user = rng.poisson(spec["interactions"] / n_users - 3, n_users) + 3  # at least 3: train, valid, test
    users = np.repeat(np.arange(n_users), per_user)
    items = rng.choice(n_items, size=len(users), p=popularity)
    keys = np.unique(users.astype(np.int64) * n_items + items)
    users, items = keys // n_items, keys % n_items
    labels = chronological_labels(users, rng.random(len(users)))
    pairs = np.stack([users, items], axis=1)
    train, valid, test = (pairs[labels == k] for k in range(3))
    features = {}
    n_clusters = int(spec["clusters"])
    member = rng.integers(0, n_clusters, n_items)
    for name, dim in spec["modalities"]:
        centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
        x = rng.standard_normal((n_items, dim), dtype=np.float32)
        x *= 0.7
        x += centres[member]
        features[name] = x
    counts = np.bincount(train[:, 1], minlength=n_items)
    observed = generate_missing_mask(counts, len(features), float(spec["missing"]), seed=seed + 1225)
    return RecDataset(name=case, n_users=n_users, n_items=n_items, train=train, valid=valid, test=test,
                      features=features, observed=observed, source=f"benchmarks/scale.py {case}")


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _Clock:
    """Wall and CPU (user + system, all threads) seconds since the last :meth:`lap`."""

    def __init__(self) -> None:
        self.lap()

    def lap(self) -> tuple[float, float]:
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        spent = (now_wall - getattr(self, "wall", now_wall), now_cpu - getattr(self, "cpu", now_cpu))
        self.wall, self.cpu = now_wall, now_cpu
        return spent


def run_case(case: str, model_name: str, batches: int, eval_users: int, overrides: dict[str, Any],
             work: Path) -> dict[str, Any]:
    """Runs inside the child process."""
    import torch

    from dgmrec import graphs
    from dgmrec.config import resolve_config
    from dgmrec.evaluation.protocol import rank_items
    from dgmrec.models import build_model
    from dgmrec.training.trainer import Trainer, seed_everything

    row: dict[str, Any] = {"case": case, "model": model_name, "threads": torch.get_num_threads()}
    clock = _Clock()
    ds = make_catalogue(case)
    row.update(users=ds.n_users, items=ds.n_items, train_pairs=len(ds.train),
               data_s=round(clock.lap()[0], 1), rss_after_data_mb=_rss_mb())
    cfg, layers = resolve_config(model_name, ds.name, overrides=overrides)
    row["config_layers"] = layers
    knn_seconds = [0.0]
    exact_knn = graphs.knn_edges

    def timed_knn(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return exact_knn(*args, **kwargs)
        finally:
            knn_seconds[0] += time.perf_counter() - t

    graphs.knn_edges = timed_knn  # knn_graph looks the name up at call time
    seed_everything(int(cfg["seed"]))
    clock.lap()
    model = build_model(model_name, ds, cfg)
    wall, cpu = clock.lap()
    row.update(build_s=round(wall, 1), build_cpu_s=round(cpu, 1), build_knn_s=round(knn_seconds[0], 1),
               rss_after_build_mb=_rss_mb())
    trainer = Trainer(model, ds, cfg, work / f"{case}_{model_name}", progress=False)
    model.train()
    knn_seconds[0] = 0.0
    clock.lap()
    model.before_epoch(0)
    wall, cpu = clock.lap()
    row.update(before_epoch_s=round(wall, 1), before_epoch_cpu_s=round(cpu, 1),
               before_epoch_knn_s=round(knn_seconds[0], 1))
    steps, step_s, step_cpu = 0, [], []
    for batch in trainer.batches():
        clock.lap()
        trainer.train_step(batch, 0)
        wall, cpu = clock.lap()
        step_s.append(wall)
        step_cpu.append(cpu)
        steps += 1
        if steps >= batches:
            break
    per_step = float(np.mean(step_s[1:] if len(step_s) > 1 else step_s))  # the first step warms caches up
    cpu_step = float(np.mean(step_cpu[1:] if len(step_cpu) > 1 else step_cpu))
    steps_per_epoch = math.ceil(len(ds.train) / int(cfg["train_batch_size"]))
    row.update(steps_measured=steps, s_per_step=round(per_step, 3), cpu_s_per_step=round(cpu_step, 3),
               steps_per_epoch=steps_per_epoch,
               epoch_s_extrapolated=round(row["before_epoch_s"] + per_step * steps_per_epoch, 1),
               epoch_cpu_s_extrapolated=round(row["before_epoch_cpu_s"] + cpu_step * steps_per_epoch, 1),
               rss_after_steps_mb=_rss_mb())
    model.eval()
    users = np.unique(ds.valid[:, 0])
    sample = users[:eval_users]
    clock.lap()
    with torch.no_grad():
        model.before_evaluation(0)
        model.prepare_eval()
        rank_items(model.score_users, sample, ds.train_matrix(), 50, int(cfg["eval_batch_size"]), n_items=ds.n_items)
    wall, cpu = clock.lap()
    scale = len(users) / max(1, len(sample))
    row.update(eval_users_measured=len(sample), eval_s_measured=round(wall, 1),
               eval_pass_s_extrapolated=round(wall * scale, 1), eval_pass_cpu_s_extrapolated=round(cpu * scale, 1),
               peak_rss_mb=_rss_mb())
    return row


def recall(paths: list[str], k: int, nprobes: list[int]) -> list[dict[str, Any]]:
    from dgmrec import knn
    from dgmrec.graphs import knn_edges

    rows = []
    for path in paths:
        x = np.load(path)
        t0 = time.perf_counter()
        exact_edges = knn_edges(x, k, backend="torch")
        exact_s = time.perf_counter() - t0
        exact = set(zip(exact_edges[0].tolist(), exact_edges[1].tolist(), strict=True))
        rows.append({"features": path, "shape": list(x.shape), "method": "torch (exact)", "nprobe": "",
                     "recall": 1.0, "seconds": round(exact_s, 2)})
        t0 = time.perf_counter()
        flat = knn_edges(x, k, backend="flat")
        rows.append({"features": path, "shape": list(x.shape), "method": "faiss flat (exact)", "nprobe": "",
                     "recall": round(len(exact & set(zip(flat[0].tolist(), flat[1].tolist(), strict=True)))
                                     / len(exact), 4), "seconds": round(time.perf_counter() - t0, 2)})
        nlist = knn.ivf_cells(x.shape[0])
        for nprobe in nprobes:
            with knn.using(nprobe=nprobe):
                t0 = time.perf_counter()
                approx = knn_edges(x, k, backend="ivf")
                spent = time.perf_counter() - t0
            found = set(zip(approx[0].tolist(), approx[1].tolist(), strict=True))
            used = nprobe or knn.ivf_probes(x.shape[0], nlist)
            rows.append({"features": path, "shape": list(x.shape), "method": f"faiss ivf ({nlist} cells)",
                         "nprobe": f"{used}{' (default)' if not nprobe else ''}",
                         "recall": round(len(exact & found) / len(exact), 4), "seconds": round(spent, 2)})
    return rows


def _table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[str(r.get(c, "")) for c in cols])
    Console(width=200).print(table)


def _environment() -> str:
    return (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: dgmrec sets PASSIVE)')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("catalogue", help="memory and time on a synthetic catalogue")
    c.add_argument("--case", choices=sorted(CASES), required=True)
    c.add_argument("--models", default="DGMRec,LightGCN")
    c.add_argument("--batches", type=int, default=20, help="training steps measured per model")
    c.add_argument("--eval-users", type=int, default=4096, help="validation users ranked (then extrapolated)")
    c.add_argument("--set", action="append", default=[], help="key=value configuration override")
    c.add_argument("--child", help=argparse.SUPPRESS)
    c.add_argument("--work", help=argparse.SUPPRESS)
    r = sub.add_parser("recall", help="exact vs approximate kNN graphs of feature files")
    r.add_argument("--features", nargs="+", required=True)
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--nprobe", default="4,8,16,0", help="IVF cells per query to try (0: the default rule)")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    if args.command == "recall":
        rows = recall(args.features, args.k, [int(v) for v in args.nprobe.split(",")])
        _table(f"kNN graphs (k={args.k}): neighbour recall against the exact graph; {_environment()}", rows,
               ["features", "shape", "method", "nprobe", "recall", "seconds"])
        (res_dir / "knn_recall.json").write_text(json.dumps(rows, indent=2))
        return
    from dgmrec.config import parse_set

    overrides = parse_set(args.set)
    if args.child:
        row = run_case(args.case, args.child, args.batches, args.eval_users, overrides, Path(args.work))
        print(json.dumps({**row, "overrides": overrides}))
        return
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="dgmrec-scale-") as work:
        for model in args.models.split(","):
            cmd = [sys.executable, __file__, "catalogue", "--case", args.case, "--child", model, "--work", work,
                   "--batches", str(args.batches), "--eval-users", str(args.eval_users)]
            for s in args.set:
                cmd += ["--set", s]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done: {model} on {args.case}", file=sys.stderr)
    _table(f"dgmrec at scale: {args.case} ({_environment()}; epoch and evaluation times extrapolated from "
           f"{args.batches} steps and {args.eval_users} users)", rows,
           ["model", "items", "train_pairs", "build_s", "build_cpu_s", "build_knn_s", "before_epoch_s", "s_per_step",
            "cpu_s_per_step", "steps_per_epoch", "epoch_s_extrapolated", "epoch_cpu_s_extrapolated",
            "eval_pass_s_extrapolated", "eval_pass_cpu_s_extrapolated", "peak_rss_mb"])
    (res_dir / f"scale_{args.case}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
