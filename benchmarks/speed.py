"""Speed and memory benchmark: seconds per training epoch, per full evaluation pass and peak RSS.

Cases (each measured in its own child process so that peak RSS is per case):

* ``tiktok``: ``../shared/data/tiktok`` used as image + audio with the paper's mask (missing setting, the
  shipped TikTok best configuration);
* ``baby``: the Amazon Baby interaction graph with **random placeholder** features of the paper's widths
  (image 4096-d, text 384-d) and the paper's 2/3 mask, Baby best configuration (speed only).

Usage::

    python benchmarks/speed.py [--shared ../shared] [--models DGMRec,LightGCN] [--cases tiktok,baby]
                               [--epochs 3] [--threads 2] [--precision fp32,bf16] [--device cpu|cuda]

On ``--device cuda`` the table also gives the peak CUDA memory; precisions there are fp32, bf16 and fp16.
Children run with ``OMP_NUM_THREADS=--threads`` and the passive OpenMP wait policy (``OMP_WAIT_POLICY=PASSIVE``,
unless the environment sets another; the table title says which). Prints a table and writes
``benchmarks/results/speed.{json,csv}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def baby_placeholder(shared: Path, root: Path) -> Path:
    import numpy as np

    folder = root / "baby"
    if not (folder / "image_feat.npy").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        src = shared / "data" / "amazon-graphs" / "baby" / "baby_new_items.inter"
        link = folder / "baby.inter"
        if not link.exists():
            link.symlink_to(src.resolve())
        rng = np.random.default_rng(0)
        np.save(folder / "image_feat.npy", rng.random((7050, 4096), dtype=np.float32))
        np.save(folder / "text_feat.npy", rng.random((7050, 384), dtype=np.float32))
    return folder


def run_case(model: str, case: str, shared: Path, epochs: int, work: Path, precision: str,
             device: str = "cpu") -> dict[str, object]:
    """Runs inside the child process."""
    import torch

    from dgmrec.api import load_dataset, train
    from dgmrec.training.trainer import Trainer

    cpu_s: list[float] = []  # CPU seconds (all threads) of each training epoch: telling on a shared machine
    train_epoch = Trainer.train_epoch

    def timed(self: Trainer, epoch: int) -> dict[str, object]:
        start = time.process_time()
        try:
            return train_epoch(self, epoch)
        finally:
            cpu_s.append(time.process_time() - start)

    Trainer.train_epoch = timed  # type: ignore[method-assign]
    if case == "tiktok":
        ds = load_dataset(shared / "data" / "tiktok", modalities=["image", "audio"],
                          mask=shared / "data" / "tiktok" / "missing_items_0.6.npy")
    else:
        ds = load_dataset(baby_placeholder(shared, work),
                          mask=shared / "data" / "amazon-graphs" / "baby" / "missing_items_0.666.npy")
    t0 = time.perf_counter()
    run = work / f"{model}_{case}_{precision}"
    res = train(model, ds, out=run, overrides={"epochs": epochs, "eval_step": 1, "stopping_step": 1000,
                                               "precision": precision}, progress=False, device=device)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_s = [e["train_seconds"] for e in log]
    eval_s = [e["eval_seconds"] for e in log if "eval_seconds" in e]
    steady = train_s[1:] if len(train_s) > 1 else train_s
    steady_cpu = cpu_s[1:] if len(cpu_s) > 1 else cpu_s
    return {
        "model": model, "case": case, "precision": precision, "epochs": epochs, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "s_per_epoch": round(sum(steady) / len(steady), 3),
        "s_per_epoch_first": round(train_s[0], 3),
        "cpu_s_per_epoch": round(sum(steady_cpu) / len(steady_cpu), 3),
        "s_per_eval_pass": round(sorted(eval_s)[len(eval_s) // 2], 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": device,
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
        "wall_s": round(time.perf_counter() - t0, 1),
        "test_recall@20": res["test"].get("recall@20"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    p.add_argument("--models", default="DGMRec,LightGCN")
    p.add_argument("--cases", default="tiktok,baby")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16 (and fp16 on CUDA)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--child", nargs=3, metavar=("MODEL", "CASE", "PRECISION"), help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shared = Path(args.shared)
    if args.child:
        print(json.dumps(run_case(args.child[0], args.child[1], shared, args.epochs, Path(args.work), args.child[2],
                                  args.device)))
        return
    if not (shared / "data").is_dir():
        sys.exit(f"error: {shared}/data not found; pass --shared")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("error: --device cuda: CUDA is not available on this machine")
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory(prefix="dgmrec-bench-") as work:
        for case in args.cases.split(","):
            for model in args.models.split(","):
                for precision in args.precision.split(","):
                    out = subprocess.run([sys.executable, __file__, "--child", model, case, precision, "--shared",
                                          str(shared), "--epochs", str(args.epochs), "--work", work,
                                          "--device", args.device],
                                         capture_output=True, text=True, env=env, check=False)
                    if out.returncode != 0:
                        print(out.stderr[-2000:], file=sys.stderr)
                        continue
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"done: {model} on {case} ({precision})", file=sys.stderr)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dgmrec speed ({args.device}, {args.threads} threads, "
                        f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, {args.epochs} epochs; first epoch excluded)")
    cols = ["model", "case", "precision", "s_per_epoch", "cpu_s_per_epoch", "s_per_epoch_first", "s_per_eval_pass",
            "peak_rss_mb", *(["peak_cuda_mb"] if args.device == "cuda" else []), "wall_s"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[str(r[c]) for c in cols])
    Console(width=160).print(table)
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / "speed.json").write_text(json.dumps(rows, indent=2))
    import csv

    with (res_dir / "speed.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else cols)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
