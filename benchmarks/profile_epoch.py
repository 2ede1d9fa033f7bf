"""Where one training epoch spends its time: the PyTorch profiler over one epoch of any model.

Trains ``--warmup`` epochs unprofiled (the first epoch allocates and builds caches), then profiles the next one and
prints the operators by self CPU time (``--sort total``: by the time inside them, children included, which shows
composite steps such as a fused loss or a sparse product), with their share of the profiled epoch, call counts
and, with ``--by-shape``, the input shapes (which tensor a copy or fill is about). Nothing is evaluated.

Usage::

    python benchmarks/profile_epoch.py [--model DGMRec] [--data ../shared/data/tiktok] [--modalities image,audio]
                                       [--mask ../shared/data/tiktok/missing_items_0.6.npy] [--setting missing]
                                       [--threads 1] [--precision fp32] [--rows 25] [--sort self|total] [--by-shape]
                                       [--json F]

The defaults are the TikTok case of ``benchmarks/speed.py``. Run it with nothing else busy on the machine
(profiles are shares of one epoch, and a second busy process changes them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DGMRec")
    p.add_argument("--data", default=str(SHARED / "data" / "tiktok"))
    p.add_argument("--modalities", default="image,audio")
    p.add_argument("--mask", default=str(SHARED / "data" / "tiktok" / "missing_items_0.6.npy"),
                   help="observed mask; pass '' for the folder's own")
    p.add_argument("--setting", default="missing", choices=("missing", "new-items"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--warmup", type=int, default=1, help="unprofiled epochs first (at least 1)")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--sort", default="self", choices=("self", "total"))
    p.add_argument("--by-shape", action="store_true", help="one row per operator and input shapes")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    if args.warmup < 1:
        p.error("--warmup must be at least 1")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from dgmrec.api import load_dataset, train
    from dgmrec.training.trainer import Trainer

    rows: list[dict[str, Any]] = []
    summary: dict[str, float] = {}
    plain_epoch = Trainer.train_epoch
    seen = {"epochs": 0}

    def epoch_hook(self: Trainer, epoch: int) -> dict[str, object]:
        seen["epochs"] += 1
        if seen["epochs"] <= args.warmup:
            return plain_epoch(self, epoch)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
            start = time.perf_counter()
            out = plain_epoch(self, epoch)
            summary["epoch_s"] = time.perf_counter() - start
        events = prof.key_averages(group_by_input_shape=args.by_shape)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        summary["self_cpu_s"] = total / 1e6
        key = "self_cpu_time_total" if args.sort == "self" else "cpu_time_total"
        for e in sorted(events, key=lambda e: -getattr(e, key))[: args.rows]:
            rows.append({"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
                         "total_ms": round(e.cpu_time_total / 1e3, 1), "share": round(getattr(e, key) / total, 4),
                         "shapes": str(e.input_shapes) if args.by_shape else ""})
        return out

    Trainer.train_epoch = epoch_hook  # type: ignore[method-assign]
    ds = load_dataset(args.data, modalities=args.modalities.split(",") if args.modalities else None,
                      mask=Path(args.mask) if args.mask else None, setting=args.setting)
    with tempfile.TemporaryDirectory(prefix="dgmrec-profile-") as work:
        train(args.model, ds, out=Path(work) / "run",
              overrides={"epochs": args.warmup + 1, "eval_step": 10_000, "stopping_step": 10_000,
                         "threads": args.threads, "precision": args.precision}, progress=False)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.model}, one profiled epoch", caption=(
        f"{summary['epoch_s']:.2f} s wall, {summary['self_cpu_s']:.2f} s self CPU under the profiler; "
        f"{torch.get_num_threads()} thread(s), {args.precision}; share = {args.sort} time / self CPU of the epoch"))
    for c in ("op", "calls", "self ms", "total ms", "share", *(["input shapes"] if args.by_shape else [])):
        table.add_column(c, justify="left" if c in ("op", "input shapes") else "right")
    for r in rows:
        table.add_row(r["op"], str(r["calls"]), f"{r['self_ms']:.1f}", f"{r['total_ms']:.1f}",
                      f"{100 * r['share']:.1f} %",
                      *([r["shapes"][:90]] if args.by_shape else []))
    Console(width=180).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **summary, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
