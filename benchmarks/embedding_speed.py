"""Training speed of the embedding layer: the plain path against TorchRec's, one process, CPU.

Workloads (batch 1024, random data; speed does not depend on the values):
  ctr:   26 single sparse features (vocabularies 10..1000, log-spaced, dim 8) and 3 lists of
         1..50 items sharing one item table (10,000 x 8): sum, mean, and weighted mean pooling;
  large: the same with a 1,000,000 x 16 item table.
Paths:
  plain   FeatureEmbedding (one fused table per embedding size), torch.optim.SGD
  ebc     TorchRecEmbedding on torchrec.EmbeddingBagCollection, torch.optim.SGD
  fused   TorchRecEmbedding on FusedEmbeddingBagCollection (fbgemm TBE, SGD applied in backward)
  dmp     TorchRecEmbedding under DistributedModelParallel on one process (gloo, table-wise,
          fbgemm's fused kernel, SGD applied in backward by apply_optimizer_in_backward)
Each path times forward, forward+backward, and a training step (forward+backward+SGD update;
for fused and dmp the update runs inside backward, so their two last columns measure the same
thing). Paths run interleaved, --rounds times; the table shows the median milliseconds per
batch and rows/s of the training step.

    python benchmarks/embedding_speed.py --threads 1 --steps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from typing import Callable

import torch
from torch import nn

from mtlrec.data.features import Features, Jagged
from mtlrec.nn.embedding import FeatureEmbedding
from mtlrec.nn.torchrec_embedding import TorchRecEmbedding
from mtlrec.schema import Schema

CASES = {"ctr": (10_000, 8), "large": (1_000_000, 16)}  # item table rows, embedding size
LR = 0.01


def workload(item_rows: int, item_dim: int) -> Schema:
    vocab = torch.logspace(1, 3, 26).round().long().tolist()
    item = {"embedding": "item", "vocab_size": item_rows, "embedding_dim": item_dim, "multi_valued": True}
    return Schema(
        sparse=[{"name": f"s{i}", "vocab_size": v, "embedding_dim": 8} for i, v in enumerate(vocab)]
        + [{"name": "clicked", "pooling": "sum", **item}, {"name": "viewed", "pooling": "mean", **item},
           {"name": "rated", "pooling": "mean", "weights": "rating", **item}],
        tasks=[{"name": "click"}],
    )


def batches(schema: Schema, rows: int, count: int, seed: int = 0) -> list[Features]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.stack([torch.randint(f.vocab_size, (rows,), generator=g) for f in schema.singles], 1)
        lists = []
        for f in schema.lists:
            lengths = torch.randint(1, 51, (rows,), generator=g)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            total = int(offsets[-1])
            weights = torch.rand(total, generator=g) if f.weights else None
            lists.append(Jagged(torch.randint(f.vocab_size, (total,), generator=g), offsets, weights))
        out.append(Features(ids, torch.zeros(rows, 0), tuple(lists)))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded(module: TorchRecEmbedding) -> nn.Module:
    """`module` under DistributedModelParallel on this one process: bag tables table-wise on fbgemm's
    fused kernel, SGD applied in backward."""
    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel, planner
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    apply_optimizer_in_backward(torch.optim.SGD, module.pooled.parameters(), {"lr": LR})
    names = [c.name for c in module.pooled.embedding_bag_configs()]
    constraints = {n: planner.ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])
                   for n in names}
    plan = planner.EmbeddingShardingPlanner(topology=planner.Topology(world_size=1, compute_device="cpu"),
                                            constraints=constraints).collective_plan(module, pg=dist.GroupMember.WORLD)
    return DistributedModelParallel(module, device=torch.device("cpu"), plan=plan, init_data_parallel=False)


def build(path: str, schema: Schema) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """The module and the optimizer the training step calls (None: the update runs in backward)."""
    if path == "plain":
        module = FeatureEmbedding(schema)
    elif path == "ebc":
        module = TorchRecEmbedding(schema)
    elif path == "fused":
        return TorchRecEmbedding(schema, fused_optimizer=(torch.optim.SGD, {"lr": LR})), None
    else:
        return sharded(TorchRecEmbedding(schema)), None
    return module, torch.optim.SGD(module.parameters(), lr=LR)


def timings(module: nn.Module, optimizer, data: list[Features], upstream: torch.Tensor, steps: int) -> list[float]:
    """Milliseconds per batch of forward, forward+backward, and forward+backward+update."""

    def forward(batch):
        module(batch)

    def backward(batch):
        module(batch).backward(upstream)
        module.zero_grad(set_to_none=True)

    def step(batch):
        module(batch).backward(upstream)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    out = []
    for fn in (forward, backward, step):
        fn(data[0])  # untimed
        out.append(clock(fn, data, steps))
    return out


def clock(fn: Callable[[Features], None], data: list[Features], steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        fn(data[i % len(data)])
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="ctr,large")
    parser.add_argument("--paths", default="plain,ebc,fused,dmp")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = args.paths.split(",")
    rows = []
    for case in args.cases.split(","):
        schema = workload(*CASES[case])
        data = batches(schema, args.batch, 4)
        torch.manual_seed(0)
        modules = {path: build(path, schema) for path in paths}
        upstream = torch.randn(args.batch, modules[paths[0]][0](data[0]).shape[1])
        results: dict[str, list[list[float]]] = {path: [] for path in paths}
        for _ in range(args.rounds):
            for path in paths:
                results[path].append(timings(*modules[path], data, upstream, args.steps))
        medians = {path: [statistics.median(r[k] for r in results[path]) for k in range(3)] for path in paths}
        for path in paths:
            fwd, fwd_bwd, step = medians[path]
            rows.append((case, path, fwd, fwd_bwd, step, args.batch / step * 1e3, medians[paths[0]][2] / step))
        del modules
    print(f"\nbatch {args.batch}, {args.threads} threads, median of {args.rounds} rounds of {args.steps} batches;"
          f" speed-up = {paths[0]} step time / step time\n")
    print("| case | path | forward ms | fwd+bwd ms | fwd+bwd+update ms | rows/s | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for case, path, fwd, fwd_bwd, step, per_s, ratio in rows:
        print(f"| {case} | {path} | {fwd:.2f} | {fwd_bwd:.2f} | {step:.2f} | {per_s:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
