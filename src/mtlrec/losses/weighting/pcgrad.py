"""Gradient surgery, PCGrad (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.losses.weighting.base import (
    Combined,
    GradientMethod,
    GradientOptions,
    register_weighting,
    step_generator,
)
from mtlrec.train.gradients import SharedParameters


@register_weighting("pcgrad")
class PCGrad(GradientMethod):
    """Gradient surgery (Yu et al., NeurIPS 2020).

    On the shared parameters, each task's gradient g_k is projected, in a random order of the
    other tasks j, onto the normal plane of every g_j it conflicts with (g_k . g_j < 0):
    g_k <- g_k - (g_k . g_j) / ||g_j||^2 g_j; the update is the sum of the projected
    gradients. Parameters a single task owns get their ordinary gradient. Losses are
    weighted by the config weights first. The order of step t comes from a generator seeded
    by (seed, t) alone (`step_generator`), so a resumed run projects as an uninterrupted one.

    With `on: representation` the projections act on the gradients on the shared
    representation Z and the projected sum is backpropagated through Z (`GradientMethod`,
    "direction"); shared parameters reached around Z keep the plain weighted sum.
    """

    representation_update = "direction"

    class Options(GradientOptions):
        seed: int = Field(0, description="seeds the random order of the projections")

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        order = step_generator(self.options.seed, int(self.steps))
        return Combined(project_conflicts(grads, order))  # the config weights are returned


def project_conflicts(grads: Tensor, generator: torch.Generator) -> Tensor:
    """PCGrad's projection: `[T, P]` task gradients -> `[P]` sum of the projected gradients."""
    t = grads.shape[0]
    squared = (grads * grads).sum(1).clamp(min=1e-20)
    out = []
    for k in range(t):
        g = grads[k].clone()
        for j in torch.randperm(t, generator=generator).tolist():
            if j != k:
                dot = torch.dot(g, grads[j])
                g -= dot.clamp(max=0.0) / squared[j] * grads[j]
        out.append(g)
    return torch.stack(out).sum(0)
