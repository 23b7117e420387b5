"""A bounded load test of `mtlrec serve` on 127.0.0.1: latency percentiles and throughput.

Trains a small model (or takes --model), starts the service in a subprocess on a free local
port, sends --requests POST /predict requests of --rows rows from --clients threads, and
prints p50 / p99 latency, requests and rows per second, and the error count. Every request
goes to 127.0.0.1 only; the run stops after --requests requests or --seconds seconds.

    python benchmarks/serve_load.py --requests 2000 --clients 8 --rows 32
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from mtlrec.config import load_config
from mtlrec.experiment import load_splits, run_experiment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="model folder (default: train a small PLE on synthetic data)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120.0, help="stop sending after this long")
    args = parser.parse_args()

    cfg = load_config({"data": {"synthetic": {"rows": 4000, "dim": 20, "sparse_features": 5,
                                              "task_types": ["binary", "binary"]}},
                       "model": {"name": "ple", "expert_hidden": [64, 32]}, "train": {"epochs": 2, "progress": False}})
    folder = Path(args.model) if args.model else Path(tempfile.mkdtemp()) / "model"
    if not args.model:
        run_experiment(cfg, folder)
    table = load_splits(cfg).test
    names = [f.name for f in cfg.schema.sparse + cfg.schema.dense]
    rows = [{k: (int(v) if k.startswith("c") else float(v)) for k, v in r.items()} for r in table[names].to_dict("records")]
    bodies = [{"rows": rows[i : i + args.rows]} for i in range(0, len(rows) - args.rows, args.rows)]

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mtlrec.cli", "serve", str(folder), "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            sys.exit("the service did not start")
        deadline = time.perf_counter() + args.seconds

        def worker(worker_id: int) -> tuple[list[float], int]:
            latencies, errors = [], 0
            with httpx.Client(timeout=10) as client:
                for i in range(worker_id, args.requests, args.clients):
                    if time.perf_counter() > deadline:
                        break
                    start = time.perf_counter()
                    try:
                        ok = client.post(f"{url}/predict", json=bodies[i % len(bodies)]).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    latencies.append(time.perf_counter() - start)
                    errors += not ok
            return latencies, errors

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(worker, range(args.clients)))
        elapsed = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = np.array([x for lat, _ in results for x in lat]) * 1000
    errors = sum(e for _, e in results)
    print(f"{len(latencies)} requests of {args.rows} rows from {args.clients} clients in {elapsed:.1f} s")
    print(f"latency p50 {np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms")
    print(f"throughput {len(latencies) / elapsed:.0f} requests/s, {len(latencies) * args.rows / elapsed:.0f} rows/s")
    print(f"errors {errors}")


if __name__ == "__main__":
    main()
