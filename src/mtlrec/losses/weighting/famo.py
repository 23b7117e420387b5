"""Fast Adaptive Multitask Optimization, FAMO (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlrec.losses.weighting.base import Weighting, WeightingOptions, register_weighting
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters

EPS = 1e-8  # in log(L_k + eps) and 1 / (L_k + eps), as the authors' code
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the authors use


@register_weighting("famo")
class FAMO(Weighting):
    """Fast Adaptive Multitask Optimization (Liu, Liu, Ye, Zhang & Stone, "FAMO: Fast Adaptive
    Multitask Optimization", NeurIPS 2023).

    Task logits xi `[T]`, z = softmax(xi). The model trains on
        L = sum_k c_k C z_k log L_k,   C = (sum_k z_k / L_k)^(-1)  (held constant),
    c_k the config weights (1 by default), so its update is sum_k w_k grad L_k with
    w_k = c_k C z_k / L_k, a convex combination of the task gradients for c = 1 (`backward`
    returns w). The logits then follow the change in the log losses over the step,
        delta_k = log L_k(t) - log L_k(t+1),   grad_xi = J_z^T delta = z * (delta - z . delta),
    regularised by gamma xi: `logit_optimizer: sgd` is the paper's Algorithm 1,
    xi <- xi - lr (grad_xi + gamma xi); `adam` (default) takes an Adam step on grad_xi + gamma xi
    (torch.optim.Adam's weight decay), as the paper's Algorithm 2, the authors' code and LibMTL do.
    A task whose log loss falls slower than the others' gains weight.

    One-step delay: the trainer gives no losses after the optimizer step (`after_step()` takes
    none), so L(t+1) is the next call's losses, on the next batch, and xi is updated at the start
    of that `backward`, before its weights are taken. The authors' code instead re-evaluates the
    same batch after the step (one extra forward pass); here delta also carries the difference
    between two batches, noise that Adam's normalisation and the small lr average out. Losses
    must be positive (lower bound 0; the authors' optional `min_losses` is not offered).

    State (buffers): `logits` xi, `previous_losses` L(t) (NaN before the first step), and Adam's
    `logit_moment`, `logit_second_moment`, `logit_updates`. Under data parallel each process
    updates xi from its own losses before the gradients are averaged, so the processes' logits
    can drift apart (each weights its own shard; the averaged gradient mixes them).
    """

    class Options(WeightingOptions):
        lr: float = Field(0.025, gt=0, description="learning rate of the task logits xi")
        gamma: float = Field(1e-3, ge=0, description="weight decay of the task logits (pulls the "
                             "weights back towards equal)")
        logit_optimizer: Literal["adam", "sgd"] = Field(
            "adam", description="how xi steps: adam (the authors' code) or sgd (the paper's Algorithm 1)")

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        t = self.num_tasks
        self.register_buffer("logits", torch.zeros(t))
        self.register_buffer("previous_losses", torch.full((t,), float("nan")))
        self.register_buffer("logit_moment", torch.zeros(t))
        self.register_buffer("logit_second_moment", torch.zeros(t))
        self.register_buffer("logit_updates", torch.zeros((), dtype=torch.long))
        self._has_previous = False  # mirrors ~isnan(previous_losses), without a device sync per step
        self.register_load_state_dict_post_hook(_read_has_previous)

    def task_probabilities(self) -> Tensor:
        """z = softmax(xi) `[T]`."""
        return torch.softmax(self.logits, dim=0)

    def weights(self, losses: Tensor) -> Tensor:
        """w_k = c_k C z_k / L_k `[T]` (no gradient): the weight on grad L_k in the model's update."""
        inverse = self.task_probabilities() / (losses.detach() + EPS)
        return self.base * inverse / inverse.sum()

    def backward(self, losses: Tensor, shared: SharedParameters | Sequence[nn.Parameter],
                 extra: Tensor | None = None, representation: Tensor | None = None) -> Tensor:
        log_losses = torch.log(losses + EPS)
        if self._has_previous:
            self.update_logits(torch.log(self.previous_losses + EPS) - log_losses.detach())
        z = self.task_probabilities()
        c = 1.0 / (z / (losses.detach() + EPS)).sum()
        total = (self.base * c * z * log_losses).sum()
        if extra is not None:
            total = total + extra
        total.backward()
        self.steps += 1
        self.previous_losses.copy_(losses.detach())
        self._has_previous = True
        return self.weights(losses)

    @torch.no_grad()
    def update_logits(self, delta: Tensor) -> None:
        """One step of xi from the decrease in log losses delta `[T]`."""
        z, delta = self.task_probabilities(), delta.to(self.logits)
        grad = z * (delta - (z * delta).sum()) + self.options.gamma * self.logits  # J_z^T delta + gamma xi
        lr = self.options.lr
        if self.options.logit_optimizer == "sgd":
            self.logits.sub_(lr * grad)
            return
        beta1, beta2 = ADAM_BETAS
        self.logit_updates += 1
        self.logit_moment.lerp_(grad, 1 - beta1)
        self.logit_second_moment.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        n = self.logit_updates.to(grad.dtype)
        moment = self.logit_moment / (1 - beta1**n)
        second_moment = self.logit_second_moment / (1 - beta2**n)
        self.logits.sub_(lr * moment / (second_moment.sqrt() + ADAM_EPS))


def _read_has_previous(module: FAMO, incompatible_keys) -> None:
    module._has_previous = not bool(torch.isnan(module.previous_losses).any())
