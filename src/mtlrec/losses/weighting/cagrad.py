"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

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
)
from mtlrec.losses.weighting.mgda import tasks_with_gradient
from mtlrec.train.gradients import SharedParameters


@register_weighting("cagrad")
class CAGrad(GradientMethod):
    """Conflict-Averse Gradient Descent (Liu et al., "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021).

    With g_k `[P]` the gradient of w_k L_k (w_k the config weight) on the shared entries and
    g0 = mean_k g_k, CAGrad takes the d that maximises the worst local improvement min_k g_k . d
    within ||d - g0|| <= c ||g0||. Its dual: with phi = c^2 ||g0||^2,
        w = argmin_{w in simplex} g_w . g0 + sqrt(phi) ||g_w||,   g_w = sum_k w_k g_k,
        d = g0 + (sqrt(phi) / ||g_w||) g_w
    (d = g0 if g_w = 0). w is solved on the Gram matrix `[T, T]` (`conflict_averse_weights`):
    exactly for 2 tasks, by projected gradient descent for more. c = 0 gives d = g0.

    The shared entries get T d / (1 + c^2): the authors' code divides by 1 + c^2 (their default
    `rescale=1`) and multiplies by T "to match the sum loss", so c = 0 gives the plain summed
    gradient; `rescale: false` drops the 1 / (1 + c^2). Since d = sum_k (1/T + lambda w_k) g_k,
    the update is a reweighting: the weights returned (logged) are its coefficients on each L_k.
    Task-owned entries keep their plain gradient w_k grad L_k. A task whose gradient is 0 (no
    labelled rows in the batch) is left out of g0, of the simplex and of T.

    Stateless (the base's step counter only). Under data parallel it acts on each process's
    gradients before the trainer averages them: the average of per-process CAGrad directions.
    """

    class Options(GradientOptions):
        c: float = Field(0.4, ge=0, description="radius of the ball around the average gradient, relative to "
                         "its norm (0: the average gradient)")
        rescale: bool = Field(True, description="divide the update by 1 + c^2, as the authors' code does")

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        gram = (grads @ grads.T).detach().double().cpu()
        active = tasks_with_gradient(gram)  # a task without labelled rows has no gradient: left out
        combination = torch.zeros(self.num_tasks, dtype=torch.float64)  # d = combination @ grads
        if bool(active.any()):
            combination[active] = conflict_averse_combination(gram[active][:, active], self.options.c)
        c = self.options.c
        scale = int(active.sum()) / (1 + c * c if self.options.rescale else 1)
        coefficients = (scale * combination).to(grads)
        return Combined(coefficients @ grads, coefficients.detach() * self.base)  # T d / (1 + c^2)


def conflict_averse_weights(gram: Tensor, c: float, max_iter: int = 500, tol: float = 1e-10) -> Tensor:
    """w `[T]` in the simplex minimising F(w) = g_w . g0 + c ||g0|| ||g_w||, from the Gram matrix
    `[T, T]` of the task gradients (float64 on the CPU).

    2 tasks (w = (a, 1 - a), g_w = v + a u with u = g1 - g2, v = g2): F'(a) = 0 solved in
    closed form, clipped to [0, 1] (F is convex). More: projected gradient descent on the simplex
    with a backtracking (Armijo) step, from the uniform w, until the step moves w by < tol.
    """
    gram = gram.detach().double().cpu()
    t = gram.shape[0]
    uniform = torch.full((t,), 1.0 / t, dtype=torch.float64)
    radius = c * math.sqrt(max(float(uniform @ gram @ uniform), 0.0))  # sqrt(phi) = c ||g0||
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    if t == 2:
        return torch.stack(_two_task_minimiser(gram, radius))
    pull = gram @ uniform  # (g_k . g0)_k: F(w) = w . pull + radius sqrt(w^T gram w)

    def objective(w: Tensor) -> float:
        return float(w @ pull + radius * (w @ gram @ w).clamp(min=0).sqrt())

    def slope(w: Tensor) -> Tensor:
        norm = float((w @ gram @ w).clamp(min=0).sqrt())
        return pull + (radius / norm) * (gram @ w) if norm > 1e-150 else pull

    w = uniform.clone()
    value = objective(w)
    step = 1.0 / max(float(gram.diagonal().max()), 1e-300)  # w moves O(1) against slopes of O(||g||^2)
    for _ in range(max_iter):
        direction = slope(w)
        while True:
            candidate = project_to_simplex(w - step * direction)
            moved = candidate - w
            new_value = objective(candidate)
            if new_value <= value + float(direction @ moved) + float(moved @ moved) / (2 * step) or step < 1e-300:
                break
            step /= 2
        w, value = candidate, new_value
        if float(moved.abs().max()) < tol:
            break
        step *= 2  # let the step grow back where the objective is flatter
    return w


def _two_task_minimiser(gram: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """(a, 1 - a): minimiser of f(a) = (v + a u) . g0 + radius ||v + a u|| on [0, 1]."""
    uu = float(gram[0, 0] + gram[1, 1] - 2 * gram[0, 1])  # ||u||^2
    uv = float(gram[0, 1] - gram[1, 1])  # u . v
    vv = float(gram[1, 1])
    ug0 = float(gram[0, 0] - gram[1, 1]) / 2  # u . g0
    if uu <= 1e-20 * max(float(gram.diagonal().max()), 1e-300):
        a = 0.5  # equal gradients: F is constant
    elif radius == 0:
        a = 0.0 if ug0 > 0 else 1.0 if ug0 < 0 else 0.5
    else:
        # f'(a) = u.g0 + radius (uu a + uv) / ||v + a u|| = 0; with s = uu a + uv and the
        # constant D = uu vv - uv^2 >= 0: s / sqrt((s^2 + D) / uu) = r := -u.g0 / radius
        r = -ug0 / radius
        if r * r >= uu:
            a = 1.0 if r > 0 else 0.0  # f' keeps one sign on [0, 1]
        else:
            spread = max(uu * vv - uv * uv, 0.0)
            s = math.copysign(abs(r) * math.sqrt(spread / (uu - r * r)), r)
            a = min(max((s - uv) / uu, 0.0), 1.0)
    first = torch.tensor(a, dtype=torch.float64)
    return first, 1 - first


def conflict_averse_combination(gram: Tensor, c: float) -> Tensor:
    """The coefficients `[T]` with d = sum_k coefficients_k g_k = g0 + (c ||g0|| / ||g_w||) g_w,
    from the Gram matrix `[T, T]` (float64 on the CPU)."""
    gram = gram.detach().double().cpu()
    t = gram.shape[0]
    uniform = torch.full((t,), 1.0 / t, dtype=torch.float64)
    if c == 0:
        return uniform
    w = conflict_averse_weights(gram, c)
    radius = c * math.sqrt(max(float(uniform @ gram @ uniform), 0.0))
    norm_w = float((w @ gram @ w).clamp(min=0).sqrt())
    largest = float(gram.diagonal().max().clamp(min=0).sqrt())
    if norm_w <= 1e-10 * largest:
        return uniform  # g_w = 0: the ball's centre (0 is in the hull of the gradients)
    return uniform + (radius / norm_w) * w


def project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of `[T]` onto {w >= 0, sum w = 1} (sort-based)."""
    ordered, _ = torch.sort(v, descending=True)
    cumulative = ordered.cumsum(0) - 1
    ranks = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    last = int((ordered - cumulative / ranks > 0).nonzero().max())
    return (v - cumulative[last] / (last + 1)).clamp(min=0)
