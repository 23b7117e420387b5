"""`mtlrec plan`: TorchRec's sharding planner as a dry run, from an experiment config.

The config's embedding tables (one per `Schema.tables` entry) become an
`EmbeddingBagCollection` on the meta device, so nothing is allocated however large the
tables are; TorchRec's `EmbeddingShardingPlanner` then places them on a `Topology` of
`world_size` devices ("cuda" or "cpu") with `hbm_gb` of device memory each. No GPU is
needed: the planner only does arithmetic on shapes, and the topology is a description.

What comes back (`PlanReport`) is, per table, the sharding type, the compute kernel and the
shards with their ranks; per rank, the bytes of device memory (HBM) and host memory (DDR)
the planner's storage estimator counts (weights, optimizer state, input and output buffers)
and its step-time estimate; and the planner's rating of the plan: the estimated embedding
time of the slowest rank. `report.markdown()` prints it.

Facts of TorchRec 1.8.0 this module relies on (checked on a CPU-only machine):
- the planner runs without GPUs for a "cuda" topology: `plan(module, sharders)` on a
  module built on the meta device needs no device and no process group;
- `TopologyFactory.create_topology` is the supported way to describe the hardware (a
  `Topology` built directly logs a warning);
- the storage estimator counts optimizer state only for parameters that name their
  optimizer class (`_apply_optimizer_in_backward` sets it): Adam twice the weights,
  Adagrad once, row-wise Adagrad one value per row, SGD nothing; an optimizer given as a
  sharder's fused_params is not counted;
- per-feature pooling factors (average ids per row) come from `ParameterConstraints`,
  one per feature of a table; without them the planner assumes one table read by one
  feature with one id per row.

Example:
    report = plan(load_config("configs/plan_internet_scale.yaml"), world_size=64, device="cuda", hbm_gb=80)
    print(report.markdown())
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from mtlrec.config import Experiment, load_config
from mtlrec.schema import Schema
from mtlrec.train.optim import matches
from mtlrec.train.sharding import SHARDINGS

DEVICES: tuple[str, ...] = ("cuda", "cpu")
# "config": the optimizer the config trains the embedding with (train.optimizers' group for
# "embedding", else train.optimizer); rowwise_adagrad is TorchRec's usual one for large tables
PLAN_OPTIMIZERS: tuple[str, ...] = ("config", "sgd", "adagrad", "rowwise_adagrad", "adam", "adamw")
GIB = 1024**3  # TorchRec's "GB" (constants.HBM_CAP = 32 * 1024**3 is "32 GB")
DDR_GB = 128.0  # TorchRec's default host memory per rank (constants.DDR_CAP)
WEIGHT_BYTES = 4  # float32 tables


class PlanError(ValueError):
    """The plan cannot be made (config without table sizes, impossible topology, no fit)."""


@dataclass(frozen=True)
class TableSpec:
    """One embedding table as the planner sees it. `pooling_factors[i]` is the average
    number of ids per row of `features[i]`; `pooling_sources[i]` says where it came from."""

    name: str
    rows: int
    dim: int
    features: tuple[str, ...]
    pooling_factors: tuple[float, ...]
    pooling_sources: tuple[str, ...]

    @property
    def weight_bytes(self) -> int:
        return self.rows * self.dim * WEIGHT_BYTES


@dataclass(frozen=True)
class StepTime:
    """TorchRec's step-time estimate in milliseconds (its `Perf`). `total` is the planner's:
    compute and comms of forward and backward plus prefetch; the input all-to-all
    (`input_dist_comms`) is reported but, as in TorchRec, not added."""

    fwd_compute: float = 0.0
    fwd_comms: float = 0.0
    bwd_compute: float = 0.0
    bwd_comms: float = 0.0
    prefetch_compute: float = 0.0
    input_dist_comms: float = 0.0

    @property
    def total(self) -> float:
        return self.fwd_compute + self.fwd_comms + self.bwd_compute + self.bwd_comms + self.prefetch_compute

    def __add__(self, other: StepTime) -> StepTime:
        return StepTime(*(a + b for a, b in zip(self._values(), other._values())))

    def _values(self) -> tuple[float, ...]:
        return (self.fwd_compute, self.fwd_comms, self.bwd_compute, self.bwd_comms, self.prefetch_compute,
                self.input_dist_comms)


@dataclass(frozen=True)
class Shard:
    """A block of a table on one rank: rows [row_offset, row_offset + rows), columns
    [col_offset, col_offset + cols), with the planner's memory and time estimates."""

    rank: int
    row_offset: int
    rows: int
    col_offset: int
    cols: int
    hbm_bytes: int
    ddr_bytes: int
    step: StepTime

    @property
    def weight_bytes(self) -> int:
        return self.rows * self.cols * WEIGHT_BYTES


@dataclass(frozen=True)
class TablePlan:
    """Where one table goes: TorchRec's sharding type and compute kernel, and its shards."""

    table: TableSpec
    sharding_type: str
    compute_kernel: str
    ranks: tuple[int, ...]
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class RankUsage:
    """What one rank holds: the tables with a shard on it, the bytes of their weights, the
    HBM and DDR bytes the planner counts for those shards (weights, optimizer state, input
    and output buffers) and the sum of their step-time estimates."""

    rank: int
    tables: tuple[str, ...]
    weight_bytes: int
    hbm_bytes: int
    ddr_bytes: int
    step: StepTime


@dataclass(frozen=True)
class PlanReport:
    """A dry-run plan. `step_ms` is the planner's rating (TorchRec's `NoopPerfModel`): the
    largest per-rank total; `sum_of_maxima_ms` adds each phase's slowest rank instead, as if
    ranks waited for each other after every phase (an upper bound)."""

    config_name: str
    world_size: int
    gpus_per_host: int
    device: str
    hbm_bytes: int
    ddr_bytes: int
    reserved_fraction: float
    batch_per_rank: int
    global_batch: int
    sharding: str
    optimizer: str
    tables: tuple[TablePlan, ...]
    ranks: tuple[RankUsage, ...]
    step_ms: float
    sum_of_maxima_ms: float
    seconds: float
    torchrec_plan: Any = field(default=None, repr=False, compare=False)  # the ShardingPlan, for DMP

    @property
    def usable_hbm_bytes(self) -> int:
        """Per rank, what the planner may fill after the reservation for the dense model."""
        return int((1 - self.reserved_fraction) * self.hbm_bytes)

    def markdown(self) -> str:
        return _markdown(self)


# ---------------------------------------------------------------------------------------------
# From the config: tables and optimizer


def table_specs(schema: Schema, pooling_factors: dict[str, float] | None = None) -> list[TableSpec]:
    """One `TableSpec` per table of the schema. Rows: `hash_buckets + 1` for hashed
    features (as the encoder sets it), else `vocab_size`; a plan reads no data, so every
    sparse feature needs one of the two. Pooling factor of a feature: 1 for a single id;
    for a list the given `pooling_factors[name]`, else its `max_length` (an upper bound:
    lists keep at most that many ids)."""
    given = dict(pooling_factors or {})
    by_name = {f.name: f for f in schema.sparse}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise PlanError(f"pooling factors for unknown sparse feature(s) {unknown}; sparse features: {list(by_name)}")
    singles = sorted(n for n in given if not by_name[n].multi_valued)
    if singles:
        raise PlanError(f"pooling factors apply to lists (multi_valued); {singles} hold one id per row")
    bad = sorted(n for n, v in given.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0))
    if bad:
        raise PlanError(f"pooling factors must be positive numbers: {bad}")
    unsized = [f.name for f in schema.sparse if f.vocab_size is None and f.hash_buckets is None]
    if unsized:
        raise PlanError(f"sparse features without a table size: {unsized}; a plan reads no data, so give each "
                        "vocab_size or hash_buckets in the config")
    unknown_length = [f.name for f in schema.lists if f.name not in given and f.max_length is None]
    if unknown_length:
        raise PlanError(f"lists without a pooling factor (average ids per row): {unknown_length}; give "
                        "max_length in the config or a pooling factor (--pooling-factor NAME=N)")
    specs = []
    for name, features in schema.tables.items():
        if "." in name:
            raise PlanError(f"table name {name!r}: TorchRec table names cannot contain '.'")
        first = features[0]
        rows = first.hash_buckets + 1 if first.hash_buckets else first.vocab_size
        pooling = [(1.0, "single id") if not f.multi_valued
                   else (float(given[f.name]), "given") if f.name in given
                   else (float(f.max_length), "max_length (upper bound)") for f in features]
        specs.append(TableSpec(name, rows, first.embedding_dim, tuple(f.name for f in features),
                               tuple(p for p, _ in pooling), tuple(s for _, s in pooling)))
    return specs


def embedding_optimizer(config: Experiment) -> str:
    """The optimizer the config trains the embedding tables with."""
    train = config.train
    named = [g for g in train.optimizers if g.params != "rest" and matches("embedding.tables.0.weight", g.params)]
    rest = [g for g in train.optimizers if g.params == "rest"]
    if named:
        return named[0].optimizer
    if rest:
        return rest[0].optimizer
    return train.optimizer


def _optimizer_class(name: str):
    """The class whose state TorchRec's storage estimator counts (AdamW's state is Adam's)."""
    import torch
    from torchrec.optim import RowWiseAdagrad

    classes = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad,
               "adam": torch.optim.Adam, "adamw": torch.optim.Adam}
    return classes[name]


# ---------------------------------------------------------------------------------------------
# The planner


def plan(config: Experiment | str, world_size: int, device: str = "cuda", hbm_gb: float = 80.0,
         sharding: str = "auto", *, gpus_per_host: int = 8, ddr_gb: float = DDR_GB,
         reserved_fraction: float = 0.15, optimizer: str = "config",
         pooling_factors: dict[str, float] | None = None, batch_per_rank: int | None = None) -> PlanReport:
    """TorchRec's sharding plan for the config's embedding tables on `world_size` devices.

    `hbm_gb` / `ddr_gb`: device / host memory per rank in GiB (TorchRec's GB);
    `reserved_fraction` of the HBM is left to the dense model, activations and input
    buffers (TorchRec's `FixedPercentageStorageReservation`). `sharding` restricts every
    table to one sharding type (auto: the planner chooses). `optimizer` decides the
    optimizer state the planner counts ("config": the config's embedding optimizer).
    `batch_per_rank` defaults to the config's global `train.batch_size` over the ranks.
    Raises `PlanError` (a ValueError) with a one-paragraph reason when no plan exists.
    """
    if isinstance(config, str):
        config = load_config(config)
    _check_arguments(world_size, device, hbm_gb, ddr_gb, sharding, gpus_per_host, reserved_fraction, optimizer,
                     batch_per_rank)
    specs = table_specs(config.schema, pooling_factors)
    if not specs:
        raise PlanError("the config has no sparse features: there are no embedding tables to shard")
    optimizer_name = embedding_optimizer(config) if optimizer == "config" else optimizer
    batch = batch_per_rank or max(1, config.train.batch_size // world_size)
    local = min(gpus_per_host, world_size)
    start = time.perf_counter()
    options, sharding_plan, rating = _run_planner(specs, world_size, local, device, int(hbm_gb * GIB),
                                                  int(ddr_gb * GIB), reserved_fraction, sharding, optimizer_name,
                                                  batch)
    seconds = time.perf_counter() - start
    tables = _table_plans(specs, options, sharding_plan)
    ranks = _rank_usage(tables, world_size)
    steps = [r.step for r in ranks]
    sum_of_maxima = sum(max(getattr(s, phase) for s in steps)
                        for phase in ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "prefetch_compute"))
    return PlanReport(config_name=config.name, world_size=world_size, gpus_per_host=local, device=device,
                      hbm_bytes=int(hbm_gb * GIB) if device == "cuda" else 0, ddr_bytes=int(ddr_gb * GIB),
                      reserved_fraction=reserved_fraction, batch_per_rank=batch,
                      global_batch=config.train.batch_size, sharding=sharding, optimizer=optimizer_name,
                      tables=tuple(tables), ranks=tuple(ranks), step_ms=rating, sum_of_maxima_ms=sum_of_maxima,
                      seconds=seconds, torchrec_plan=sharding_plan)


def _check_arguments(world_size, device, hbm_gb, ddr_gb, sharding, gpus_per_host, reserved_fraction, optimizer,
                     batch_per_rank) -> None:
    problems = []
    if not isinstance(world_size, int) or world_size < 1:
        problems.append(f"world size must be a positive integer, not {world_size!r}")
    if device not in DEVICES:
        problems.append(f"device {device!r} is not one of {list(DEVICES)}")
    if device == "cuda" and not hbm_gb > 0:
        problems.append(f"HBM per device must be positive, not {hbm_gb!r} GB")
    if not ddr_gb >= 0:
        problems.append(f"host memory per rank must be >= 0, not {ddr_gb!r} GB")
    if sharding not in SHARDINGS:
        problems.append(f"sharding {sharding!r} is not one of {list(SHARDINGS)}")
    if not isinstance(gpus_per_host, int) or gpus_per_host < 1:
        problems.append(f"devices per host must be a positive integer, not {gpus_per_host!r}")
    if not 0 <= reserved_fraction < 1:
        problems.append(f"reserved fraction must be in [0, 1), not {reserved_fraction!r}")
    if optimizer not in PLAN_OPTIMIZERS:
        problems.append(f"optimizer {optimizer!r} is not one of {list(PLAN_OPTIMIZERS)}")
    if batch_per_rank is not None and (not isinstance(batch_per_rank, int) or batch_per_rank < 1):
        problems.append(f"batch per rank must be a positive integer, not {batch_per_rank!r}")
    if problems:
        raise PlanError("; ".join(problems))


def _run_planner(specs: list[TableSpec], world_size: int, local: int, device: str, hbm: int, ddr: int,
                 reserved_fraction: float, sharding: str, optimizer: str, batch: int):
    """TorchRec's planner on a meta-device EmbeddingBagCollection: the chosen
    ShardingOptions (captured by a plan callback), the ShardingPlan and the plan's rating."""
    try:
        import torch
        from torch.distributed.optim import _apply_optimizer_in_backward
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import (
            EmbeddingShardingPlanner,
            ParameterConstraints,
        )
        from torchrec.distributed.planner.perf_models import NoopPerfModel
        from torchrec.distributed.planner.storage_reservations import (
            FixedPercentageStorageReservation,
        )
        from torchrec.distributed.planner.types import (
            KernelConfig,
            PlannerError,
            TopologyFactory,
            TrainerConfig,
        )
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
    except ImportError as err:
        raise PlanError(f"mtlrec plan needs TorchRec ({err}); install it with `make install` "
                        "(see pyproject.toml, extra 'torchrec')") from None

    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local, hbm_cap_bytes=hbm, ddr_cap_bytes=ddr,
                      ssd_cap_bytes=0),
        kernel_config=KernelConfig(compute_device=device))
    module = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=s.name, num_embeddings=s.rows, embedding_dim=s.dim,
                                   feature_names=list(s.features)) for s in specs],
        device=torch.device("meta"))
    # marks each table with its optimizer class: what the storage estimator reads
    _apply_optimizer_in_backward(_optimizer_class(optimizer), module.parameters(), {"lr": 0.01},
                                 register_hook=False)
    types = None if sharding == "auto" else [sharding]
    constraints = {s.name: ParameterConstraints(sharding_types=types, pooling_factors=list(s.pooling_factors),
                                                feature_names=list(s.features)) for s in specs}
    chosen = []

    def keep(best):  # a plan callback: the planner hands it the chosen ShardingOptions
        chosen[:] = best
        return best

    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch, constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(reserved_fraction),
        stats=[], callbacks=[keep], debug=False)
    quiet = _DropMessages("Sharding spec not found for")  # data-parallel tables have none, by design
    logging.getLogger().addFilter(quiet)
    try:
        sharding_plan = planner.plan(module, [EmbeddingBagCollectionSharder()])
    except PlannerError as err:
        raise PlanError(_no_plan_message(specs, world_size, device, hbm, ddr, reserved_fraction, sharding,
                                         optimizer, err)) from None
    finally:
        logging.getLogger().removeFilter(quiet)
    return chosen, sharding_plan, NoopPerfModel(topology).rate(chosen)


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _no_plan_message(specs, world_size, device, hbm, ddr, reserved_fraction, sharding, optimizer, err) -> str:
    weights = sum(s.weight_bytes for s in specs)
    largest = max(specs, key=lambda s: s.weight_bytes)
    memory = (f"{world_size} x {_size(int((1 - reserved_fraction) * hbm))} usable HBM and "
              f"{world_size} x {_size(ddr)} host memory" if device == "cuda"
              else f"{world_size} x {_size(ddr)} host memory")
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    reason = lines[0].rstrip(". ")
    if "Last planner error:" in lines[:-1]:
        reason += "; last error: " + lines[lines.index("Last planner error:") + 1]
    return (f"no plan fits: the tables hold {_size(weights)} of weights (largest: {largest.name!r}, "
            f"{_size(largest.weight_bytes)}), before {optimizer} state and buffers, on {memory}"
            f"{'' if sharding == 'auto' else f' with every table {sharding}'}; add devices, raise the memory per "
            f"device, choose another sharding or shrink the tables (TorchRec: {reason})")


def _table_plans(specs: list[TableSpec], options: list, sharding_plan) -> list[TablePlan]:
    """Join the ShardingPlan (sharding type, kernel, ranks) with the ShardingOptions' shards."""
    by_name = {o.name: o for o in options}
    module_plan = next(iter(sharding_plan.plan.values()))
    plans = []
    for spec in specs:
        option, parameter = by_name[spec.name], module_plan[spec.name]
        shards = tuple(
            Shard(rank=s.rank, row_offset=s.offset[0], rows=s.size[0], col_offset=s.offset[1], cols=s.size[1],
                  hbm_bytes=s.storage.hbm, ddr_bytes=s.storage.ddr, step=_step(s.perf))
            for s in option.shards)
        plans.append(TablePlan(spec, parameter.sharding_type, parameter.compute_kernel, tuple(parameter.ranks),
                               shards))
    return plans


def _step(perf) -> StepTime:
    return StepTime(fwd_compute=perf.fwd_compute, fwd_comms=perf.fwd_comms, bwd_compute=perf.bwd_compute,
                    bwd_comms=perf.bwd_comms, prefetch_compute=perf.prefetch_compute,
                    input_dist_comms=perf.input_dist_comms)


def _rank_usage(tables: list[TablePlan], world_size: int) -> list[RankUsage]:
    held: list[list[Shard]] = [[] for _ in range(world_size)]
    names: list[list[str]] = [[] for _ in range(world_size)]
    for t in tables:
        for s in t.shards:
            held[s.rank].append(s)
            names[s.rank].append(t.table.name)
    usage = []
    for rank, shards in enumerate(held):
        step = StepTime()
        for s in shards:
            step = step + s.step
        usage.append(RankUsage(rank, tuple(dict.fromkeys(names[rank])), sum(s.weight_bytes for s in shards),
                               sum(s.hbm_bytes for s in shards), sum(s.ddr_bytes for s in shards), step))
    return usage


# ---------------------------------------------------------------------------------------------
# The printed report


def _size(n: float) -> str:
    for unit, scale in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _ranges(ranks) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    ranks, out, i = sorted(ranks), [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ", ".join(out)


def _factor(x: float) -> str:
    return f"{x:g}"


def _markdown(r: PlanReport) -> str:
    memory = (f"{_size(r.hbm_bytes)} HBM each ({_size(r.usable_hbm_bytes)} usable after reserving "
              f"{r.reserved_fraction:.0%} for the dense model, activations and buffers), {_size(r.ddr_bytes)} host "
              "memory each" if r.device == "cuda" else f"{_size(r.ddr_bytes)} host memory each")
    lines = [
        f"Plan for {r.config_name!r} on {r.world_size} {r.device} devices ({r.gpus_per_host} per host), {memory}; "
        f"sharding {r.sharding}; batch {r.batch_per_rank:,} per rank (global {r.global_batch:,}); "
        f"optimizer state counted for {r.optimizer}; planned in {r.seconds:.1f} s.",
        "",
        "| table | rows | dim | weights | features (ids per row) | sharding | kernel | ranks |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    for t in r.tables:
        s = t.table
        features = ", ".join(f"{n} ({_factor(p)}{'' if src == 'single id' else ', ' + src})"
                             for n, p, src in zip(s.features, s.pooling_factors, s.pooling_sources))
        lines.append(f"| {s.name} | {s.rows:,} | {s.dim} | {_size(s.weight_bytes)} | {features} | "
                     f"{t.sharding_type} | {t.compute_kernel} | {_ranges(t.ranks)} |")
    lines += ["", "Per rank (ranks with the same tables and usage in one row; times in ms per step):", "",
              "| ranks | tables | weights | HBM | host memory | fwd compute | fwd comms | bwd compute | bwd comms "
              "| total |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[int]] = {}
    for u in r.ranks:
        key = (u.tables, u.weight_bytes, u.hbm_bytes, u.ddr_bytes, round(u.step.total, 6))
        groups.setdefault(key, []).append(u.rank)
    for ranks in groups.values():
        u = r.ranks[ranks[0]]
        st = u.step
        lines.append(f"| {_ranges(ranks)} | {', '.join(u.tables) or '-'} | {_size(u.weight_bytes)} | "
                     f"{_size(u.hbm_bytes)} | {_size(u.ddr_bytes)} | {st.fwd_compute:.3f} | {st.fwd_comms:.3f} | "
                     f"{st.bwd_compute:.3f} | {st.bwd_comms:.3f} | {st.total:.3f} |")
    slowest = max(r.ranks, key=lambda u: u.step.total)
    st = slowest.step
    lines += ["", f"Step-time estimate of the embeddings (TorchRec's perf model): {r.step_ms:.3f} ms on the slowest "
              f"rank ({slowest.rank}: fwd compute {st.fwd_compute:.3f} + fwd comms {st.fwd_comms:.3f} + bwd compute "
              f"{st.bwd_compute:.3f} + bwd comms {st.bwd_comms:.3f}); {r.sum_of_maxima_ms:.3f} ms if every phase "
              "waited for its slowest rank. The dense part (experts, towers) and its gradient all-reduce are not in "
              "it. HBM and host memory are the planner's estimates: weights, optimizer state, input and output "
              "buffers."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_pooling_factors(items: list[str]) -> dict[str, float]:
    """`["history=30"]` -> {"history": 30.0}."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            name = ""
        if not name:
            raise PlanError(f"--pooling-factor {item!r} is not of the form NAME=NUMBER")
    return out


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `mtlrec plan`."""
    parser.add_argument("config", help="experiment YAML (every sparse feature with vocab_size or hash_buckets)")
    parser.add_argument("--world-size", type=int, required=True, help="number of devices (ranks)")
    parser.add_argument("--device", choices=DEVICES, default="cuda", help="the devices planned for (default cuda)")
    parser.add_argument("--hbm-gb", type=float, default=80.0, help="device memory per GPU in GiB (default 80)")
    parser.add_argument("--ddr-gb", type=float, default=DDR_GB,
                        help=f"host memory per rank in GiB, for offloaded tables (default {DDR_GB:g})")
    parser.add_argument("--gpus-per-host", type=int, default=8, help="devices per machine (default 8)")
    parser.add_argument("--sharding", choices=SHARDINGS, default="auto",
                        help="one sharding type for every table; auto: the planner chooses per table")
    parser.add_argument("--optimizer", choices=PLAN_OPTIMIZERS, default="config",
                        help="embedding optimizer whose state is counted (config: the config's)")
    parser.add_argument("--reserve", type=float, default=0.15,
                        help="fraction of HBM kept for the dense model, activations and buffers (default 0.15)")
    parser.add_argument("--pooling-factor", action="append", default=[], metavar="LIST=N",
                        help="average ids per row of a list feature (default: its max_length, an upper bound)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.batch_size=131072")


def cli_plan(args) -> int:
    """`mtlrec plan CONFIG --world-size N [--device cuda] [--hbm-gb G] [--sharding auto] ...`"""
    report = plan(load_config(args.config, args.set), world_size=args.world_size, device=args.device,
                  hbm_gb=args.hbm_gb, sharding=args.sharding, gpus_per_host=args.gpus_per_host,
                  ddr_gb=args.ddr_gb, reserved_fraction=args.reserve, optimizer=args.optimizer,
                  pooling_factors=parse_pooling_factors(args.pooling_factor))
    print(report.markdown())
    return 0
