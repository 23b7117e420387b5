"""PLE's dynamic weights: each task's weight decays geometrically."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.losses.weighting.base import Weighting, WeightingOptions, register_weighting
from mtlrec.tasks import TaskSet


@register_weighting("decay")
class Decay(Weighting):
    """PLE's dynamic weights (Tang et al. 2020, Sec. 5.2): w_k(t) = w_k0 * gamma_k^t.

    t counts optimizer steps (`per: step`) or finished epochs (`per: epoch`); w_k0 is the
    task's config weight; `gamma` is one decay for all tasks or one per task.
    """

    class Options(WeightingOptions):
        gamma: float | list[float] = Field(0.9, description="decay per step or epoch: one for all tasks, or one each")
        per: Literal["step", "epoch"] = "epoch"

    capturable = True

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        gamma, per = self.options.gamma, self.options.per
        gammas = [gamma] * self.num_tasks if isinstance(gamma, (int, float)) else list(gamma)
        if len(gammas) != self.num_tasks:
            raise ValueError(f"decay gamma has {len(gammas)} values for {self.num_tasks} tasks")
        if min(gammas) < 0:
            raise ValueError(f"decay gamma must be >= 0 (a negative weight would ascend the loss), not {gammas}")
        self.per = per
        self.register_buffer("gamma", torch.tensor(gammas, dtype=torch.float32))

    def weights(self, losses: Tensor) -> Tensor:
        t = self.steps if self.per == "step" else self.epochs
        return self.base * self.gamma**t
