"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution of the task gradients."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.losses.weighting.base import (
    Combined,
    GradientMethod,
    GradientOptions,
    SharedUpdate,
    register_weighting,
    refuse_representation,
    shared_gradient,
)
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters


@register_weighting("nash_mtl")
class NashMTL(GradientMethod):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022).

    With G = [g_1 .. g_T] the gradients `[P]` of w_k L_k (w_k the config weight) on the shared
    entries, alpha > 0 solves G^T G alpha = 1 / alpha (elementwise), i.e.
    alpha_k (g_k . d) = 1 for d = sum_k alpha_k g_k: every task gets the same log-improvement.
    Scaling one task's loss by s scales its alpha by 1 / s, so d does not depend on the tasks'
    loss scales (and the config weights w_k cancel on the shared entries); ||d||^2 = T.

    Solver (`nash_weights`): the fixed point is the stationary point of the strictly convex
    f(alpha) = 1/2 alpha^T G^T G alpha - sum_k log alpha_k, found by damped Newton on the
    Gram matrix `[T, T]` (the paper solves a sequence of convex problems with cvxpy; same
    solution). It needs linearly independent gradients; a small ridge keeps it solvable
    otherwise. A task whose gradient is 0 (no labelled rows in the batch) gets alpha_k = 0.

    The shared entries get d, its norm clipped to `max_norm` as in the authors' code (which
    clips the shared parameters' gradient norm after backward); since ||d|| = sqrt(T), the
    default 1.0 always rescales d to norm 1. Task-owned entries keep their plain gradient
    w_k grad L_k. The weights returned (logged) are the shared update's coefficients on each L_k.

    `on: representation` is refused: alpha scales as 1 / ||g||, and the gradients on Z are
    about sqrt(B) times smaller than on the parameters, so alpha found on Z would weight the
    parameters' update by a batch-size-dependent factor that `max_norm`, measured on Z, does
    not bound (`refuse_representation`).

    State: alpha is recomputed every `update_every` steps and kept, with the step counter, in
    buffers (checkpoints carry them); a step that reuses it needs two extra backward passes
    instead of T. Under data parallel it acts on each process's gradients before the trainer
    averages them: each process solves for its own alpha, and the averaged update is the mean
    of the per-process directions.
    """

    class Options(GradientOptions):
        max_norm: float = Field(1.0, ge=0, description="clip the shared update to this norm (0: no clipping)")
        update_every: int = Field(1, ge=1, description="recompute the task weights every this many steps")

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        refuse_representation(self, "nash_mtl")
        self.register_buffer("alpha", torch.ones(self.num_tasks))

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        """A step that solves for alpha: d = G alpha from the task gradients."""
        self.alpha.copy_(nash_weights(grads @ grads.T).to(self.alpha))
        alpha = self.alpha.to(grads)
        return self.clipped(alpha, alpha @ grads)

    def update(self, losses: Tensor, shared: SharedParameters, representation: Tensor | None = None) -> SharedUpdate:
        if int(self.steps) % self.options.update_every == 0:
            return super().update(losses, shared, representation)  # T task gradients: `combine`
        weighted = self.base * losses
        alpha = self.alpha.to(losses)
        # reuse alpha: two backward passes give the plain update and d = sum_k alpha_k g_k
        plain = shared_gradient(weighted.sum(), shared)
        clipped = self.clipped(alpha, shared_gradient((alpha * weighted).sum(), shared))
        return SharedUpdate(clipped.direction - plain, clipped.weights)

    def clipped(self, alpha: Tensor, direction: Tensor) -> Combined:
        """d `[P]` with its norm clipped to `max_norm`, and the weights (scaled alpha_k) w_k."""
        scale = 1.0
        norm = float(direction.norm())
        if self.options.max_norm > 0 and norm > self.options.max_norm:
            scale = self.options.max_norm / norm
        return Combined(scale * direction, (scale * alpha).detach() * self.base)


def nash_weights(gram: Tensor, max_iter: int = 100, tol: float = 1e-20) -> Tensor:
    """alpha `[T]` > 0 with (gram alpha)_k = 1 / alpha_k, from the Gram matrix `[T, T]` of the task
    gradients (float64 on the CPU); 0 for a task whose gradient is 0.

    With alpha_k = beta_k / ||g_k|| the equation reads beta_k (C beta)_k = 1 for the cosine matrix
    C_jk = g_j . g_k / (||g_j|| ||g_k||), which no loss scale changes; solving for beta makes the
    scale invariance exact, and the ridge 1e-10 I (for linearly dependent gradients) the same
    for every task. beta minimises f(beta) = 1/2 beta^T C beta - sum_k log beta_k (self-concordant,
    Hessian C + diag(1 / beta^2) positive definite): Newton from beta = 1 (the answer for
    orthogonal gradients), each step halved until beta stays positive and f falls enough
    (Armijo) while the squared Newton decrement is > 1/4, full steps below (quadratic
    convergence), until the decrement is below tol.
    """
    gram = gram.detach().double().cpu()
    squared = gram.diagonal().clamp(min=0)
    active = squared > 1e-20 * float(squared.max())  # tasks with a gradient
    alpha = torch.zeros(gram.shape[0], dtype=torch.float64)
    if not bool(active.any()):
        return alpha
    norms = squared[active].sqrt()
    cosines = gram[active][:, active] / norms[:, None] / norms[None, :]
    cosines = cosines + 1e-10 * torch.eye(len(norms), dtype=torch.float64)
    alpha[active] = _newton(cosines, torch.ones(len(norms), dtype=torch.float64), max_iter, tol) / norms
    return alpha


def _newton(cosines: Tensor, beta: Tensor, max_iter: int, tol: float) -> Tensor:
    """Damped Newton for `nash_weights`: beta `[T]` with beta_k (cosines beta)_k = 1, from beta > 0."""

    def objective(b: Tensor) -> float:
        return float(0.5 * b @ cosines @ b - b.log().sum())

    for _ in range(max_iter):
        slope = cosines @ beta - 1 / beta
        newton = -torch.linalg.solve(cosines + torch.diag(1 / beta**2), slope)
        decrement = float(-(slope @ newton))  # squared Newton decrement
        if decrement < tol:
            break
        step = 1.0
        if decrement > 0.25:  # far from the answer: damp (near it a full step stays inside beta > 0)
            value = objective(beta)
            while not (bool((beta + step * newton > 0).all())
                       and objective(beta + step * newton) <= value - 0.25 * step * decrement):
                step /= 2
        beta = beta + step * newton
    return beta
