"""Run under torchrun: train a small model with TorchRec-sharded tables for a few steps, and
one process's reference copy on rank 0; write what the test compares to OUT/result.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from mtlrec.train.sharding import EmbeddingOptimizer, dense_parameters, gathered_state_dict, shard_model

TABLES, STEPS, BATCH = {"user": 120, "item": 80}, 6, 32


class Model(torch.nn.Module):
    """user id, item id and a list of items (sharing the item table, mean-pooled) -> MLP."""

    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="user", embedding_dim=4, num_embeddings=TABLES["user"], feature_names=["user"]),
            EmbeddingBagConfig(name="item", embedding_dim=4, num_embeddings=TABLES["item"],
                               feature_names=["item", "seen"], pooling=PoolingType.MEAN),
        ])
        self.mlp = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.mlp(self.ebc(features).values()).squeeze(1)


def batch(step: int, start: int, stop: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Rows start..stop-1 of step `step`'s global batch (the same on every process)."""
    g = torch.Generator().manual_seed(step)
    user = torch.randint(0, TABLES["user"], (BATCH,), generator=g)
    item = torch.randint(0, TABLES["item"], (BATCH,), generator=g)
    lengths = torch.randint(0, 5, (BATCH,), generator=g)
    seen = [torch.randint(0, TABLES["item"], (int(n),), generator=g) for n in lengths]
    y = torch.randn(BATCH, generator=g)
    rows = slice(start, stop)
    values = torch.cat([user[rows], item[rows], *seen[rows]])
    counts = torch.cat([torch.ones(stop - start, dtype=torch.long), torch.ones(stop - start, dtype=torch.long),
                        lengths[rows]])
    return KeyedJaggedTensor(keys=["user", "item", "seen"], values=values, lengths=counts), y[rows]


def train(model, dense, tables, start, stop):
    adam = torch.optim.Adam(dense, lr=0.01)
    for step in range(STEPS):
        features, y = batch(step, start, stop)
        adam.zero_grad()
        if tables is not None:
            tables.zero_grad()
        ((model(features) - y) ** 2).mean().backward()
        adam.step()
        if tables is not None:
            tables.step()


def main(sharding: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    reference = Model()
    reference.load_state_dict(initial)
    wrapped = shard_model(model, sharding, EmbeddingOptimizer("sgd", lr=0.5))
    local_rows = {name.split(".")[-2]: sum(s.tensor.shape[0] for s in value.local_shards())
                  for name, value in wrapped.state_dict().items() if hasattr(value, "local_shards")}
    (out / f"rows{rank}.json").write_text(json.dumps(local_rows))
    share = BATCH // world
    train(wrapped, dense_parameters(wrapped), None, rank * share, (rank + 1) * share)
    state = gathered_state_dict(wrapped)
    if rank == 0:
        train(reference, list(reference.mlp.parameters()), torch.optim.SGD(reference.ebc.parameters(), lr=0.5),
              0, BATCH)
        expected = reference.state_dict()
        (out / "result.json").write_text(json.dumps({
            "keys": sorted(state) == sorted(expected),
            "max_difference": {k: float((state[k] - expected[k]).abs().max()) for k in expected},
            "moved": {k: float((expected[k] - initial[k]).abs().max()) for k in expected},
        }))
    dist.barrier()  # both processes leave together: one ending early can abort the other's gloo threads
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
