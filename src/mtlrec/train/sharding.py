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

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

Sharding = Literal["auto", "table_wise", "row_wise", "column_wise", "data_parallel"]
SHARDINGS: tuple[str, ...] = ("auto", "table_wise", "row_wise", "column_wise", "data_parallel")
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")  # what fbgemm's fused CPU kernel supports


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


def plan(model: nn.Module, sharding: Sharding, sharders: list, device: torch.device):
    """TorchRec's plan for every table of `model` under `sharding` (auto: the planner
    chooses), made on rank 0 and broadcast, so every process holds the same plan."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    if sharding not in SHARDINGS:
        raise ValueError(f"embedding sharding {sharding!r} is not one of {SHARDINGS}")
    tables = [name.split(".")[-2] for name, _ in model.named_parameters() if ".embedding_bags." in name]
    constraints = None if sharding == "auto" else {t: ParameterConstraints(sharding_types=[sharding]) for t in tables}
    topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)


def shard_model(model: nn.Module, sharding: Sharding, optimizer: EmbeddingOptimizer,
                device: torch.device | str = "cpu"):
    """`model` wrapped in DistributedModelParallel (needs an initialised process group), starting
    from `model`'s own weights on every process."""
    from torchrec.distributed import DistributedModelParallel

    device = torch.device(device)
    initial = {name: value.detach().clone() for name, value in model.state_dict().items()}
    sharders = [_sharder_class()(fused_params=optimizer.fused_params())]
    wrapped = DistributedModelParallel(model, device=device, plan=plan(model, sharding, sharders, device),
                                       sharders=sharders)
    result = wrapped.load_state_dict(initial, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"sharded model does not take the model's weights: {result}")
    return wrapped


def dense_parameters(wrapped: nn.Module) -> list[nn.Parameter]:
    """The parameters the model's own optimizer updates: all but the sharded tables' (their
    optimizer is fused into the backward pass)."""
    return [p for name, p in wrapped.named_parameters() if ".embedding_bags." not in name]


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


__all__ = ["OPTIMIZERS", "SHARDINGS", "EmbeddingOptimizer", "dense_parameters", "gathered_state_dict", "plan",
           "shard_model"]
