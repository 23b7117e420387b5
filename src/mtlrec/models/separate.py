"""Per-task bottoms over the shared embedding, and asymmetric sharing built on them.

SeparateBottoms: h_k = f_k(x), one MLP per task (ESMM's and AITM's sub-networks).
AsymmetricSharing (PLE paper, Fig. 1b): a source task's bottom output feeds every other task,
with its gradient stopped, so the other tasks read it but cannot change it:
    h_s = f_s(x);   h_k = act(W_k [f_k(x); sg(h_s)] + b_k)  for k != s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.nn import MLP, activation_layer


class SeparateBottoms(Backbone):
    """x `[B, I]` -> `[B, T, H]`, task k's representation from its own MLP f_k.

    Args:
        hidden: layer sizes of each task's MLP.
        activation, dropout, batch_norm: of the MLPs.
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
        if not hidden:
            raise ValueError("hidden needs at least one layer")
        self.bottoms = nn.ModuleList(
            MLP(in_dim, hidden, activation=activation, dropout=dropout, batch_norm=batch_norm) for _ in task_names
        )
        self.out_dim = self.bottoms[0].out_dim

    def task_modules(self, task: int) -> list[nn.Module]:
        return [self.bottoms[task]]

    def forward(self, x: Tensor) -> BackboneOutput:
        return BackboneOutput(torch.stack([f(x) for f in self.bottoms], dim=1), {})


class AsymmetricSharing(SeparateBottoms):
    """x `[B, I]` -> `[B, T, H]`: every task but `source` also reads the source task's
    bottom output, detached.

    Args:
        source: the task whose representation the others read (default: the first task).
        hidden, activation, dropout, batch_norm: as SeparateBottoms.
    """

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        hidden: Sequence[int] = (256, 128),
        source: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__(in_dim, task_names, hidden, activation, dropout, batch_norm)
        if len(task_names) < 2:
            raise ValueError("asymmetric sharing needs at least two tasks")
        source = source or task_names[0]
        if source not in task_names:
            raise ValueError(f"source {source!r} is not a task; tasks: {list(task_names)}")
        self.source = list(task_names).index(source)
        h = self.out_dim
        self.fuse = nn.ModuleList(
            nn.Identity() if k == self.source else nn.Sequential(nn.Linear(2 * h, h), activation_layer(activation))
            for k in range(len(task_names))
        )

    def task_modules(self, task: int) -> list[nn.Module]:
        return [self.bottoms[task], self.fuse[task]]

    def forward(self, x: Tensor) -> BackboneOutput:
        own = [f(x) for f in self.bottoms]
        read = own[self.source].detach()
        reps = [h if k == self.source else self.fuse[k](torch.cat([h, read], dim=1)) for k, h in enumerate(own)]
        return BackboneOutput(torch.stack(reps, dim=1), {})
