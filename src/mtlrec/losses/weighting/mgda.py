"""MGDA (Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, TypeAdapter, model_validator
from torch import Tensor

from mtlrec.losses.weighting.base import (
    Combined,
    GradientMethod,
    GradientOptions,
    register_weighting,
)
from mtlrec.train.gradients import SharedParameters


@register_weighting("mgda")
class MGDA(GradientMethod):
    """Multiple gradient descent (Sener & Koltun, "Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS 2018).

    With g_k `[P]` the gradient of w_k L_k (w_k the config weight) on the shared entries,
    alpha = argmin_{alpha in simplex} ||sum_k alpha_k g_k||^2 (solved on the Gram matrix
    `[T, T]`: exactly for 2 tasks, by pairwise Frank-Wolfe for more, see `min_norm_weights`);
    d = sum_k alpha_k g_k is a common descent direction (d . g_k >= ||d||^2 for every k), or 0
    at a Pareto-stationary point. The shared entries get T d, as the authors' and LibMTL's
    code do (alpha * T sums to T), so equal alphas give the plain summed gradient's scale;
    task-owned entries keep their plain gradient w_k grad L_k. The weights returned (logged)
    are T alpha_k w_k, the coefficients of the shared update on each L_k. A task whose gradient
    is 0 (no labelled rows in the batch, which would make d = 0) is left out: alpha_k = 0 and
    T counts the other tasks.

    `normalize` divides g_k by ||g_k|| ("l2"), by w_k L_k ("loss") or by both ("loss+") before
    the min-norm solve only (the authors' code); the update uses the unnormalised g_k.

    MGDA-UB (section 3.3) is `on: representation` (`upper_bound: true` says the same): alpha
    from the gradients on the shared representation Z (the backbone output every task reads)
    instead of the shared parameters, T backward passes through the towers only, then the
    coefficients T alpha_k w_k weight the whole shared update, one more backward pass
    (`GradientMethod`, "weights").

    Stateless (the base's step counter only). Under data parallel it acts on each process's
    gradients before the trainer averages them: the average of per-process MGDA directions.
    """

    class Options(GradientOptions):
        upper_bound: bool = Field(False, description="MGDA-UB (Sener & Koltun 2018, Sec. 3.3): another name for "
                                  "on: representation")
        normalize: Literal["none", "l2", "loss", "loss+"] = Field(
            "none", description="how task gradients are normalised before the min-norm solve (the update "
            "uses them unnormalised)")

        @model_validator(mode="before")
        @classmethod
        def _upper_bound_is_on_representation(cls, values: Any) -> Any:
            if isinstance(values, dict) and TypeAdapter(bool).validate_python(values.get("upper_bound", False)):
                if values.get("on", "representation") != "representation":
                    raise ValueError(f"upper_bound (MGDA-UB) is on: representation; it contradicts on: {values['on']}")
                values = {**values, "on": "representation"}
            return values

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        coefficients = self.coefficients(grads @ grads.T, losses)  # T alpha
        return Combined(coefficients @ grads, coefficients.detach() * self.base)  # T d

    def coefficients(self, gram: Tensor, losses: Tensor) -> Tensor:
        """T alpha `[T]` (T: the tasks with a gradient) from the Gram matrix `[T, T]` of the
        gradients to solve on and the raw losses `[T]`: the shared update is sum_k T alpha_k g_k."""
        gram = gram.detach().double().cpu()
        active = tasks_with_gradient(gram)  # a task without labelled rows has no gradient: left out
        alpha = torch.zeros(self.num_tasks, dtype=torch.float64)
        if bool(active.any()):
            weighted = (self.base * losses).detach().cpu()
            alpha[active] = min_norm_weights(normalized_gram(gram[active][:, active], weighted[active],
                                                             self.options.normalize))
        return int(active.sum()) * alpha.to(losses)


def tasks_with_gradient(gram: Tensor) -> Tensor:
    """bool `[T]`: the tasks whose gradient is not 0, from the Gram matrix `[T, T]`."""
    squared = gram.detach().diagonal().double().cpu()
    return squared > 1e-20 * float(squared.max())


def normalized_gram(gram: Tensor, losses: Tensor, normalize: str = "none") -> Tensor:
    """The Gram matrix `[T, T]` of the task gradients after dividing each g_k by its normaliser:
    ||g_k|| ("l2"), the loss ("loss"), or both ("loss+")."""
    gram = gram.detach().double().cpu()
    if normalize == "none":
        return gram
    norms = gram.diagonal().clamp(min=0).sqrt()
    losses = losses.detach().double().cpu()
    scale = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalize]
    scale = scale.clamp(min=1e-20)
    return gram / scale[:, None] / scale[None, :]


def min_norm_weights(gram: Tensor, max_iter: int = 1000, tol: float = 1e-12) -> Tensor:
    """alpha `[T]` in the simplex minimising alpha^T gram alpha = ||sum_k alpha_k g_k||^2, from the
    Gram matrix `[T, T]` (float64 on the CPU).

    2 tasks: the exact minimiser of the quadratic on the segment, clipped to [0, 1]. More: pairwise
    Frank-Wolfe (move weight from the support vertex with the largest (gram alpha)_k to the vertex
    with the smallest, with an exact line search), which converges linearly on this problem; it
    stops when the Frank-Wolfe gap alpha^T gram alpha - min_k (gram alpha)_k (the optimality
    condition d . g_k >= ||d||^2) is below tol * max_k ||g_k||^2.
    """
    gram = gram.detach().double().cpu()
    t = gram.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    if t == 2:
        # alpha_1 = (g2 - g1) . g2 / ||g1 - g2||^2, clipped: the point of the segment nearest 0
        distance = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
        if distance <= 1e-20 * gram.diagonal().max().clamp(min=1e-30):
            return torch.full((2,), 0.5, dtype=torch.float64)  # equal gradients: any point
        first = ((gram[1, 1] - gram[0, 1]) / distance).clamp(0.0, 1.0)
        return torch.stack([first, 1 - first])
    alpha = torch.full((t,), 1.0 / t, dtype=torch.float64)
    threshold = tol * float(gram.diagonal().max().clamp(min=1e-300))
    for _ in range(max_iter):
        slope = gram @ alpha  # half the gradient of alpha^T gram alpha
        toward = int(slope.argmin())
        if float(alpha @ slope - slope[toward]) <= threshold:
            break
        away = int(torch.where(alpha > 0, slope, torch.full_like(slope, -torch.inf)).argmax())
        curvature = gram[toward, toward] + gram[away, away] - 2 * gram[toward, away]
        step = alpha[away] if curvature <= 0 else ((slope[away] - slope[toward]) / curvature).clamp(max=alpha[away])
        alpha[toward] += step
        alpha[away] -= step
        if alpha[away] < 1e-15:
            alpha[away] = 0.0  # keep the support exact for the next away vertex
    return alpha / alpha.sum()
