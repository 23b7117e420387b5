"""Shared-Bottom (hard parameter sharing, Caruana 1997): one MLP for all tasks.

h = f(x); every task's tower reads h.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtlrec.models.base import Backbone, BackboneOutput, SingleTaskModels
from mtlrec.models.options import MLPOptions
from mtlrec.models.registry import register_model
from mtlrec.nn import MLP


@register_model("shared_bottom", MLPOptions, "one MLP shared by all tasks, a tower per task (Caruana 1997)")
@register_model("single_task", MLPOptions, "one independent network per task (the baseline for MTL gain)",
                wrapper=SingleTaskModels)
class SharedBottom(Backbone):
    """x `[B, I]` -> h = MLP(x) `[B, H]`, repeated for every task -> `[B, T, H]`.

    Shared representation Z: h `[B, H]`, which every tower reads; every shared parameter
    (the embedding, the MLP) is upstream of it and every path to a loss passes through it.

    Options (`MLPOptions`): `hidden`, the layer sizes of the shared MLP; activation, dropout,
    batch_norm of its layers.
    """

    has_representation = True

    def __init__(self, in_dim: int, task_names: Sequence[str], options: MLPOptions):
        super().__init__()
        self.num_tasks = len(task_names)
        self.bottom = MLP(in_dim, options.hidden, activation=options.activation, dropout=options.dropout,
                          batch_norm=options.batch_norm)
        self.out_dim = self.bottom.out_dim

    def forward(self, x: Tensor) -> BackboneOutput:
        h = self.bottom(x)
        return BackboneOutput(h.unsqueeze(1).expand(-1, self.num_tasks, -1), {}, representation=h)
