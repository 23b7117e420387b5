"""Smooth Tchebycheff scalarisation, STCH (Lin et al., ICML 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlrec.losses.weighting.base import Weighting, WeightingOptions, register_weighting
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters


@register_weighting("stch")
class STCH(Weighting):
    """Smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024).

    The Tchebycheff scalarisation max_k w_k (L_k - z_k) (preferences w = the config weights, 1 by
    default; z the ideal point) smoothed with mu > 0:
        L = mu log sum_k exp(w_k (L_k - z_k) / mu)
    Its gradient is sum_k p_k grad L_k with the implied weights (which `backward` returns)
        p_k = dL/dL_k = w_k softmax(w (L - z) / mu)_k   `[T]`
    which sum to 1 for w = 1. As mu -> 0 they go to one-hot on the task with the largest
    w_k (L_k - z_k) (plain Tchebycheff: train the worst task); as mu grows, to w / T.
    Ideal point (`ideal`): `zero` (z = 0, losses are >= 0) or `running_min`, each task's smallest
    training loss so far (this step's included, so L_k - z_k >= 0): the worst task is then the one
    furthest above its own best, not the one with the largest loss.

    mu = 1 by default (LibMTL's default). LibMTL's STCH for multi-task learning differs from the
    paper's equation implemented here: after warm-up epochs of summed log losses it applies the
    scalarisation to log(L_k / nadir_k), nadir the mean loss of the last warm-up epoch.

    State: the running minimum in the buffer `ideal_point` `[T]` (+inf before the first step;
    unused for `zero`). Under data parallel each process scalarises its own losses, and keeps its
    own running minimum, before the gradients are averaged.
    """

    class Options(WeightingOptions):
        mu: float = Field(1.0, gt=0, description="smoothing (> 0): small is close to the max over tasks, "
                          "large close to the mean")
        ideal: Literal["zero", "running_min"] = Field(
            "zero", description="ideal point z: 0, or each task's smallest training loss so far")

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        self.register_buffer("ideal_point", torch.full((self.num_tasks,), float("inf")))

    def reference(self, losses: Tensor) -> Tensor:
        """The ideal point z `[T]`: zeros, or the running minimum (updated with these losses)."""
        if self.options.ideal == "zero":
            return torch.zeros_like(self.base)
        return torch.minimum(self.ideal_point, losses.detach())

    def scaled_gaps(self, losses: Tensor) -> Tensor:
        """w (L - z) / mu `[T]`."""
        return self.base * (losses - self.reference(losses)) / self.options.mu

    def weights(self, losses: Tensor) -> Tensor:
        """The implied weights p_k = dL/dL_k `[T]` (no gradient)."""
        return self.base * torch.softmax(self.scaled_gaps(losses.detach()), dim=0)

    def backward(self, losses: Tensor, shared: SharedParameters | Sequence[nn.Parameter],
                 extra: Tensor | None = None, representation: Tensor | None = None) -> Tensor:
        implied = self.weights(losses)
        total = self.options.mu * torch.logsumexp(self.scaled_gaps(losses), dim=0)
        if extra is not None:
            total = total + extra
        total.backward()
        if self.options.ideal == "running_min":
            self.ideal_point.copy_(self.reference(losses))
        self.steps += 1
        return implied
