"""Peak memory of one training epoch as the data grows 10x: streamed vs in memory.

Writes Parquet folders of N and 10 N rows (26 sparse + 13 dense columns, 2 binary tasks),
trains a small MMoE for one epoch on each in a fresh process, and prints each process's
peak resident memory.

    python benchmarks/streaming_memory.py --rows 200000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

CHILD = r"""
import json, resource, sys
from mtlrec.config import load_config
from mtlrec.experiment import run_experiment
result = run_experiment(load_config(json.loads(sys.argv[1])))
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mb": peak_mb, "seconds": result.seconds, "auc": result.history[-1]["valid/auc/click"]}))
"""


def write_rows(folder: Path, rows: int, per_file: int = 100_000, seed: int = 0) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, per_file):
        n = min(per_file, rows - start)
        dense = rng.normal(size=(n, 13)).astype(np.float32)
        table = {f"s{i}": rng.integers(0, 10 + 40 * i, n) for i in range(26)}
        table |= {f"d{i}": dense[:, i] for i in range(13)}
        score = dense[:, 0] + (table["s0"] % 2) - 0.5
        table["click"] = (score + rng.normal(size=n) > 0).astype(np.float32)
        table["like"] = (dense[:, 1] + rng.normal(size=n) > 1).astype(np.float32)
        pd.DataFrame(table).to_parquet(folder / f"part-{start // per_file:05d}.parquet")


def config(train: Path, valid: Path, streaming: bool) -> dict:
    return {
        "data": {"source": "files", "train": str(train), "valid": str(valid), "streaming": streaming,
                 "chunk_rows": 16_384, "shuffle_buffer": 65_536},
        "features": {"sparse": [{"name": f"s{i}"} for i in range(26)], "dense": [{"name": f"d{i}"} for i in range(13)]},
        "tasks": [{"name": "click"}, {"name": "like"}],
        "model": {"name": "mmoe", "num_experts": 4, "expert_hidden": [64], "tower_hidden": [16]},
        "train": {"epochs": 1, "batch_size": 1024, "progress": False, "threads": 2},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_rows(tmp / "valid", 50_000, seed=1)
        print(f"{'rows':>10} {'mode':>10} {'peak MB':>9} {'seconds':>8} {'valid AUC':>9}")
        for rows in (args.rows, 10 * args.rows):
            write_rows(tmp / f"train{rows}", rows)
            for streaming in (True, False):
                cfg = config(tmp / f"train{rows}", tmp / "valid", streaming)
                if not streaming:  # in memory: one Parquet file read whole
                    cfg["data"]["train"] = str(tmp / f"train{rows}.parquet")
                    pd.concat(pd.read_parquet(p) for p in sorted((tmp / f"train{rows}").iterdir())).to_parquet(
                        cfg["data"]["train"])
                    cfg["data"]["valid"] = str(tmp / "valid.parquet")
                    pd.concat(pd.read_parquet(p) for p in sorted((tmp / "valid").iterdir())).to_parquet(cfg["data"]["valid"])
                out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                mode = "streamed" if streaming else "in memory"
                print(f"{rows:>10,} {mode:>10} {r['peak_mb']:>9.0f} {r['seconds']:>8.1f} {r['auc']:>9.4f}", flush=True)


if __name__ == "__main__":
    main()
