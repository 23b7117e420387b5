"""Dual-Balancing Multi-Task Learning, DB-MTL (Lin et al., 2023)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.losses.weighting.base import (
    Combined,
    GradientMethod,
    GradientOptions,
    register_weighting,
)
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters

EPS = 1e-8  # in log(L_k + eps), as the authors' code; and the floor under a gradient norm


@register_weighting("db_mtl")
class DBMTL(GradientMethod):
    """Dual-Balancing Multi-Task Learning (Lin, Ye, Xu, Zhang & Kwok, "Dual-Balancing for
    Multi-Task Learning", arXiv:2308.12029, 2023).

    Loss-scale balancing: each task trains on c_k log(L_k + eps) (c_k the config weight), whose
    gradient is c_k grad L_k / L_k: a loss's scale no longer matters.
    Gradient-magnitude balancing, on the shared entries (`[T, P]`, task-owned entries 0): with
    g_k(t) the gradient of c_k log L_k at step t = 1, 2, ...,
        G_k(t) = beta_t G_k(t-1) + (1 - beta_t) g_k(t),  beta_t = beta / t^sigma,  G(0) = 0
        d = sum_k alpha_k G_k,  alpha_k = max_j ||G_j|| / ||G_k||
    so every task contributes a gradient of the largest task's norm (as in the paper and the
    authors' LibMTL code, the average starts at 0 without bias correction: step 1 uses
    (1 - beta) g). Parameters a single task owns get their plain log-loss gradient
    c_k grad L_k / L_k, which is also the update for every parameter when nothing is shared.

    `backward` returns alpha_k c_k / L_k `[T]`: the weight on grad L_k in the shared update
    when the average is the current gradient (beta = 0); with beta > 0 the past gradients also
    enter. State: the average G in the buffer `grad_average` `[T, P]` (sized at the first step;
    a loaded checkpoint sets its size; with beta 0 it stays empty: nothing is averaged). Under data parallel each process averages and balances
    its own gradients before the trainer averages them over processes.

    `on: representation` needs `beta: 0`: the average G would mix gradients on the
    representations of different batches' rows. With beta 0 the update is the weighting
    alpha_k c_k / L_k of the losses, found on Z, applied to the whole shared update
    (`GradientMethod`, "weights").
    """

    class Options(GradientOptions):
        beta: float = Field(0.9, ge=0, lt=1, description="beta in [0, 1): how much of the gradient average "
                            "is kept each step (0: the current gradient alone)")
        beta_sigma: float = Field(0.0, ge=0, description="sigma >= 0: beta_t = beta / t^sigma decays the "
                                  "average's memory over steps (0: constant beta)")

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        if self.options.on == "representation" and self.options.beta > 0:
            raise ValueError(f"weighting 'db_mtl' option on: representation needs beta: 0, not {self.options.beta} "
                             "(a running average of gradients on the representation would mix different batches' "
                             "rows)")
        if self.options.beta == 0 and self.options.beta_sigma > 0:
            raise ValueError(f"weighting 'db_mtl' option beta_sigma ({self.options.beta_sigma}) has no effect with "
                             "beta: 0 (there is no average to decay); remove it or set beta > 0")
        self.register_buffer("grad_average", torch.zeros(self.num_tasks, 0))

    def weights(self, losses: Tensor) -> Tensor:
        """c_k / L_k `[T]`: the weights whose weighted sum has the gradient of sum_k c_k log L_k."""
        return self.base / (losses.detach() + EPS)

    def task_losses(self, losses: Tensor) -> Tensor:
        """c_k log(L_k + eps): the plain update (weights c_k / L_k) is the sum of their gradients."""
        return self.base * torch.log(losses + EPS)

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        if self.options.beta == 0:  # the current gradient alone: no average to keep (or to checkpoint)
            alpha = magnitude_scales(grads)
            return Combined(alpha @ grads, alpha * self.weights(losses))
        if self.grad_average.shape != grads.shape:
            self.grad_average = torch.zeros_like(grads)
        step = self.steps + 1  # t: this step, counted from 1 (`steps` counts the steps before it)
        beta_t = self.options.beta / step.to(grads.dtype) ** self.options.beta_sigma
        self.grad_average.lerp_(grads.detach(), 1 - beta_t)  # beta_t G + (1 - beta_t) g
        alpha = magnitude_scales(self.grad_average)
        return Combined(alpha @ self.grad_average, alpha * self.weights(losses))  # weights alpha_k c_k / L_k

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "grad_average")
        if saved is not None:  # sized by the run that saved it
            self.grad_average = torch.zeros_like(saved, device=self.grad_average.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def magnitude_scales(grads: Tensor) -> Tensor:
    """alpha_k = max_j ||g_j|| / ||g_k|| `[T]` for gradients `[T, P]`: alpha_k g_k all have the
    largest norm. A zero gradient has nothing to scale: it gets alpha = 1 (so the weight logged
    for it stays finite); a norm below eps is divided by eps."""
    norms = grads.norm(dim=1)
    return torch.where(norms > 0, norms.max() / norms.clamp(min=EPS), torch.ones_like(norms))
