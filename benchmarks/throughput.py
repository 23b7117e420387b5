"""Training and prediction throughput of mtlrec's models on a recommendation-shaped workload.

26 sparse features (vocabularies 10..1000, embedding dim 8), 13 dense, 2 binary tasks;
PLE: 2 levels, 2 shared + 2 task experts per level, experts (256, 128), towers (64,);
MMoE: 4 such experts. Batch 1024 (--batch), Adam 1e-3. Data is random (speed does not depend on it).

    python benchmarks/throughput.py --rows 200000 --device cpu --threads 2
    python benchmarks/throughput.py --rows 2000000 --device cuda --batch-norm --variants default,graph,graph-tf32
"""

from __future__ import annotations

import argparse
import time

import torch

from mtlrec import models
from mtlrec.config import TrainConfig
from mtlrec.data import TensorData
from mtlrec.schema import Schema
from mtlrec.train.trainer import Trainer

MODELS = {
    "ple": {"num_levels": 2, "task_experts": 2, "shared_experts": 2, "expert_hidden": [256, 128], "tower_hidden": [64]},
    "mmoe": {"num_experts": 4, "expert_hidden": [256, 128], "tower_hidden": [64]},
}


def workload(rows: int, seed: int = 0) -> tuple[Schema, TensorData]:
    g = torch.Generator().manual_seed(seed)
    vocab = torch.randint(10, 1001, (26,), generator=g).tolist()
    schema = Schema(
        sparse=[{"name": f"s{i}", "vocab_size": v, "embedding_dim": 8} for i, v in enumerate(vocab)],
        dense=[{"name": f"d{i}"} for i in range(13)],
        tasks=[{"name": "click"}, {"name": "like"}],
    )
    sparse = torch.stack([torch.randint(0, v, (rows,), generator=g) for v in vocab], 1)
    data = TensorData(sparse, torch.randn(rows, 13, generator=g),
                      torch.randint(0, 2, (rows, 2), generator=g).float(), torch.ones(rows, 2, dtype=torch.bool))
    return schema, data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-norm", action="store_true")
    parser.add_argument("--warmup", action="store_true",
                        help="train and predict on 2,048 rows first, untimed (compile: its compilation happens there)")
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated: {', '.join(VARIANTS)} (graph*: CUDA only)")
    parser.add_argument("--batch", type=int, default=1024, help="training batch (prediction: 4x)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the process's choice: the trainer sets no global state
    for variant in args.variants.split(","):
        run(args, variant)


VARIANTS = {"default": {}, "fused-adam": {"fused_optimizer": True}, "bf16": {"precision": "bf16"},
            "compile": {"compile": True},
            # CUDA only: the step and prediction recorded as CUDA graphs (mtlrec.train.graphs)
            "graph": {"cuda_graph": "on"}, "graph-tf32": {"cuda_graph": "on", "tf32": True},
            "graph-bf16": {"cuda_graph": "on", "precision": "bf16"}}


def run(args, variant: str) -> None:
    schema, data = workload(args.rows)
    print(f"device {args.device}, threads {args.threads or torch.get_num_threads()}, rows {args.rows}, {variant}"
          + (", after a warm-up" if args.warmup else ""))
    for name, options in MODELS.items():
        config = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-3, device=args.device, threads=args.threads,
                             progress=False, **VARIANTS[variant])
        train_rates, predict_rates = [], []
        for r in range(args.rounds):
            torch.manual_seed(r)
            model = models.create(name, schema, batch_norm=args.batch_norm, **options)
            trainer = Trainer(model, schema, config, seed=r)
            if args.warmup:
                trainer.fit(data.rows(0, 2048))
                trainer.predict_split(data.rows(0, 2048))
            _sync(args.device)
            start = time.perf_counter()
            trainer.fit(data)
            _sync(args.device)
            train_rates.append(args.rows / (time.perf_counter() - start))
            start = time.perf_counter()
            trainer.predict_split(data)
            _sync(args.device)
            predict_rates.append(args.rows / (time.perf_counter() - start))
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:>5}: train {_median(train_rates):>10,.0f} rows/s   predict {_median(predict_rates):>11,.0f} rows/s"
              f"   ({params:,} parameters, median of {args.rounds})")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


if __name__ == "__main__":
    main()
