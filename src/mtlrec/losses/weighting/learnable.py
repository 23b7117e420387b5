"""Learned task weights under a softmax, kept from collapsing by an entropy term."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlrec.losses.weighting.base import Weighting, WeightingOptions, register_weighting
from mtlrec.tasks import TaskSet


@register_weighting("learnable")
class Learnable(Weighting):
    """Weights as learned parameters: w = T softmax(theta), L = sum_k w_k L_k + lambda sum_k p_k log p_k.

    Free weights would collapse: minimising sum_k w_k L_k drives every w_k to 0. Two things
    stop that: the softmax keeps sum_k w_k = T (no weight can vanish without another growing),
    and the entropy term (strength `entropy` = lambda) keeps the weight from all moving to the
    task with the smallest loss. For fixed losses the optimum is p_k ∝ exp(-T L_k / lambda):
    a soft minimum over the losses, uniform as lambda grows.
    """

    class Options(WeightingOptions):
        entropy: float = Field(1.0, description="lambda, the strength of the entropy term (> 0)")

    capturable = True

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        entropy = self.options.entropy
        if entropy <= 0:
            raise ValueError("learnable weighting needs entropy > 0, else the weights collapse onto one task")
        self.entropy = entropy
        self.logits = nn.Parameter(torch.zeros(self.num_tasks))

    def weights(self, losses: Tensor) -> Tensor:
        return self.num_tasks * torch.softmax(self.logits, dim=0)

    def regularizer(self) -> Tensor:
        log_p = torch.log_softmax(self.logits, dim=0)
        return self.entropy * (log_p.exp() * log_p).sum()
