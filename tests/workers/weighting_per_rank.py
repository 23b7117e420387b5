"""Run under torchrun (2 processes): one training step of every loss weighting through the
Trainer, each process on its half of a batch; rank 0 also computes what "the method acts on
each process's own gradients, then the gradients are averaged" gives, one process at a time,
and writes the largest differences to OUT/per_rank.json."""

import copy
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from mtlrec import models
from mtlrec.config import load_config
from mtlrec.data import TensorData
from mtlrec.losses.weighting import WEIGHTINGS
from mtlrec.schema import Schema
from mtlrec.train.trainer import Trainer

ROWS = 64
SCHEMA = Schema(dense=[{"name": f"x{i}"} for i in range(5)],
                tasks=[{"name": "a"}, {"name": "b"}, {"name": "c", "type": "regression"}])


def batch() -> TensorData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, 5, generator=g)
    labels = torch.stack([(x[:, 0] > 0).float(), (x[:, 1] > 0).float(), x[:, 2] - x[:, 0]], 1)
    mask = torch.ones(ROWS, 3, dtype=torch.bool)
    mask[::5, 1] = False  # task b's space: uneven over the halves
    return TensorData(torch.zeros(ROWS, 0, dtype=torch.long), x, labels, mask)


def trainer_for(name: str, model, alone: bool = False) -> Trainer:
    """A Trainer of `model`; `alone`: built as in a single process (no DistributedDataParallel, whose
    construction is a collective), for the references rank 0 computes by itself."""
    config = load_config({"train": {"weighting": name, "optimizer": "sgd", "lr": 0.1, "progress": False,
                                    "batch_size": ROWS}}).train
    if not alone:
        return Trainer(model, SCHEMA, config, seed=0)
    with mock.patch("mtlrec.train.distributed.world", return_value=(0, 1)):
        return Trainer(model, SCHEMA, config, seed=0)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data, half = batch(), ROWS // world
    differences = {}
    for name in sorted(WEIGHTINGS):
        torch.manual_seed(0)
        initial = models.create("cgc", SCHEMA, expert_hidden=[8], task_experts=[1, 1, 2])
        model = copy.deepcopy(initial)
        trainer_for(name, model)._step(data.rows(rank * half, (rank + 1) * half))
        if rank == 0:  # each process's gradient as its own method made it, then their mean
            grads = []
            for r in range(world):
                local = copy.deepcopy(initial)
                reference = trainer_for(name, local, alone=True)
                reference.world = world  # the loss scaling by the global counts, without communication
                part = data.rows(r * half, (r + 1) * half)
                scale = part.mask.sum(0).float() * world / data.mask.sum(0).float()
                reference._over_all_processes = lambda losses, batch, s=scale: losses * s
                reference.optimizers[0].step = lambda: None  # keep the gradient, no step
                reference.averaged = []  # and no averaging: the mean is taken below
                reference._step(part)
                grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in local.parameters()])
            expected = [p0 - 0.1 * torch.stack([g[i] for g in grads]).mean(0)
                        for i, p0 in enumerate(initial.parameters())]
            whole = copy.deepcopy(initial)  # the method on the whole batch's gradients, for contrast
            single = trainer_for(name, whole, alone=True)
            single.world, single.averaged = 1, []
            single._step(data)
            differences[name] = {
                "per_rank": max(float((p - e).abs().max()) for p, e in zip(model.parameters(), expected)),
                "whole_batch": max(float((p - w).abs().max()) for p, w in zip(model.parameters(), whole.parameters())),
            }
    if rank == 0:
        (out / "per_rank.json").write_text(json.dumps(differences))
    dist.barrier()  # both processes leave together: one ending early can abort the other's gloo threads
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
