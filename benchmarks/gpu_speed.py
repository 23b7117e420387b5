"""mtlrec's training and prediction speed through `mtlrec train`, on the peer workload, per option.

The workload is benchmarks/peers.py's (26 sparse features of vocabularies 10..1000 at size 8,
13 dense, 2 binary tasks; PLE 2 levels of 2 shared + 2 task experts (256, 128) with batch norm,
towers (64,); MMoE 4 such experts), written once as Parquet files. Each variant is one
`mtlrec train` run in a fresh process (`--set` overrides of one config): eager, recorded as a
CUDA graph (`train.cuda_graph: on`), with TF32, with bf16, at larger batches with the
square-root lr rule. Training rows/s is the training rows over an epoch's `seconds` in
epochs.jsonl (the training loop alone, not validation): the first epoch (warm-up and the
graph's recording inside) and the median of the later ones are printed. Prediction rows/s is
`TrainedModel.outputs` on the encoded test rows (encoding excluded: it runs on the host) at
--predict-batch, with the model folder loaded onto the device, median of 3 passes after one
untimed pass. AUCs are the run's test metrics.

    python benchmarks/gpu_speed.py --device cuda --rows 2000000 --epochs 3
    python benchmarks/gpu_speed.py --device cpu --rows 20000 --epochs 2 --variants eager   # the plumbing
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from peers import DENSE, DIM, MMOE, PLE, SPARSE, make_data  # noqa: E402  the same workload as the peers

VARIANTS = {  # name -> train overrides
    "eager": {},
    "graph": {"cuda_graph": "on"},
    "graph-tf32": {"cuda_graph": "on", "tf32": True},
    "graph-bf16": {"cuda_graph": "on", "precision": "bf16"},
    "graph-8k": {"cuda_graph": "on", "tf32": True, "batch_size": 8192, "lr_scaling": "sqrt",
                 "lr_reference_batch": 1024},
    "graph-64k": {"cuda_graph": "on", "tf32": True, "batch_size": 65536, "lr_scaling": "sqrt",
                  "lr_reference_batch": 1024, "schedule": {"name": "constant", "warmup_steps": 20}},
}
MODELS = {
    "ple": {"name": "ple", "num_levels": PLE["levels"], "task_experts": PLE["specific"],
            "shared_experts": PLE["shared"], "expert_hidden": PLE["experts"], "tower_hidden": PLE["tower"],
            "batch_norm": True},
    "mmoe": {"name": "mmoe", "num_experts": MMOE["experts_n"], "expert_hidden": MMOE["experts"],
             "tower_hidden": MMOE["tower"], "batch_norm": True},
}


def write_workload(folder: Path, rows: int) -> None:
    """Train, valid and test Parquet files of the peer workload (valid and test: rows / 4 each)."""
    for split, n, seed in (("train", rows, 0), ("valid", rows // 4, 2), ("test", rows // 4, 1)):
        x, y, _ = make_data(n, seed)
        pd.DataFrame(x | {"t0": y[:, 0], "t1": y[:, 1]}).to_parquet(folder / f"{split}.parquet")


def config(folder: Path, model: str, epochs: int, device: str) -> dict:
    return {
        "name": model, "seed": 0,
        "data": {"source": "files", "train": str(folder / "train.parquet"), "valid": str(folder / "valid.parquet"),
                 "test": str(folder / "test.parquet")},
        "features": {"sparse": [{"name": f"s{i}", "embedding_dim": DIM} for i in range(SPARSE)],
                     "dense": [{"name": f"d{i}"} for i in range(DENSE)]},
        "tasks": [{"name": "t0", "type": "binary"}, {"name": "t1", "type": "binary"}],
        "model": MODELS[model],
        "train": {"epochs": epochs, "batch_size": 1024, "lr": 1e-3, "device": device, "progress": False,
                  "early_stopping": {"metric": "loss", "patience": epochs}},
    }


def overrides(train: dict) -> list[str]:
    return [arg for key, value in train.items() for arg in ("--set", f"train.{key}={json.dumps(value)}")]


def predict_rate(run: Path, device: str, batch: int, rows_file: Path) -> float:
    from mtlrec import load

    trained = load(run, device=device)
    data = trained.encoder.transform(pd.read_parquet(rows_file), labels=False).to(device)
    rates = []
    for _ in range(4):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        trained.outputs(data, batch_size=batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(len(data) / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", default="ple,mmoe")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--predict-batch", type=int, default=65536)
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_workload(folder, args.rows)
        print(f"{args.rows:,} training rows; epochs {args.epochs}; predict batch {args.predict_batch:,}", flush=True)
        print(f"{'model':>5} {'variant':>11} {'batch':>6} {'first epoch rows/s':>19} {'later epochs rows/s':>20} "
              f"{'predict rows/s':>15} {'AUC t0':>7} {'AUC t1':>7}", flush=True)
        for model in args.models.split(","):
            path = folder / f"{model}.yaml"
            path.write_text(yaml.safe_dump(config(folder, model, args.epochs, args.device)))
            for variant in args.variants.split(","):
                run = folder / f"{model}-{variant}"
                out = subprocess.run([str(Path(sys.executable).parent / "mtlrec"), "train", str(path), "--out", str(run),
                                      *overrides(VARIANTS[variant])], capture_output=True, text=True)
                if out.returncode:
                    print(f"{model} {variant} failed:\n{out.stderr[-3000:]}", flush=True)
                    continue
                epochs = [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]
                rates = [args.rows / e["seconds"] for e in epochs]
                later = statistics.median(rates[1:]) if len(rates) > 1 else float("nan")
                metrics = json.loads((run / "metrics.json").read_text())
                test = metrics["test"]
                predict = predict_rate(run, args.device, args.predict_batch, folder / "test.parquet")
                batch = VARIANTS[variant].get("batch_size", 1024)
                print(f"{model:>5} {variant:>11} {batch:>6} {rates[0]:>19,.0f} {later:>20,.0f} {predict:>15,.0f} "
                      f"{test.get('auc/t0', float('nan')):>7.4f} {test.get('auc/t1', float('nan')):>7.4f}", flush=True)


if __name__ == "__main__":
    main()
