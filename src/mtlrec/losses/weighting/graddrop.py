"""Gradient sign dropout, GradDrop (Chen et al., NeurIPS 2020): keep one sign per shared entry."""

from __future__ import annotations

from typing import Annotated

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

Leak = Annotated[float, Field(ge=0.0, le=1.0)]


@register_weighting("graddrop")
class GradDrop(GradientMethod):
    """Gradient sign dropout (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models
    with Gradient Sign Dropout", NeurIPS 2020).

    On each shared entry p, with g_k `[P]` the gradient of task k's config-weighted loss:
        P_p = 1/2 (1 + sum_k g_kp / sum_k |g_kp|)        (the sign purity, in [0, 1])
        M_kp = [U_p < P_p] [g_kp > 0] + [U_p >= P_p] [g_kp < 0],   U_p ~ Uniform[0, 1)
        update_p = sum_k (l_k + (1 - l_k) M_kp) g_kp
    so at each entry either every positive or every negative task gradient survives, the
    positive ones with probability P_p: in expectation update_p = P_p sum_{g_kp > 0} g_kp +
    (1 - P_p) sum_{g_kp < 0} g_kp. Entries where all tasks agree in sign are kept whole. The
    leak l_k (0: the plain method) lets a fraction of task k's gradient through regardless.

    Deviation: the paper applies the mask to the gradients at an activation layer A, with
    g_k = sgn(A) * dL_k/dA summed over the batch, and backpropagates the masked gradient;
    here it is applied to the gradients of the shared parameters themselves (already summed
    over the batch, no sgn(A) factor), the entries a gradient method acts on in this package.
    Task-owned entries keep their plain gradient. With `on: representation` the mask acts on
    the entries of the shared representation Z (each row's units: the paper's activation
    layer, without its sum over the batch and its sgn(A) factor) and the masked sum is
    backpropagated through Z (`GradientMethod`, "direction"); shared parameters reached
    around Z keep the plain weighted sum.

    `backward` returns the config weights (the mask differs per entry, so no per-task weight
    describes the update). No state across steps: U of step t comes from a generator seeded
    from (seed, t) alone (`step_generator`; the step count is a buffer), so no generator state
    needs saving and a resumed run draws what the uninterrupted run would have. Under data parallel it acts on
    each process's gradients before they are averaged; every process draws the same U.
    """

    representation_update = "direction"

    class Options(GradientOptions):
        seed: int = Field(0, ge=0, lt=2**31, description="seeds the uniform draws U that pick the kept sign")
        leak: Leak | list[Leak] = Field(
            0.0, description="l_k in [0, 1]: the fraction of task k's gradient kept whatever its sign; "
                             "one for all tasks, or one each (0: plain GradDrop)")

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        leak = self.options.leak
        leaks = [leak] * self.num_tasks if isinstance(leak, (int, float)) else list(leak)
        if len(leaks) != self.num_tasks:
            raise ValueError(f"graddrop leak has {len(leaks)} values for {self.num_tasks} tasks")
        self.register_buffer("leak", torch.tensor(leaks, dtype=torch.float32))

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        uniform = uniform_draws(self.options.seed, int(self.steps), grads.shape[1], grads.device, grads.dtype)  # U
        return Combined(drop_signs(grads, uniform, self.leak.to(grads.dtype)))  # the config weights are returned


def uniform_draws(seed: int, step: int, size: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """U `[size]` of step `step`: `torch.rand` from `step_generator(seed, step, device)`."""
    return torch.rand(size, generator=step_generator(seed, step, device), device=device, dtype=dtype)


def drop_signs(grads: Tensor, uniform: Tensor, leak: Tensor) -> Tensor:
    """GradDrop on task gradients `[T, P]` with draws U `[P]` and leaks `[T]`: the update `[P]`."""
    purity = 0.5 * (1 + grads.sum(0) / grads.abs().sum(0).clamp(min=torch.finfo(grads.dtype).tiny))
    kept = torch.where(uniform < purity, grads > 0, grads < 0)  # M [T, P]
    factor = leak[:, None] + (1 - leak[:, None]) * kept
    return (factor * grads).sum(0)
