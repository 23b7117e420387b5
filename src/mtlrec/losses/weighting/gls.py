"""Geometric Loss Strategy, GLS (Chennupati et al., CVPR Workshops 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlrec.losses.weighting.base import Weighting, register_weighting
from mtlrec.train.gradients import SharedParameters

EPS = 1e-8  # keeps log L_k finite for a loss of exactly 0


@register_weighting("gls")
class GLS(Weighting):
    """Geometric Loss Strategy (Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation
    and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019).

    The model trains on the geometric mean of the task losses `[T]`:
        L = (prod_k L_k)^(1/T) = exp(mean_k log L_k)
    computed in log space (a product of many small losses would underflow). With config weights
    c_k it is the weighted geometric mean L = exp(sum_k c_k log L_k / sum_k c_k) (the plain one
    for c = 1): a constant factor on a loss only rescales L, so config weights enter as exponents.
    Its gradient is sum_k w_k grad L_k with the implied weights
        w_k = dL/dL_k = c_k L / (C L_k),  C = sum_k c_k   (= L / (T L_k) for c = 1),
    which `backward` returns: a task with a smaller loss gets a larger weight, and rescaling one
    loss by s scales the whole gradient by s^(c_k / C) without turning it.

    Stateless (the base's step counter only); under data parallel it acts on each process's
    losses before the gradients are averaged.
    """

    def geometric_mean(self, losses: Tensor) -> Tensor:
        """The scalarised loss, a scalar, from the task losses `[T]`."""
        return torch.exp((self.base * torch.log(losses + EPS)).sum() / self.base.sum())

    def weights(self, losses: Tensor) -> Tensor:
        """The implied weights dL/dL_k `[T]` (no gradient)."""
        losses = losses.detach()
        return self.base * self.geometric_mean(losses) / (self.base.sum() * (losses + EPS))

    def backward(self, losses: Tensor, shared: SharedParameters | Sequence[nn.Parameter],
                 extra: Tensor | None = None, representation: Tensor | None = None) -> Tensor:
        total = self.geometric_mean(losses)
        if extra is not None:
            total = total + extra
        total.backward()
        self.steps += 1
        return self.weights(losses)
