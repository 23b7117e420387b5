"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlrec.losses.weighting.base import Weighting, WeightingOptions, register_weighting
from mtlrec.tasks import TaskSet


@register_weighting("uncertainty")
class Uncertainty(Weighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    With s_k = log sigma_k^2 learned per task:
        L = sum_k c_k exp(-s_k) L_k + s_k / 2,  c_k = 1/2 for regression, 1 for binary
    (and count) tasks.
    For a fixed loss the optimum is s_k = log(L_k) (regression) or log(2 L_k) (binary): a task
    with a larger loss gets a smaller weight, and the log term keeps sigma from growing forever.
    """

    capturable = True

    def __init__(self, tasks: TaskSet, options: WeightingOptions | None = None):
        super().__init__(tasks, options)
        self.log_vars = nn.Parameter(torch.zeros(self.num_tasks))
        self.register_buffer("scale", tasks.uncertainty_scales.clone())  # c_k, the task kind's

    def weights(self, losses: Tensor) -> Tensor:
        return self.scale * torch.exp(-self.log_vars)

    def regularizer(self) -> Tensor:
        return 0.5 * self.log_vars.sum()
