"""Embedding tables sharded over processes with TorchRec; the dense part under DistributedDataParallel.

A model whose embedding tables live in TorchRec modules (`EmbeddingBagCollection`) is
wrapped in TorchRec's `DistributedModelParallel`: the planner places each table (whole on
one process, split by rows or columns, or copied to all), lookups travel between processes
by all-to-all, and the rest of the model is wrapped in torch's DistributedDataParallel, which
averages its gradients while the backward pass runs. Sharded tables are updated by
fbgemm's fused optimizer inside the backward pass (no gradient tensor is materialised for
them); on the CPU it offers exact SGD, Adagrad and row-wise Adagrad.

Facts of TorchRec 1.8.0 this module relies on (checked with 2 gloo processes on the CPU):
- its sharder offers row-wise sharding on CUDA only; the fused CPU kernel runs it too, so
  `CpuRowWiseSharder` adds it for the CPU;
- `DistributedModelParallel` initialises sharded tables itself: the model's own initial
  weights are loaded back after wrapping (`shard_model`), so N processes start from the
  weights one process would;
- `state_dict()` holds `ShardedTensor`s for sharded tables; `gathered_state_dict` assembles
  them on rank 0 into the plain tensors a single-process model loads.

Example (under torchrun, TorchRec installed):
    wrapped = shard_model(model, "row_wise", EmbeddingOptimizer("sgd", lr=0.1))
    ...train wrapped...
    state = gathered_state_dict(wrapped)   # rank 0: plain tensors; other ranks: None
"""

from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

Sharding = Literal["auto", "table_wise", "row_wise", "column_wise", "data_parallel"]  # auto: the planner's choice
SHARDINGS: tuple[str, ...] = get_args(Sharding)
TableOptimizer = Literal["sgd", "adagrad", "rowwise_adagrad"]  # what fbgemm's fused CPU kernel supports
OPTIMIZERS: tuple[str, ...] = get_args(TableOptimizer)


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """The fused optimizer of the sharded tables: `name` in OPTIMIZERS, learning rate `lr`,
    `eps` for the Adagrads."""

    name: str = "sgd"
    lr: float = 0.01
    eps: float = 1e-8

    def fused_params(self) -> dict:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        kinds = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
                 "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
        if self.name not in kinds:
            raise ValueError(f"embedding optimizer {self.name!r} is not one of {OPTIMIZERS}")
        return {"optimizer": kinds[self.name], "learning_rate": self.lr, "eps": self.eps}


def _sharder_class():
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    class CpuRowWiseSharder(EmbeddingBagCollectionSharder):
        """TorchRec's sharder for EmbeddingBagCollections, with row-wise sharding on the CPU too."""

        def sharding_types(self, compute_device_type: str) -> list[str]:
            types = super().sharding_types(compute_device_type)
            return types + ["row_wise"] if compute_device_type == "cpu" and "row_wise" not in types else types

    return CpuRowWiseSharder


def is_fused_table(name: str) -> bool:
    """Whether parameter `name` is a table of an EmbeddingBagCollection, which TorchRec's fused
    kernel updates inside backward (no gradient tensor, no torch optimizer)."""
    return ".embedding_bags." in name


def plan(model: nn.Module, sharding: Sharding, sharders: list, device: torch.device):
    """TorchRec's plan for every table of `model` under `sharding` (auto: the planner
    chooses), made on rank 0 and broadcast, so every process holds the same plan."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    if sharding not in SHARDINGS:
        raise ValueError(f"embedding sharding {sharding!r} is not one of {SHARDINGS}")
    tables = [name.split(".")[-2] for name, _ in model.named_parameters() if is_fused_table(name)]
    constraints = None if sharding == "auto" else {t: ParameterConstraints(sharding_types=[sharding]) for t in tables}
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)


def _unwrapped_dense_class():
    from torchrec.distributed.model_parallel import DataParallelWrapper

    class DenseAveragedByHand(DataParallelWrapper):
        """Leaves the dense part unwrapped (no DistributedDataParallel): the caller averages its
        gradients after backward. For steps that take several gradient passes over one graph
        (gradient methods: `torch.autograd.grad` per task), which DistributedDataParallel's
        reducer does not allow."""

        def wrap(self, dmp, env, device) -> None:
            return None

    return DenseAveragedByHand


def shard_model(model: nn.Module, sharding: Sharding, optimizer: EmbeddingOptimizer,
                device: torch.device | str = "cpu", initial: dict[str, torch.Tensor] | None = None,
                dense_ddp: bool = True):
    """`model` wrapped in DistributedModelParallel (needs an initialised process group), starting
    from `initial` (default: `model`'s own weights) on every process. A model whose tables are on
    the meta device (`TorchRecTables.sharded_copy`) needs `initial`: each process then allocates
    and fills only its shards. `dense_ddp=False` leaves the dense part out of
    DistributedDataParallel: the caller averages its gradients (`distributed.average_gradients`)."""
    from torchrec.distributed import DistributedModelParallel

    device = torch.device(device)
    if initial is None:
        initial = {name: value.detach().clone() for name, value in model.state_dict().items()}
    sharders = [_sharder_class()(fused_params=optimizer.fused_params())]
    wrapped = DistributedModelParallel(model, device=device, plan=plan(model, sharding, sharders, device),
                                       sharders=sharders,
                                       data_parallel_wrapper=None if dense_ddp else _unwrapped_dense_class()())
    result = wrapped.load_state_dict(initial, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"sharded model does not take the model's weights: {result}")
    return wrapped


def dense_parameters(wrapped: nn.Module) -> list[nn.Parameter]:
    """The parameters the model's own optimizer updates: all but the sharded tables' (their
    optimizer is fused into the backward pass)."""
    return [p for name, p in wrapped.named_parameters() if not is_fused_table(name)]


def gathered_state_dict(wrapped: nn.Module) -> dict[str, torch.Tensor] | None:
    """On rank 0, the plain state dict of the unwrapped model (sharded tables gathered whole);
    None on the other ranks. Every process must call it (the gathers are collective)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for name, value in wrapped.state_dict().items():
        name = name.removeprefix("module.")
        if isinstance(value, ShardedTensor):
            whole = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=whole)
            value = whole
        if rank == 0:
            out[name] = value.detach().cpu().clone()
    return out if rank == 0 else None


def fused_kernel_optimizer(optimizer: EmbeddingOptimizer) -> tuple[type[torch.optim.Optimizer], dict]:
    """The (optimizer class, kwargs) `TorchRecEmbedding` gives fbgemm's fused kernel on one process
    (Adagrad with torch's eps, 1e-10, so that it steps as torch.optim.Adagrad does)."""
    if optimizer.name == "sgd":
        return torch.optim.SGD, {"lr": optimizer.lr}
    if optimizer.name == "adagrad":
        return torch.optim.Adagrad, {"lr": optimizer.lr, "eps": 1e-10}
    from torchrec.optim import RowWiseAdagrad

    return RowWiseAdagrad, {"lr": optimizer.lr}


def embedding_owners(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> module, for every module of `model` with a `FeatureEmbedding` as `.embedding`
    (the model itself; each network of the single-task baseline)."""
    from mtlrec.nn.embedding import FeatureEmbedding

    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "embedding", None), FeatureEmbedding)}


def check_fusable(model: nn.Module) -> None:
    """TorchRec's tables replace each `FeatureEmbedding` a module holds as `.embedding`; refuse a
    model holding other embeddings (STEM's per-task tables), which would stay plain and untrained
    by the fused optimizer."""
    from mtlrec.nn.embedding import FeatureEmbedding

    swapped = {id(owner.embedding) for owner in embedding_owners(model).values()}
    others = [name for name, m in model.named_modules() if isinstance(m, FeatureEmbedding) and id(m) not in swapped]
    if others:
        raise ValueError("train.embedding_tables: fused and train.embedding_sharding replace the model's "
                         f"`embedding` only; this model holds more embedding tables ({', '.join(others)}): "
                         "use train.embedding_tables: plain")


class TorchRecTables:
    """A model's plain tables swapped for TorchRec's for training, and back for the model folder.

    `install(model)` replaces every `FeatureEmbedding` in `model` by a `TorchRecEmbedding` with
    the same weights (fused: updated inside backward by `optimizer`); `uninstall(model)` copies
    the trained tables back into the plain modules and puts them back. `restore(model, state)`
    does the same from a gathered state dict of a sharded copy (keys as `model` with TorchRec
    tables), on the process that holds it.
    """

    def __init__(self, schema, optimizer: EmbeddingOptimizer):
        self.schema = schema
        self.optimizer = optimizer
        self.plain: dict[str, nn.Module] = {}

    def install(self, model: nn.Module, fused: bool) -> nn.Module:
        from mtlrec.nn.torchrec_embedding import TorchRecEmbedding

        for name, owner in embedding_owners(model).items():
            fast = TorchRecEmbedding(self.schema, fused_kernel_optimizer(self.optimizer) if fused else None)
            fast.load_from(owner.embedding)
            self.plain[name] = owner.embedding
            owner.embedding = fast
        return model

    def sharded_copy(self, model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """A copy of `model` for `shard_model`, and the state it starts from. The copy's tables
        are TorchRec modules on the meta device (no storage: each process allocates only its
        shards); the state holds `model`'s weights, its tables as views of the plain rows, so no
        process ever holds a second whole copy of the tables."""
        from mtlrec.nn.torchrec_embedding import TorchRecEmbedding

        owners = embedding_owners(model)
        work = copy.deepcopy(model, {id(owner.embedding): None for owner in owners.values()})  # tables not copied
        initial: dict[str, torch.Tensor] = {}
        for name, owner in owners.items():
            tables = TorchRecEmbedding(self.schema, device="meta")
            work.get_submodule(name).embedding = tables
            prefix = f"{name}.embedding." if name else "embedding."
            initial.update((prefix + key, value) for key, value in tables.state_from(owner.embedding).items())
        initial.update((key, value) for key, value in work.state_dict().items() if key not in initial)
        return work, initial

    @staticmethod
    def release(model: nn.Module) -> None:
        """Free the plain tables' storage (sharded training holds the tables in its shards): each
        becomes a meta tensor of the same shape, until `restore` fills it on the process that
        gathers the trained tables. Using the model before that fails loudly (meta tensors)."""
        for owner in embedding_owners(model).values():
            for table in owner.embedding.tables:
                table.weight = nn.Parameter(torch.empty_like(table.weight, device="meta"))

    def uninstall(self, model: nn.Module) -> None:
        for name, plain in self.plain.items():
            owner = model.get_submodule(name)
            owner.embedding.copy_to(plain)
            owner.embedding = plain

    def restore(self, model: nn.Module, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Load a gathered state (a copy of `model` with TorchRec tables) into the plain `model`,
        each table's weight copied straight into its rows of the plain tables."""
        from mtlrec.nn.torchrec_embedding import TorchRecEmbedding, plain_layout

        keys = TorchRecEmbedding(self.schema, device="meta").table_keys()  # table -> its key, no storage
        owners = embedding_owners(model)
        prefixes = {name: f"{name}.embedding." if name else "embedding." for name in owners}
        rest = {k: v for k, v in state.items() if not any(k.startswith(p) for p in prefixes.values())}
        with torch.no_grad():
            for name, prefix in prefixes.items():
                plain = owners[name].embedding
                for table in plain.tables:
                    if table.weight.is_meta:  # released while the shards held the tables
                        table.weight = nn.Parameter(torch.empty_like(table.weight, device=device))
                for table, (i, rows) in plain_layout(plain, self.schema).items():
                    plain.tables[i].weight[rows] = state[prefix + keys[table]]
                attention = {k.removeprefix(prefix + "attention."): v for k, v in state.items()
                             if k.startswith(prefix + "attention.")}
                plain.attention.load_state_dict(attention)
        result = model.load_state_dict(rest, strict=False)
        unexpected = [k for k in result.missing_keys if not any(k.startswith(p) for p in prefixes.values())]
        if unexpected or result.unexpected_keys:
            raise RuntimeError(f"the sharded model's state does not fit the model: {result}")


def fused_optimizers(model: nn.Module) -> list:
    """The optimizers that live inside the tables: DistributedModelParallel's one, or each
    fused bag collection's on one process."""
    if hasattr(model, "fused_optimizer") and not callable(model.fused_optimizer):
        return [model.fused_optimizer]
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    return [m.fused_optimizer() for m in model.modules() if isinstance(m, FusedEmbeddingBagCollection)]


TABLES_PREFIX = "tables-"  # checkpoint folders of the tables' state, one per step: tables-<step>


def save_tables(folder: Path, step: int, model: nn.Module, best: dict | None) -> str:
    """Write the model's state (sharded tables in pieces, each process its own), the tables'
    fused optimizer state and the early-stopping copy with torch.distributed.checkpoint, into
    `folder/tables-<step>`, written aside and renamed once whole. Every process calls it.
    Returns the folder's name."""
    import torch.distributed.checkpoint as dcp

    name = f"{TABLES_PREFIX}{step}"
    partial = folder / f"{name}.partial"
    state = {"model": model.state_dict(), "optimizers": [o.state_dict() for o in fused_optimizers(model)]}
    if best is not None:
        state["best"] = best
    dcp.save(state, checkpoint_id=str(partial))
    _barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(folder / name, ignore_errors=True)
        os.replace(partial, folder / name)
    _barrier()
    return name


def load_tables(folder: Path, name: str, model: nn.Module, best: dict | None) -> dict | None:
    """Read what `save_tables` wrote into `model` (and its fused optimizers); returns the
    early-stopping copy when one was saved (`best`: a state dict of the model's shape to fill)."""
    import torch.distributed.checkpoint as dcp

    optimizers = fused_optimizers(model)
    state = {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers]}
    if best is not None:
        state["best"] = best
    dcp.load(state, checkpoint_id=str(folder / name))
    model.load_state_dict(state["model"])
    for optimizer, saved in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    return state.get("best")


def remove_old_tables(folder: Path, keep: str | None) -> None:
    """Delete the tables' checkpoint folders but `keep` (after a newer checkpoint has landed)."""
    for path in folder.glob(f"{TABLES_PREFIX}*"):
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


__all__ = ["OPTIMIZERS", "SHARDINGS", "EmbeddingOptimizer", "TorchRecTables", "check_fusable", "dense_parameters",
           "is_fused_table",
           "embedding_owners", "fused_kernel_optimizer", "fused_optimizers", "gathered_state_dict", "load_tables",
           "plan", "remove_old_tables", "save_tables", "shard_model"]
