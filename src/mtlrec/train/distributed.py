"""Data-parallel helpers over torch.distributed: who am I, average gradients, reduce, gather.

Every function is a no-op (or the identity) in a single process, so callers need no branch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtlrec.train.gradients import flat_grad_of, write_gradient


def world() -> tuple[int, int]:
    """(rank, world size) of a torch.distributed run, (0, 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment(device: str) -> str | None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: gloo on CPU, NCCL on GPUs.
    Returns the device this process trains on (`cuda:LOCAL_RANK` on GPUs), None outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if device.startswith("cuda") or device == "auto" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return device


def leave() -> None:
    """Leave the process group, if in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Replace every gradient by its mean over the processes (one all-reduce)."""
    _, size = world()
    if size == 1 or not params:
        return
    flat = flat_grad_of(params)
    dist.all_reduce(flat)
    write_gradient(flat / size, params)


def mean(value: Tensor) -> Tensor:
    """The mean of `value` over the processes."""
    _, size = world()
    if size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / size


def total(value: Tensor) -> Tensor:
    """The sum of `value` over the processes."""
    return mean(value) * world()[1]


def first_step(steps: Tensor) -> Tensor:
    """Per entry, the smallest step over the processes; -1 (none) where no process has one."""
    if world()[1] == 1:
        return steps
    big = torch.iinfo(torch.long).max
    steps = torch.where(steps < 0, big, steps)
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    return torch.where(steps == big, -1, steps)


def gather_rows(parts: list[Tensor]) -> list[Tensor]:
    """Each tensor concatenated over the processes in rank order (rows first), on its device."""
    if world()[1] == 1:
        return parts
    gathered: list = [None] * world()[1]
    dist.all_gather_object(gathered, [p.cpu() for p in parts])
    return [torch.cat([g[i] for g in gathered]).to(parts[i].device) for i in range(len(parts))]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
