"""Load benchmark of ``dgmrec serve`` on loopback: throughput and latency of recommendations and item additions.

Starts ``dgmrec serve`` in a child process on a private copy of the run (so its store starts empty and the run
is left as it was), then sends a fixed number of requests from ``--clients`` client threads (httpx, keep-alive)
in three phases and stops by itself:

* ``recommend``: ``GET /users/{user}/recommendations?k=20`` for random users;
* ``add``: ``POST /items`` with one item each, only its first modality given (a real item's vector plus noise):
  the model generates the others;
* ``mixed``: both at once (``--adds`` additions while recommendations are served), recommendation latency
  under writes.

Usage::

    python benchmarks/serve_load.py --run RUN_DIR [--requests 2000] [--adds 100] [--clients 4]
                                    [--ann-above 100000] [--out benchmarks/results/serve_load.json]

Prints a table (client-side latencies) and writes the numbers, the server's ``/metrics`` and the load average
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(run: Path, port: int, ann_above: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "dgmrec.cli", "serve", "--run", str(run), "--port", str(port),
           "--ann-above", str(ann_above)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 300 s")


def summarise(name: str, latencies: list[float], errors: int, seconds: float) -> dict[str, Any]:
    lat = np.asarray(latencies) * 1000
    p50, p95, p99 = np.percentile(lat, [50, 95, 99]) if len(lat) else (np.nan, np.nan, np.nan)
    return {"phase": name, "requests": len(latencies) + errors, "errors": errors,
            "throughput_rps": round((len(latencies) + errors) / seconds, 1), "p50_ms": round(float(p50), 2),
            "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2), "seconds": round(seconds, 2)}


class Load:
    """Fixed request counts split over client threads; latencies measured around each request."""

    def __init__(self, url: str, users: list[str], features: dict[str, np.ndarray], k: int, seed: int) -> None:
        self.url, self.users, self.features, self.k = url, users, features, k
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        self.added = 0

    def recommend(self, n: int, clients: int) -> tuple[list[float], int, float]:
        picks = self.rng.integers(len(self.users), size=n)
        return self._run([("rec", self.users[int(u)]) for u in picks], clients)

    def add(self, n: int, clients: int) -> tuple[list[float], int, float]:
        return self._run([("add", None)] * n, clients)

    def _item(self) -> dict[str, Any]:
        first = next(iter(self.features))
        x = self.features[first]
        with self.lock:
            row = x[int(self.rng.integers(len(x)))]
            noise = self.rng.normal(scale=0.01 * (np.abs(row).mean() + 1e-6), size=row.shape)
            self.added += 1
            ident = f"bench-{self.added}"
        return {"items": [{"id": ident, "features": {first: (row + noise).astype(float).tolist()}}]}

    def _run(self, jobs: list[tuple[str, str | None]], clients: int) -> tuple[list[float], int, float]:
        import httpx

        latencies: list[float] = []
        errors = [0]
        chunks = [jobs[c::clients] for c in range(clients)]

        def worker(chunk: list[tuple[str, str | None]]) -> None:
            mine: list[float] = []
            bad = 0
            with httpx.Client(base_url=self.url, timeout=120) as client:
                for kind, user in chunk:
                    t0 = time.perf_counter()
                    if kind == "rec":
                        r = client.get(f"/users/{user}/recommendations", params={"k": self.k})
                    else:
                        r = client.post("/items", json=self._item())
                    dt = time.perf_counter() - t0
                    if r.status_code == 200:
                        mine.append(dt)
                    else:
                        bad += 1
            with self.lock:
                latencies.extend(mine)
                errors[0] += bad

        threads = [threading.Thread(target=worker, args=(c,)) for c in chunks if c]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return latencies, errors[0], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="Run directory written by `dgmrec train`.")
    ap.add_argument("--requests", type=int, default=2000, help="Recommendation requests (recommend phase).")
    ap.add_argument("--adds", type=int, default=100, help="Item additions (add phase and mixed phase each).")
    ap.add_argument("--clients", type=int, default=4, help="Concurrent client threads.")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=50, help="Requests sent before measuring.")
    ap.add_argument("--ann-above", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve_load.json")
    args = ap.parse_args()

    from dgmrec import api
    from dgmrec.serving.state import dataset_ids

    lr = api.load_run(args.run)
    users, _ = dataset_ids(lr)
    ds = lr.dataset
    first = ds.modalities[0]
    features = {first: np.asarray(ds.features[first])[ds.observed[:, 0]]}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("serving.sqlite*"))
        port = free_port()
        t_start = time.perf_counter()
        proc = start_server(run, port, args.ann_above)
        startup = time.perf_counter() - t_start
        url = f"http://127.0.0.1:{port}"
        try:
            load = Load(url, users, features, args.k, args.seed)
            load.recommend(args.warmup, args.clients)
            rows = [summarise("recommend", *load.recommend(args.requests, args.clients))]
            if args.adds:
                rows.append(summarise("add", *load.add(args.adds, args.clients)))
                mixed: dict[str, tuple[list[float], int, float]] = {}
                adder = threading.Thread(target=lambda: mixed.__setitem__("add", load.add(args.adds, 1)))
                adder.start()
                mixed["recommend"] = load.recommend(args.requests, max(1, args.clients - 1))
                adder.join()
                rows.append(summarise("mixed: recommend", *mixed["recommend"]))
                rows.append(summarise("mixed: add", *mixed["add"]))
            import httpx

            metrics = httpx.get(f"{url}/metrics").json()
            health = httpx.get(f"{url}/health").json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    load1, load5, load15 = os.getloadavg()
    result = {"run": str(args.run), "model": health["model"], "users": health["users"], "items": health["items"],
              "added_items": health["added_items"], "clients": args.clients, "k": args.k,
              "server_startup_s": round(startup, 2), "phases": rows, "server_metrics": metrics,
              "load_average": [load1, load5, load15], "cpus": os.cpu_count(), "machine": platform.platform()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{health['model']}: {health['users']} users, {health['items']} items (+{health['added_items']} added); "
          f"{args.clients} clients, k={args.k}; server start {startup:.1f} s; load average {load1:.2f} "
          f"{load5:.2f} {load15:.2f} on {os.cpu_count()} CPUs")
    print("| phase | requests | errors | req/s | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['requests']} | {r['errors']} | {r['throughput_rps']} | {r['p50_ms']} | "
              f"{r['p95_ms']} | {r['p99_ms']} |")
    if any(r["errors"] for r in rows):
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
