"""Training speed and embedding memory per process: plain tables, fused tables, and tables
sharded by TorchRec over 2 processes, all through mtlrec's own `Trainer`, on the CPU.

Workload (synthetic, generated here; ids uniform, so each batch reads rows all over the tables):
  user    one id per row, a table of 2,000,000 x 16
  item    one id per row, a table of 500,000 x 16, shared with
  history a list of 1..20 item ids (mean-pooled, the same table)
  4 small tables (16..1,000 rows x 8), 13 dense features, 2 binary tasks;
  MMoE: 4 experts (64, 32), towers (16,); batch 2048 (global: 1024 per process under torchrun).
Configurations:
  plain       1 process, 2 threads: plain tables, Adam on everything (the default)
  fused       1 process, 2 threads: embedding_tables: fused (fbgemm, rowwise_adagrad in backward)
  table_wise  torchrun, 2 gloo processes of 1 thread: embedding_sharding: table_wise
  row_wise    torchrun, 2 gloo processes of 1 thread: embedding_sharding: row_wise
Each configuration runs in its own process(es): one epoch of --steps batches through
`Trainer.fit`. A forward pre-hook on the trained module stamps the time of every step; the
step time is the median interval between consecutive steps after --warmup steps (a whole
step: batch gather, forward, backward, optimizer, the trainer's per-step checks and, under
torchrun, its collectives), rows/s = global batch / median step time. At the first timed step
the hook counts, per process, the bytes of:
  tables           the embedding weights the process trains (its local shards under sharding)
  optimizer state  Adam's two moments (plain), the fused optimizer's state read from TorchRec
  gradient         the tables' gradient (plain only: the fused kernel never materialises one)
  plain copy       the plain tables the Trainer keeps to write the model folder
  unsharded copy   the whole tables TorchRec's sharded modules keep referring to
                   (`sharding_type_to_sharding_infos[...].param`)
and reads the process's resident memory (RSS training). Peak RSS: the process's maximum
resident set after the Trainer is built (setup), and over the whole run (the final gather
of the tables on rank 0 included). The machine is not isolated: the last line says how much
CPU other processes used during each configuration.

    python benchmarks/sharding_speed.py --steps 40 --warmup 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # name: (processes, train options)
    "plain": (1, {}),
    "fused": (1, {"embedding_tables": "fused"}),
    "table_wise": (2, {"embedding_sharding": "table_wise"}),
    "row_wise": (2, {"embedding_sharding": "row_wise"}),
}
SMALL = {"category": 1000, "country": 200, "device": 16, "hour": 24}  # small tables, dim 8
MODEL = {"num_experts": 4, "expert_hidden": [64, 32], "tower_hidden": [16]}
MIB = 2**20


# ------------------------------------------------------------------ worker (one process of one run)
def workload(rows: int, user_rows: int, item_rows: int, seed: int = 0):
    import torch

    from mtlrec.data import TensorData
    from mtlrec.data.features import Jagged
    from mtlrec.schema import Schema

    item = {"embedding": "item", "vocab_size": item_rows, "embedding_dim": 16}
    schema = Schema(
        sparse=[{"name": "user", "vocab_size": user_rows, "embedding_dim": 16}, {"name": "item", **item}]
        + [{"name": name, "vocab_size": v, "embedding_dim": 8} for name, v in SMALL.items()]
        + [{"name": "history", "multi_valued": True, "pooling": "mean", "max_length": 20, **item}],
        dense=[{"name": f"d{i}"} for i in range(13)],
        tasks=[{"name": "click"}, {"name": "like"}],
    )
    g = torch.Generator().manual_seed(seed)
    vocab = [user_rows, item_rows, *SMALL.values()]
    sparse = torch.stack([torch.randint(v, (rows,), generator=g) for v in vocab], 1)
    lengths = torch.randint(1, 21, (rows,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    history = Jagged(torch.randint(item_rows, (int(offsets[-1]),), generator=g), offsets)
    data = TensorData(sparse, torch.randn(rows, 13, generator=g), torch.randint(0, 2, (rows, 2), generator=g).float(),
                      torch.ones(rows, 2, dtype=torch.bool), lists=(history,))
    return schema, data


def nbytes(value) -> int:
    """Bytes of a tensor, or of the local shards of a ShardedTensor (0 for anything else, and for
    a meta tensor: a shape without storage, as the plain tables are while the shards hold them)."""
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    if isinstance(value, torch.Tensor) and value.is_meta:
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def state_bytes(optimizer_state: dict) -> int:
    """Bytes of the tensors in an optimizer's `state_dict()["state"]`."""
    return sum(nbytes(v) for per_param in optimizer_state.values() for v in per_param.values())


def embedding_memory(trainer) -> dict[str, int]:
    """Bytes this process holds for the embedding tables: the weights it trains (local shards),
    their optimizer state and gradient, the plain tables the Trainer keeps to write the model
    folder, and the unsharded tables TorchRec's sharded modules keep referring to."""
    import torch

    from mtlrec.nn.torchrec_embedding import TorchRecEmbedding
    from mtlrec.train.sharding import embedding_owners

    def plain_tables(model) -> int:
        return sum(nbytes(p) for owner in embedding_owners(model).values() for p in owner.embedding.parameters())

    if trainer.tables is None:  # plain tables: model parameters, Adam on them
        params = [p for owner in embedding_owners(trainer.model).values() for p in owner.embedding.parameters()]
        ids = {id(p) for p in params}
        state = sum(nbytes(v) for opt in trainer.optimizers for p, s in opt.state.items() if id(p) in ids
                    for v in s.values())
        return {"weights": sum(map(nbytes, params)), "state": state,
                "grad": sum(nbytes(p.grad) for p in params if p.grad is not None), "plain_copy": 0, "unsharded": 0}
    if not trainer.sharded:  # fused, one process: TorchRecEmbedding in the model, the plain tables set aside
        weights = state = 0
        for module in trainer.model.modules():
            if isinstance(module, TorchRecEmbedding):
                weights += sum(map(nbytes, module.table_weights().values()))
                state += state_bytes(module.pooled.fused_optimizer().state_dict()["state"])
        copy = sum(nbytes(p) for plain in trainer.tables.plain.values() for p in plain.parameters())
        return {"weights": weights, "state": state, "grad": 0, "plain_copy": copy, "unsharded": 0}
    wrapped = trainer.model  # DistributedModelParallel: sharded tables, fused optimizer
    weights = sum(nbytes(v) for k, v in wrapped.state_dict().items() if ".embedding_bags." in k)
    state = state_bytes(wrapped.fused_optimizer.state_dict()["state"])
    storages = {}  # TorchRec's ShardedEmbeddingBagCollection keeps each table's unsharded parameter here
    for module in wrapped.modules():
        for infos in getattr(module, "sharding_type_to_sharding_infos", {}).values():
            for info in infos:
                if type(info.param) in (torch.Tensor, torch.nn.Parameter) and not info.param.is_meta:
                    storage = info.param.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return {"weights": weights, "state": state, "grad": 0, "plain_copy": plain_tables(trainer.plain_model),
            "unsharded": sum(storages.values())}


def rss_now() -> int | None:
    """Resident bytes of this process now (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(args) -> None:
    import torch

    from mtlrec import models
    from mtlrec.config import TrainConfig
    from mtlrec.train import distributed
    from mtlrec.train.trainer import Trainer

    distributed.init_from_environment("cpu")
    rank, world = distributed.world()
    torch.set_num_threads(args.threads)
    processes, options = CONFIGS[args.worker]
    assert world == processes, f"{args.worker} runs on {processes} processes, not {world}"
    schema, data = workload(args.batch * args.steps, args.user_rows, args.item_rows)
    rss_base = peak_rss()
    torch.manual_seed(0)
    model = models.create("mmoe", schema, **MODEL)
    if options:
        options = options | {"embedding_optimizer": "rowwise_adagrad", "embedding_lr": 0.05}
    config = TrainConfig(epochs=1, batch_size=args.batch, lr=1e-3, progress=False,
                         early_stopping={"patience": None}, threads=args.threads, **options)
    start = time.perf_counter()
    trainer = Trainer(model, schema, config, seed=0)
    setup_s, rss_setup = time.perf_counter() - start, peak_rss()
    stamps: list[float] = []
    measured: dict = {}

    def stamp(module, inputs) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == args.warmup + 1 and module.training:  # the first timed step: memory, state exists
            measured.update(embedding_memory(trainer), rss_training=rss_now())

    trainer.model.register_forward_pre_hook(stamp)
    start = time.perf_counter()
    trainer.fit(data)
    fit_s = time.perf_counter() - start
    steps_ms = [(b - a) * 1e3 for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
    result = {"rank": rank, "world": world, "threads": torch.get_num_threads(), "steps_ms": steps_ms,
              "setup_s": setup_s, "fit_s": fit_s, "rss_base": rss_base, "rss_setup": rss_setup,
              "rss_peak": peak_rss(), **measured}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    distributed.leave()


# -------------------------------------------------------------- driver (runs every configuration)
def launch(name: str, args, out: Path) -> tuple[list[dict], float]:
    processes, _ = CONFIGS[name]
    threads = 2 // processes  # both cores busy either way
    script = [str(Path(__file__).resolve()), "--worker", name, "--out", str(out), "--threads", str(threads),
              "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--user-rows", str(args.user_rows), "--item-rows", str(args.item_rows)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *script]
    else:
        command = [sys.executable, *script]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads(out.joinpath(f"rank{r}.json").read_text()) for r in range(processes)], wall


def cpu_busy_s() -> float | None:
    """CPU seconds all processes of the machine have used since boot (Linux; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def children_cpu_s() -> float:
    """CPU seconds of this script's finished child processes (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def mib(value: int | None) -> str:
    return "—" if value is None else f"{value / MIB:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch", type=int, default=2048, help="global batch (split over the processes)")
    parser.add_argument("--steps", type=int, default=40, help="training steps (one epoch of steps x batch rows)")
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed")
    parser.add_argument("--user-rows", type=int, default=2_000_000)
    parser.add_argument("--item-rows", type=int, default=500_000)
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    names = args.configs.split(",")
    results, notes = {}, []
    for name in names:
        busy, mine = cpu_busy_s(), children_cpu_s()
        with tempfile.TemporaryDirectory() as out:
            results[name] = launch(name, args, Path(out))
        wall = results[name][1]
        others = None if busy is None else (cpu_busy_s() - busy - (children_cpu_s() - mine)) / wall
        notes.append(f"{name} {wall:.0f} s" + ("" if others is None else f" (other processes: {max(others, 0):.2f} cores)"))
        print(notes[-1], file=sys.stderr, flush=True)
    shown = " ".join(a for a in sys.argv[1:])
    print(f"\n$ python benchmarks/sharding_speed.py {shown}".rstrip())
    print(f"\nuser table {args.user_rows:,} x 16, item table {args.item_rows:,} x 16 (+ history of 1..20 items), "
          f"4 small tables x 8, 13 dense; MMoE; global batch {args.batch}; {args.steps} steps, "
          f"median of the last {args.steps - args.warmup - 1} step intervals; 2 CPU cores (1 process x 2 threads, "
          "or 2 processes x 1 thread); MiB per process\n")
    print(f"| config | processes | step ms (p10–p90) | rows/s | vs {names[0]} | process | tables | optimizer state "
          "| gradient | plain copy (Trainer) | unsharded copy (TorchRec) | embedding total | RSS training | peak RSS: setup / run |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for name in names:
        ranks, _ = results[name]
        steps = sorted(s for r in ranks[:1] for s in r["steps_ms"])  # rank 0's clock; the ranks step together
        median = statistics.median(steps)
        p10, p90 = steps[len(steps) // 10], steps[(len(steps) * 9) // 10]
        rate = args.batch / median * 1e3
        base = base or rate
        for r in ranks:
            lead = (f"| {name} | {len(ranks)} | {median:.0f} ({p10:.0f}–{p90:.0f}) | {rate:,.0f} | {rate / base:.2f}x"
                    if r["rank"] == 0 else "| | | | |")
            parts = [r.get(k) for k in ("weights", "state", "grad", "plain_copy", "unsharded")]
            total = None if None in parts else sum(parts)
            print(f"{lead} | {r['rank']} | " + " | ".join(mib(v) for v in [*parts, total, r.get("rss_training")])
                  + f" | {mib(r['rss_setup'])} / {mib(r['rss_peak'])} |")
    print("\nRSS before the model (torch, TorchRec and the data), rank 0: "
          + ", ".join(f"{name} {mib(results[name][0][0]['rss_base'])}" for name in names) + " MiB")
    print("Wall time per configuration, and the CPU other processes used meanwhile (mean busy cores of 2): "
          + "; ".join(notes))


if __name__ == "__main__":
    main()
