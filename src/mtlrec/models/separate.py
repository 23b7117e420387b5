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

from pydantic import Field

from mtlrec.models.base import Backbone, BackboneOutput
from mtlrec.models.options import MLPOptions
from mtlrec.models.registry import register_model
from mtlrec.nn import MLP, activation_layer


class SeparateBottoms(Backbone):
    """x `[B, I]` -> `[B, T, H]`, task k's representation from its own MLP f_k.

    Shared representation Z: x `[B, I]` itself, the embedding's output: the embedding is all
    the tasks share, and every task reads x.

    Options (`MLPOptions`): hidden, the layer sizes of each task's MLP; activation, dropout,
    batch_norm of the MLPs.
    """

    has_representation = True

    def __init__(self, in_dim: int, task_names: Sequence[str], options: MLPOptions):
        super().__init__()
        if not options.hidden:
            raise ValueError("hidden needs at least one layer")
        self.bottoms = nn.ModuleList(
            MLP(in_dim, options.hidden, activation=options.activation, dropout=options.dropout,
                batch_norm=options.batch_norm) for _ in task_names
        )
        self.out_dim = self.bottoms[0].out_dim

    def task_modules(self, task: int) -> list[nn.Module]:
        return [self.bottoms[task]]

    def forward(self, x: Tensor) -> BackboneOutput:
        return BackboneOutput(torch.stack([f(x) for f in self.bottoms], dim=1), {}, representation=x)


class AsymmetricOptions(MLPOptions):
    source: str | None = Field(None, description="the task the others read (default: the first task)")


@register_model("asymmetric", AsymmetricOptions,
                "one MLP per task; the others also read a source task's output, detached")
class AsymmetricSharing(SeparateBottoms):
    """x `[B, I]` -> `[B, T, H]`: every task but `source` also reads the source task's
    bottom output, detached.

    Shared representation Z: x, as SeparateBottoms (the source's output reaches the others
    detached: no gradient).

    Options (`AsymmetricOptions`): source, the task whose representation the others read
    (default: the first task); the rest as SeparateBottoms.
    """

    def __init__(self, in_dim: int, task_names: Sequence[str], options: AsymmetricOptions):
        super().__init__(in_dim, task_names, options)
        activation = options.activation
        if len(task_names) < 2:
            raise ValueError("asymmetric sharing needs at least two tasks")
        source = options.source or task_names[0]
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
        return BackboneOutput(torch.stack(reps, dim=1), {}, representation=x)
