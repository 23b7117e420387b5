"""Gradient Vaccine, GradVac (Wang et al., ICLR 2021): align task gradients to a learned similarity."""

from __future__ import annotations

import math

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
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters


@register_weighting("gradvac")
class GradVac(GradientMethod):
    """Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021).

    On the shared entries, with g_k `[P]` the gradient of task k's config-weighted loss, each
    task i visits the other tasks j in a random order. With c = cos(g_i', g_j), g_i' task i's
    gradient as modified so far, and phi_ij the target similarity of the ordered pair:
        if c < phi_ij:
            g_i' += ||g_i'|| (phi_ij sqrt(1 - c^2) - c sqrt(1 - phi_ij^2)) / (||g_j|| sqrt(1 - phi_ij^2)) g_j
        phi_ij <- (1 - beta) phi_ij + beta c
    The correction makes cos(g_i', g_j) = phi_ij exactly; the update is sum_i g_i'. Targets start
    at 0, where the rule is PCGrad's projection; a pair whose gradients are usually aligned
    keeps them aligned. A pair with a zero gradient is skipped (no correction, no EMA step).
    `beta` defaults to 0.5, LibMTL's default. The paper leaves beta a hyper-parameter; its
    experiments use a much slower EMA (1e-2 as we recall it, not confirmed against its text).

    Deviation: the paper keeps a target per parameter group (e.g. per layer); here the whole
    shared gradient is one group (LibMTL's default granularity).

    `backward` returns the weights of the shared update: sum_i g_i' = sum_k c_k w_k grad L_k,
    it returns c_k w_k. State across steps: the targets phi `[T, T]`, a registered buffer, so
    checkpoints carry them. The visiting order of step t comes from a generator seeded from
    (seed, t) alone (GradDrop's `step_generator`), so no generator state needs saving and a
    resumed run draws what the uninterrupted run would have. Under data parallel it acts on
    each process's gradients before they are averaged, so each process updates its own targets
    (a checkpoint saves those of the process that writes it).
    """

    class Options(GradientOptions):
        beta: float = Field(0.5, gt=0.0, le=1.0, description="EMA rate of the target similarities, in (0, 1]")
        seed: int = Field(0, ge=0, lt=2**31, description="seeds the random order in which tasks are aligned")

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        self.register_buffer("targets", torch.zeros(self.num_tasks, self.num_tasks))  # phi_ij

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        order = step_generator(self.options.seed, int(self.steps))  # on the CPU: T draws
        coefficients = vaccinate(grads, self.targets, self.options.beta, order)  # g_i' = sum_k C_ik g_k
        multipliers = coefficients.sum(0)  # sum_i g_i' = multipliers @ grads
        return Combined(multipliers @ grads, multipliers * self.base)


@torch.no_grad()
def vaccinate(grads: Tensor, targets: Tensor, beta: float, generator: torch.Generator) -> Tensor:
    """GradVac on task gradients `[T, P]`: returns C `[T, T]` with g_i' = sum_k C_ik g_k, and
    moves the target similarities `targets` `[T, T]` (in place) by the EMA with rate `beta`."""
    t = grads.shape[0]
    norms = grads.norm(dim=1)
    coefficients = torch.eye(t, dtype=grads.dtype, device=grads.device)
    for i in range(t):
        g = grads[i].clone()
        others = [j for j in torch.randperm(t, generator=generator).tolist() if j != i]
        for j in others:
            norm_i = float(g.norm())
            if norm_i == 0.0 or float(norms[j]) == 0.0:
                continue
            cos = min(max(float(g @ grads[j]) / (norm_i * float(norms[j])), -1.0), 1.0)
            target = float(targets[i, j])
            if cos < target:
                sin_target = max(math.sqrt(max(1.0 - target**2, 0.0)), 1e-12)
                scale = norm_i * (target * math.sqrt(1.0 - cos**2) - cos * sin_target) / (float(norms[j]) * sin_target)
                g += scale * grads[j]
                coefficients[i, j] += scale
            targets[i, j] = (1 - beta) * target + beta * cos
    return coefficients
