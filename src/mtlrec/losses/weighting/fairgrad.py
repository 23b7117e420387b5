"""FairGrad (Ban & Ji, ICML 2024): alpha-fair allocation of the shared update among the tasks."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.losses.weighting.base import (
    Combined,
    GradientMethod,
    GradientOptions,
    refuse_representation,
    register_weighting,
)
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters


@register_weighting("fairgrad")
class FairGrad(GradientMethod):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

    The update d `[P]` maximises the alpha-fair utility of the tasks' improvements g_k . d,
    sum_k (g_k . d)^(1 - alpha) / (1 - alpha) (log for alpha = 1) over a ball. With
    G = [g_1 .. g_T] the gradients `[P]` of w_k L_k (w_k the config weight) on the shared
    entries and d = G c, the optimality condition reads

        (G^T G c)_k = c_k^(-1/alpha)   for every k, c > 0,

    i.e. c_k^(1/alpha) (g_k . d) = 1. alpha = 1 (proportional fairness) is Nash-MTL's condition;
    alpha -> 0 tends to the utilitarian choice (the summed gradient's direction), alpha -> inf
    to max-min fairness. Solver (`fair_weights`): damped Newton in float64 on the Gram
    matrix `[T, T]` (the authors call scipy's least_squares; same solution). The shared entries
    get d (its norm clipped to `max_norm` if > 0); task-owned entries keep their plain gradient
    w_k grad L_k. The weights returned (logged) are c_k w_k, the shared update's coefficient on
    each L_k. A task whose gradient is 0 (no labelled rows in the batch) gets c_k = 0.

    `on: representation` is refused, as for Nash-MTL (`refuse_representation`): c scales as
    1 / ||g||, so c found on the representation would scale the parameters' update with the
    batch size.

    Stateless (the base's step counter only). Under data parallel it acts on each process's
    gradients before the trainer averages them: the mean of the per-process directions.
    """

    class Options(GradientOptions):
        alpha: float = Field(1.0, gt=0, description="fairness: 1 proportional (Nash-MTL's condition), larger "
                             "favours the worse-off task more (max-min as alpha grows)")
        max_norm: float = Field(0.0, ge=0, description="clip the shared update to this norm (0: no clipping)")

    def __init__(self, tasks: TaskSet, options: FairGrad.Options | None = None):
        super().__init__(tasks, options)
        refuse_representation(self, "fairgrad")

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        """d = G c (clipped); weights c_k w_k, its coefficient on each loss."""
        coefficients = fair_weights(grads @ grads.T, self.options.alpha).to(grads)
        direction = coefficients @ grads
        norm = float(direction.norm())
        if self.options.max_norm > 0 and norm > self.options.max_norm:
            coefficients = coefficients * (self.options.max_norm / norm)
            direction = coefficients @ grads
        return Combined(direction, coefficients.detach() * self.base)


def fair_weights(gram: Tensor, alpha: float = 1.0, max_iter: int = 100, tol: float = 1e-13) -> Tensor:
    """c `[T]` > 0 with (gram c)_k = c_k^(-1/alpha), from the Gram matrix `[T, T]` of the task
    gradients (float64 on the CPU); 0 for a task whose gradient is 0.

    c is the minimiser of the strictly convex f(c) = 1/2 c^T A c - sum_k u(c_k), with
    u(c) = log c (alpha = 1) or c^(1 - 1/alpha) / (1 - 1/alpha) (u' = c^(-1/alpha), u'' < 0), so
    the Hessian A + diag(c^(-1/alpha - 1) / alpha) is positive definite. A is the Gram matrix
    plus the ridge 1e-10 diag(gram) (linearly dependent gradients would leave f unbounded for
    alpha > 1). Newton from the answer for orthogonal gradients, c_k = ||g_k||^(-2 alpha / (alpha + 1)),
    each step halved until c stays positive and f falls enough (Armijo), until
    max_k |c_k^(1/alpha) (A c)_k - 1| < tol. Accurate (residual < 1e-5) in tests for alpha in
    [0.5, 20] with gradient norms spread over a few orders of magnitude; for alpha well below 0.5
    with linearly dependent gradients the powers overflow and the last finite iterate is returned.
    """
    gram = gram.detach().double().cpu()
    squared = gram.diagonal().clamp(min=0)
    active = squared > 1e-20 * float(squared.max().clamp(min=1e-300))  # tasks with a gradient
    weights = torch.zeros(gram.shape[0], dtype=torch.float64)
    if not bool(active.any()):
        return weights
    squared_active = squared[active]
    matrix = gram[active][:, active] + 1e-10 * torch.diag(squared_active)
    start = squared_active.pow(-alpha / (alpha + 1))  # ||g_k||^(-2 alpha / (alpha + 1))
    weights[active] = _damped_newton(matrix, start, alpha, max_iter, tol)
    return weights


def _damped_newton(matrix: Tensor, c: Tensor, alpha: float, max_iter: int, tol: float) -> Tensor:
    """Damped Newton for `fair_weights`: c `[T]` > 0 with (matrix c)_k = c_k^(-1/alpha)."""
    power = 1.0 - 1.0 / alpha

    def objective(x: Tensor) -> float:
        utility = x.log().sum() if alpha == 1.0 else (x.pow(power) / power).sum()
        return float(0.5 * x @ matrix @ x - utility)

    for _ in range(max_iter):
        marginal = c.pow(-1.0 / alpha)
        if float(((matrix @ c) / marginal - 1).abs().max()) < tol:
            break
        slope = matrix @ c - marginal
        hessian = matrix + torch.diag(marginal / c / alpha)
        newton = -torch.linalg.solve(hessian, slope)
        decrease = float(-(slope @ newton))  # squared Newton decrement, > 0
        value, step = objective(c), 1.0
        for _ in range(60):
            trial = c + step * newton
            if bool((trial > 0).all()) and objective(trial) <= value - 0.25 * step * decrease:
                break
            step /= 2
        else:  # no decrease that float64 can see: take the largest step that stays positive
            step = 1.0
            while not bool((c + step * newton > 0).all()):
                step /= 2
        if not bool(torch.isfinite(c + step * newton).all()):
            break  # overflow (tiny alpha with linearly dependent gradients): keep the last finite iterate
        c = c + step * newton
    return c
