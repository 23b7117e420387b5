"""Shared-Bottom (hard parameter sharing, Caruana 1997): one MLP for all tasks.

h = f(x); every task's tower reads h.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.nn import MLP


class SharedBottom(Backbone):
    """x `[B, I]` -> h = MLP(x) `[B, H]`, repeated for every task -> `[B, T, H]`.

    Args:
        hidden: layer sizes of the shared MLP.
        activation, dropout, batch_norm: of the shared MLP.
    """

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        hidden: Sequence[int] = (256, 128),
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.num_tasks = len(task_names)
        self.bottom = MLP(in_dim, hidden, activation=activation, dropout=dropout, batch_norm=batch_norm)
        self.out_dim = self.bottom.out_dim

    def forward(self, x: Tensor) -> BackboneOutput:
        h = self.bottom(x)
        return BackboneOutput(h.unsqueeze(1).expand(-1, self.num_tasks, -1), {})
