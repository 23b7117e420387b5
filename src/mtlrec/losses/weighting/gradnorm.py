"""GradNorm (Chen et al., ICML 2018): gradient norms balanced across tasks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlrec.losses.weighting.base import (
    GradientOptions,
    Weighting,
    register_weighting,
    task_gradients,
)
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters


@register_weighting("gradnorm")
class GradNorm(Weighting):
    """GradNorm (Chen et al., ICML 2018): learn w_k so each task trains at a balanced rate.

    G_k = ||grad_W w_k L_k|| over the shared parameters W; r_k = L~_k / mean(L~), L~_k =
    L_k(t) / L_k(0) (each task's inverse training rate); target_k = mean(G) * r_k^alpha.
    w follows the gradient of L_grad = sum_k |G_k - target_k| (targets held constant), and is
    renormalised to sum_k w_k = T after every step. Since G_k = w_k ||grad_W L_k||, the
    gradient of L_grad needs no second-order terms. The model itself trains on sum_k w_k L_k.

    W: all shared parameters; with `on: representation`, the G_k are the norms of the gradients
    on the model's shared representation Z instead (the paper takes W to be the last shared
    layer's weights for speed; Z is the output of the last shared layer).
    """

    needs_task_gradients = True

    class Options(GradientOptions):
        alpha: float = Field(1.5, description="asymmetry (>= 0): how strongly slow tasks are pulled up")

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        alpha = self.options.alpha
        if alpha < 0:
            raise ValueError(f"gradnorm alpha must be >= 0, not {alpha}")
        self.alpha = alpha
        self.task_weights = nn.Parameter(torch.ones(self.num_tasks))
        self.register_buffer("initial", torch.full((self.num_tasks,), float("nan")))

    def weights(self, losses: Tensor) -> Tensor:
        return self.task_weights.detach()

    def backward(self, losses: Tensor, shared: SharedParameters | Sequence[nn.Parameter], extra: Tensor | None = None,
                 representation: Tensor | None = None) -> Tensor:
        if torch.isnan(self.initial).any():
            self.initial.copy_(losses.detach())
        norms = task_gradients(self, losses, SharedParameters.of(shared), representation).norm(dim=1)
        w = self.task_weights.detach()
        g = w * norms
        ratio = losses.detach() / self.initial.clamp(min=1e-12)
        target = g.mean() * (ratio / ratio.mean()) ** self.alpha
        weights = super().backward(losses, shared, extra)
        self.task_weights.grad = torch.sign(g - target) * norms
        return weights

    @torch.no_grad()
    def after_step(self) -> None:
        w = self.task_weights.clamp_(min=1e-6)
        w.mul_(self.num_tasks / w.sum())
