"""PE-LTR (Lin et al., RecSys 2019): the min-norm combination of the task gradients with per-task lower bounds."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import Tensor

from mtlrec.losses.weighting.base import (
    Combined,
    GradientMethod,
    GradientOptions,
    register_weighting,
)
from mtlrec.losses.weighting.mgda import min_norm_weights, tasks_with_gradient
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters


@register_weighting("pe_ltr")
class PELTR(GradientMethod):
    """PE-LTR (Lin et al., "A Pareto-Efficient Algorithm for Multiple Objective Optimization in
    E-Commerce Recommendation", RecSys 2019).

    With g_k `[P]` the gradient of w_k L_k (w_k the config weight) on the shared entries and
    lower bounds c_k (`bounds`, sum_k c_k <= 1), the weights solve

        min_v ||sum_k v_k g_k||^2   subject to   sum_k v_k = 1,  v_k >= c_k.

    Solved exactly, not as in the paper (which drops v_k >= c_k, solves the equality-constrained
    least squares in closed form and projects the result onto the bounded simplex, a heuristic
    that can miss the optimum): with s = 1 - sum_k c_k and v = c + s a, a in the simplex, and
    since sum_k a_k = 1, sum_k v_k g_k = sum_k a_k h_k for h_k = s g_k + sum_j c_j g_j; a is the
    min-norm point of the hull of the h_k, found by MGDA's solver (`min_norm_weights`) on their
    Gram matrix `[T, T]`. With zero bounds this is MGDA.

    The shared entries get T sum_k v_k g_k (T the tasks with a gradient), as `mgda` does, so
    equal weights give the plain summed gradient's scale (the paper's loss sum_k v_k L_k is T
    times smaller); task-owned entries keep their plain gradient w_k grad L_k. A task whose
    gradient is 0 (no labelled rows in the batch) gets its bound only. The weights returned
    (logged) are T v_k w_k.

    Stateless (the base's step counter only). Under data parallel it acts on each process's
    gradients before the trainer averages them: the mean of the per-process directions.
    """

    class Options(GradientOptions):
        bounds: float | list[float] = Field(0.0, description="lower bound c_k on each task's weight: one value "
                                            "for all tasks or one per task; the bounds sum to at most 1")

        @field_validator("bounds")
        @classmethod
        def _within_unit_interval(cls, bounds: float | list[float]) -> float | list[float]:
            values = bounds if isinstance(bounds, list) else [bounds]
            if any(not 0 <= b <= 1 for b in values):
                raise ValueError(f"bounds must lie in [0, 1], got {bounds}")
            if sum(values) > 1 + 1e-9:
                raise ValueError(f"bounds sum to {sum(values)} > 1")
            return bounds

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        bounds = self.options.bounds
        if isinstance(bounds, list) and len(bounds) != self.num_tasks:
            raise ValueError(f"weighting 'pe_ltr' option bounds: {len(bounds)} values for {self.num_tasks} tasks")
        lower = torch.tensor(bounds if isinstance(bounds, list) else [bounds] * self.num_tasks, dtype=torch.float64)
        if float(lower.sum()) > 1 + 1e-9:
            raise ValueError(f"weighting 'pe_ltr' option bounds: sum {float(lower.sum())} > 1 over {self.num_tasks} tasks")
        self.register_buffer("lower_bounds", lower.float())

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        """The update T sum_k v_k g_k; weights T v_k w_k, its coefficient on each L_k."""
        gram = (grads @ grads.T).detach().double().cpu()
        active = tasks_with_gradient(gram)
        lower = self.lower_bounds.detach().double().cpu()
        weights = lower.clone()
        if bool(active.any()):
            spare = 1.0 - float(lower.sum())  # shared among the tasks with a gradient
            weights[active] = bounded_min_norm_weights(gram[active][:, active], lower[active], spare)
        coefficients = int(active.sum()) * weights.to(grads)
        return Combined(coefficients @ grads, coefficients.detach() * self.base)


def bounded_min_norm_weights(gram: Tensor, lower: Tensor, spare: float | None = None) -> Tensor:
    """v `[T]` minimising v^T gram v = ||sum_k v_k g_k||^2 subject to v_k >= lower_k and
    sum_k v_k = sum_k lower_k + spare (spare = 1 - sum lower by default), from the Gram matrix
    `[T, T]`. v = lower + spare a, a the min-norm weights of h_k = spare g_k + sum_j lower_j g_j."""
    gram = gram.detach().double().cpu()
    lower = lower.detach().double().cpu()
    if spare is None:
        spare = 1.0 - float(lower.sum())
    if spare <= 0:
        return lower.clone()
    bound_part = gram @ lower  # (g_k . u) for u = sum_j lower_j g_j
    shifted = (spare**2 * gram + spare * (bound_part[:, None] + bound_part[None, :])
               + float(lower @ bound_part))  # h_j . h_k
    return lower + spare * min_norm_weights(shifted)
