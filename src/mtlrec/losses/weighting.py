"""Loss weighting: per-task losses `[T]` -> one scalar to minimise.

A weighting is an `nn.Module` (it may own learnable weights, which then train with the model)
called as `weighting(losses)`. Fixed weighting is the sum of w_k L_k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrec.schema import Schema


class FixedWeighting(nn.Module):
    """L = sum_k w_k L_k with the task weights from the schema."""

    def __init__(self, weights: Sequence[float]):
        super().__init__()
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))

    def forward(self, losses: Tensor) -> Tensor:
        return (self.weights * losses).sum()


WEIGHTINGS = {"fixed": FixedWeighting}


def create_weighting(name: str, schema: Schema) -> nn.Module:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; allowed: {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name]([t.weight for t in schema.tasks])
