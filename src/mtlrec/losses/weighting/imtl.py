"""Impartial multi-task learning, IMTL (Liu et al., ICLR 2021): IMTL-L, IMTL-G and both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlrec.losses.weighting.base import (
    Combined,
    GradientMethod,
    GradientOptions,
    Weighting,
    register_weighting,
)
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters


@register_weighting("imtl")
class IMTL(GradientMethod):
    """Impartial multi-task learning (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021).

    IMTL-L (`mode: loss`), loss balance: each task learns a scale s_k and trains on
        w_k (e^{s_k} L_k - s_k)            (w_k: the task's config weight)
    whose optimum for a fixed L_k is e^{s_k} L_k = 1: every scaled loss is pulled to the same
    value, so the update no longer depends on the scale of each raw loss. That optimum needs
    L_k > 0 (for L_k <= 0, s_k grows without bound): a non-positive loss is an error naming the
    task (a count task's Poisson loss exp(z) - y z can be negative; use `mode: gradient`).

    IMTL-G (`mode: gradient`), gradient balance on the shared entries: g_k `[P]` is the
    gradient of task k's (config-weighted, in `both` also scaled) loss, u_k = g_k / ||g_k||, and
    with the first task as the reference (the paper's indexing)
        D = [g_1 - g_2; ...; g_1 - g_T]    `[T-1, P]`
        U = [u_1 - u_2; ...; u_1 - u_T]    `[T-1, P]`
        alpha_{2..T} = g_1 U^T (D U^T)^{-1},    alpha_1 = 1 - sum_{k>=2} alpha_k
    and the shared update is g = sum_k alpha_k g_k: g . u_k is the same for every task (g
    projects equally onto each task's direction) and sum_k alpha_k = 1. Only the Gram matrix
    K = G G^T `[T, T]` is needed: with Q_ab = g_a . u_b = K_ab / ||g_b||, (D U^T)_ij =
    Q_11 - Q_1j - Q_i1 + Q_ij and (g_1 U^T)_j = Q_11 - Q_1j; it is formed in float64. A
    singular D U^T (tasks sharing a direction) is solved with the pseudo-inverse; a task with
    no gradient on the shared entries gets alpha 0 and the others are balanced among
    themselves. Config weights only rescale g: its direction ignores each g_k's length.

    `mode: both` (the paper's IMTL): the scaled losses of IMTL-L, and IMTL-G on their gradients.
    Task-owned entries keep the plain gradient of the (scaled) weighted loss.

    The paper takes g_k with respect to the shared representation (the encoder's output), for
    speed: that is `on: representation` (`GradientMethod`, "weights": alpha_k c_k found on Z
    weight the whole shared update); the default `on: parameters` takes them on the shared
    parameters, as PCGrad does. IMTL-L alone reads no gradient: `mode: loss` with
    `on: representation` is an error.

    `backward` returns the weights of the shared update, alpha_k * c_k (c_k = w_k, or
    w_k e^{s_k} with IMTL-L); with `mode: loss`, c_k. State across steps: only IMTL-L's s, a
    parameter (checkpoints and the optimizer carry it; data parallel averages its gradient).
    Under data parallel, IMTL-G acts on each process's own gradients before they are averaged.
    """

    class Options(GradientOptions):
        mode: Literal["gradient", "loss", "both"] = Field(
            "both", description="gradient: IMTL-G; loss: IMTL-L; both: IMTL (IMTL-L's losses, IMTL-G's update)")

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        self.balance_losses = self.options.mode in ("loss", "both")
        self.balance_gradients = self.options.mode in ("gradient", "both")
        self.task_names = list(tasks.names)
        if not self.balance_gradients and self.options.on == "representation":
            raise ValueError("weighting 'imtl' option on: representation has no effect with mode 'loss' (IMTL-L reads "
                             "no gradient); use mode 'gradient' or 'both', or leave on at 'parameters'")
        if self.balance_losses:
            self.log_scales = nn.Parameter(torch.zeros(self.num_tasks))  # s_k

    def weights(self, losses: Tensor) -> Tensor:
        return self.base * torch.exp(self.log_scales) if self.balance_losses else self.base

    def regularizer(self) -> Tensor | float:
        return -(self.base * self.log_scales).sum() if self.balance_losses else 0.0

    def backward(self, losses: Tensor, shared: SharedParameters | Sequence[nn.Parameter],
                 extra: Tensor | None = None, representation: Tensor | None = None) -> Tensor:
        if self.balance_losses and bool((losses.detach() <= 0).any()):
            k = int(torch.argmax((losses.detach() <= 0).int()))
            raise ValueError(f"imtl loss balancing (mode {self.options.mode!r}) needs positive losses, but task "
                             f"{self.task_names[k]!r} has loss {float(losses[k]):.4g}; use mode 'gradient'")
        if not self.balance_gradients:  # IMTL-L alone: the scaled losses' plain sum
            return Weighting.backward(self, losses, shared, extra)
        return super().backward(losses, shared, extra, representation)

    def task_losses(self, losses: Tensor) -> Tensor:
        """c_k L_k: the config-weighted losses, also scaled by e^{s_k} with IMTL-L."""
        return self.weights(losses).detach() * losses

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        alpha = impartial_weights(grads)
        return Combined(alpha @ grads, alpha * self.weights(losses).detach())  # weights alpha_k c_k


def impartial_weights(grads: Tensor) -> Tensor:
    """IMTL-G's alpha `[T]` (summing to 1) for task gradients `[T, P]`: sum_k alpha_k g_k
    projects equally onto every g_k / ||g_k|| (tasks with a zero gradient get 0)."""
    t = grads.shape[0]
    gram = grads.double() @ grads.double().T  # K [T, T]
    norms = gram.diagonal().clamp(min=0).sqrt()
    active = torch.nonzero(norms > 0).flatten()
    alpha = torch.zeros(t, dtype=torch.float64, device=grads.device)
    if len(active) == 0:
        return alpha.fill_(1.0 / t).to(grads.dtype)
    if len(active) == 1:
        return alpha.index_fill_(0, active, 1.0).to(grads.dtype)
    k, n = gram[active][:, active], norms[active]
    q = k / n[None, :]  # q[a, b] = g_a . u_b
    du = q[0, 0] - q[0:1, 1:] - q[1:, 0:1] + q[1:, 1:]  # D U^T  [T'-1, T'-1]
    g1u = q[0, 0] - q[0, 1:]  # g_1 U^T  [T'-1]
    rest = g1u @ torch.linalg.pinv(du, atol=1e-12 * float(n.max()))
    alpha[active] = torch.cat([(1 - rest.sum()).reshape(1), rest])
    return alpha.to(grads.dtype)
