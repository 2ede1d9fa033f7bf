"""The fused in-batch InfoNCE kernel (``dgmrec.ops.fused.cosine_nce``) by row-block size and precision, and the
operations of one row block.

Two tables, each in one process on the current thread setting (set ``OMP_NUM_THREADS``; medians of ``--repeat``
calls after warm-up):

* the kernel, forward and backward, on unit rows of shape ``--rows`` x ``--dim`` (DGMRec's TikTok batch: 2,048 x 64),
  for each block size in ``--blocks``, in float32 and under bfloat16 autocast;
* the operations of one ``block x rows`` block in float32 and bfloat16: the logits product with its shift, the
  exponential, the float32 row sums, and the two products of the gradient.

Which block size is fastest, and whether bfloat16 pays, depends on the CPU (its bf16 GEMM unit and its elementwise
bf16 throughput); the tables are what to look at before changing the kernel's class attributes (``block`` for float32
GEMMs, ``block_low`` for low-precision ones). Prints the tables
and writes ``benchmarks/results/infonce_blocks.json``::

    OMP_NUM_THREADS=1 python benchmarks/infonce_blocks.py [--rows 2048] [--dim 64] [--blocks 128,256,512,1024]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dgmrec.ops import fused

HERE = Path(__file__).resolve().parent


def median_us(fn: Callable[[], object], repeat: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e6


def kernel_table(rows: int, dim: int, blocks: list[int], repeat: int) -> list[dict[str, object]]:
    torch.manual_seed(0)
    a = F.normalize(torch.randn(rows, dim), dim=1).requires_grad_()
    b = F.normalize(torch.randn(rows, dim), dim=1).requires_grad_()
    out = []
    saved = fused._CosineNCE.block, fused._CosineNCE.block_low
    try:
        for block in blocks:
            fused._CosineNCE.block = fused._CosineNCE.block_low = block
            row: dict[str, object] = {"block": block}
            for name, low in (("fp32", False), ("bf16", True)):
                def step(low: bool = low) -> None:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
                        loss = fused.cosine_nce(a, b, 1 / 0.2)
                    loss.backward()
                row[name] = round(median_us(step, repeat) / 1e3, 2)
            out.append(row)
    finally:
        fused._CosineNCE.block, fused._CosineNCE.block_low = saved
    return out


def block_ops_table(rows: int, dim: int, block: int, repeat: int) -> list[dict[str, object]]:
    torch.manual_seed(0)
    out = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = F.normalize(torch.randn(block, dim), dim=1).to(dtype)
        b = F.normalize(torch.randn(rows, dim), dim=1).to(dtype)
        shift = torch.full((1,), -5.0, dtype=dtype)
        expo = torch.addmm(shift, a, b.T, alpha=5.0)
        copy = median_us(lambda expo=expo: expo.clone(), repeat * 4)
        out.append({
            "dtype": name,
            "logits (addmm)": round(median_us(lambda a=a, b=b, s=shift: torch.addmm(s, a, b.T, alpha=5.0),
                                                 repeat * 4), 1),
            "exp_": round(median_us(lambda e=expo: e.clone().exp_(), repeat * 4) - copy, 1),
            "float32 row sums": round(median_us(lambda e=expo: e.sum(dim=1, keepdim=True, dtype=torch.float32),
                                                   repeat * 4), 1),
            "E @ b": round(median_us(lambda e=expo, b=b: e @ b, repeat * 4), 1),
            "E^T @ a": round(median_us(lambda e=expo, a=a: e.T @ a, repeat * 4), 1),
        })
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", default="128,256,512,1024")
    p.add_argument("--repeat", type=int, default=25)
    args = p.parse_args()
    blocks = [int(x) for x in args.blocks.split(",")]
    kernel = kernel_table(args.rows, args.dim, blocks, args.repeat)
    ops = block_ops_table(args.rows, args.dim, fused._CosineNCE.block, args.repeat)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    console.print(f"cosine_nce forward + backward (ms), {args.rows} x {args.dim}, {torch.get_num_threads()} "
                  f"thread(s), median of {args.repeat}")
    t = Table()
    for c in ("block", "fp32", "bf16"):
        t.add_column(c, justify="right")
    for r in kernel:
        t.add_row(*(str(r[c]) for c in ("block", "fp32", "bf16")))
    console.print(t)
    console.print(f"the operations of one {fused._CosineNCE.block} x {args.rows} block (microseconds)")
    t = Table()
    cols = list(ops[0])
    for c in cols:
        t.add_column(c, justify="right")
    for r in ops:
        t.add_row(*(str(r[c]) for c in cols))
    console.print(t)
    out = HERE / "results" / "infonce_blocks.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "dim": args.dim, "threads": torch.get_num_threads(),
                               "kernel_ms": kernel, "block_ops_us": ops}, indent=2) + "\n")


if __name__ == "__main__":
    main()
