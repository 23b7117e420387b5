"""Dynamic INT8 export against fp32 on census: file size, ONNX Runtime rows/s, test AUC.

Trains a PLE and an MMoE on census (configs/census.yaml's data and split) with the layer
sizes of the README's Speed section (PLE: 2 levels of 2 shared + 2 task experts (256, 128);
MMoE: 4 experts (256, 128); towers (64,); batch norm), or takes trained folders (--model).
Each is exported three ways: fp32 (`export_onnx`), int8 (`export_int8`) and int8 with the
embedding tables in 8 bits too (`embeddings=True`). For each file it prints

- the size;
- rows/s of an ONNX Runtime session on the raw inputs (strings through the vocabulary
  lookups, as served) for batches of --batches rows, with one thread and with ONNX Runtime's
  default (one per core): the median of --rounds rounds, each running the batch for at least
  --seconds;
- each task's test AUC (all test rows, batches of 8,192) and its change from fp32, and the
  largest difference of a prediction from the trained model's.

    python benchmarks/int8_export.py
    python benchmarks/int8_export.py --model runs/census --batches 1,64 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pandas as pd
import torch

from mtlrec.config import load_config
from mtlrec.experiment import load_splits, run_experiment
from mtlrec.export import export_onnx
from mtlrec.quantize import agreement, export_int8
from mtlrec.trained import TrainedModel, load

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "census.yaml"
SIZES = ["model.expert_hidden=[256,128]", "model.tower_hidden=[64]", "model.batch_norm=true"]
MODELS = {"ple": ["model.name=ple", "model.num_levels=2", "model.shared_experts=2", "model.task_experts=2"],
          "mmoe": ["model.name=mmoe", "model.num_experts=4"]}
VARIANTS = ("fp32", "int8", "int8 + tables")


def train(name: str, epochs: int, folder: Path) -> TrainedModel:
    config = load_config(CONFIG, MODELS[name] + SIZES + [f"train.epochs={epochs}", "train.progress=false"])
    start = time.perf_counter()
    run_experiment(config, folder, overwrite=True)
    print(f"trained {name} in {time.perf_counter() - start:.0f} s ({epochs} epochs)")
    return load(folder)


def raw_feed(trained: TrainedModel, table: pd.DataFrame) -> dict[str, np.ndarray]:
    """The export's inputs: each sparse feature as text ("" for missing), the dense matrix."""
    schema = trained.schema
    if schema.lists:
        raise SystemExit("this benchmark feeds single-valued features only")
    feed = {f.name: np.array(table[f.name].astype("string").fillna("").tolist(), dtype=object) for f in schema.sparse}
    return feed | {"dense": table[[f.name for f in schema.dense]].to_numpy(dtype=np.float32)}


def rows_per_second(session, feed: dict[str, np.ndarray], rows: int, seconds: float, rounds: int) -> float:
    batch = {k: v[:rows] for k, v in feed.items()}
    session.run(None, batch)
    speeds = []
    for _ in range(rounds):
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
            session.run(None, batch)
            runs += 1
        speeds.append(runs * rows / elapsed)
    return statistics.median(speeds)


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per physical core
    options.log_severity_level = 3  # its notes on graph rewriting, printed for every session, are not results
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(name: str, trained: TrainedModel, test: pd.DataFrame, folder: Path, args) -> list[dict]:
    """One row per export: its size, rows/s by threads and batch, each task's AUC, and the
    largest difference of a prediction from the trained model's."""
    paths = {"fp32": export_onnx(trained, folder / f"{name}.onnx"),
             "int8": export_int8(trained, folder / f"{name}.int8.onnx").path,
             "int8 + tables": export_int8(trained, folder / f"{name}.int8-tables.onnx", embeddings=True).path}
    feed = raw_feed(trained, test)
    expected = trained.predict(test.head(max(args.batches))).to_numpy()
    rows = []
    for variant, path in paths.items():
        checked = agreement(trained, path, test)
        row = {"model": name, "export": variant, "bytes": path.stat().st_size, "max_difference":
               max(checked.max_difference.values()), "auc": {t: checked.exported_metrics[f"auc/{t}"]
                                                             for t in trained.schema.task_names}}
        for threads in (1, 0):
            scorer = session(path, threads)
            for batch in args.batches:
                row[threads, batch] = rows_per_second(scorer, feed, batch, args.seconds, args.rounds)
        rows.append(row)
        raw = session(path, 1).run(["predictions"], {k: v[: len(expected)] for k, v in feed.items()})[0]
        print(f"{name} {variant}: the raw-input graph against predict on {len(expected):,} rows, largest "
              f"difference {np.abs(raw - expected).max():.2g} (agreement's, on all test rows: "
              f"{row['max_difference']:.2g})")
    return rows


def markdown(head: list[str], body: list[list[str]]) -> str:
    lines = [head, ["---"] * len(head), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def report(rows: list[dict], tasks: list[str], batches: list[int]) -> str:
    """Two tables: size and AUC, then rows/s; each against the same model's fp32 export."""
    fp32 = {row["model"]: row for row in rows if row["export"] == "fp32"}
    head = ["model", "export", "MB", "smaller"] + [f"AUC {t} (change)" for t in tasks] + ["max abs difference"]
    body = [[row["model"], row["export"], f"{row['bytes'] / 1e6:.2f}",
             f"{fp32[row['model']]['bytes'] / row['bytes']:.2f}x"]
            + [f"{row['auc'][t]:.4f} ({row['auc'][t] - fp32[row['model']]['auc'][t]:+.5f})" for t in tasks]
            + [f"{row['max_difference']:.3f}"] for row in rows]
    sizes = markdown(head, body)
    head = ["model", "export", "threads"] + [f"rows/s, batch {b} (vs fp32)" for b in batches]
    body = [[row["model"], row["export"], "1" if threads == 1 else "default"]
            + [f"{row[threads, b]:,.0f} ({row[threads, b] / fp32[row['model']][threads, b]:.2f}x)" for b in batches]
            for threads in (1, 0) for row in rows]
    return sizes + "\n\n" + markdown(head, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ple,mmoe", help="comma-separated, of: " + ", ".join(MODELS))
    parser.add_argument("--model", action="append", default=[], metavar="FOLDER",
                        help="a trained census model folder instead (repeat for several)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", default="1,64,4096", help="rows per call, comma-separated")
    parser.add_argument("--seconds", type=float, default=0.5, help="least time per round and batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="folder for the models and exports (default: a temporary one)")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.out or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        trained = {Path(m).name: load(m) for m in args.model} or {
            name: train(name, args.epochs, folder / name) for name in args.models.split(",")}
        rows, tasks = [], []
        for name, model in trained.items():
            rows += measure(name, model, load_splits(model.config).test, folder, args)
            tasks = model.schema.task_names
    print(f"\nONNX Runtime {onnxruntime.__version__}; default threads: one per core\n")
    print(report(rows, tasks, args.batches))


if __name__ == "__main__":
    main()
