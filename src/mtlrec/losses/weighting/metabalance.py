"""MetaBalance (He et al., WWW 2022): auxiliary gradients rescaled toward the target task's magnitude."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from mtlrec.losses.weighting.base import (
    Combined,
    GradientMethod,
    GradientOptions,
    register_weighting,
)
from mtlrec.tasks import TaskSet
from mtlrec.train.gradients import SharedParameters


@register_weighting("metabalance")
class MetaBalance(GradientMethod):
    """MetaBalance (He et al., "MetaBalance: Improving Multi-Task Recommendations via Adapting
    Gradient Magnitudes of Auxiliary Tasks", WWW 2022).

    One task is the target, the others auxiliary. For each shared parameter tensor j (the
    paper's "layer"; only its shared entries, as `SharedParameters` masks them) and each task k,
    with g_kj the gradient of w_k L_k (w_k the config weight) on that tensor:

        m_kj <- beta m_kj + (1 - beta) ||g_kj||              (moving average of the norm, m_kj = 0 at start)
        g_kj <- r (m_tj / m_kj) g_kj + (1 - r) g_kj          (each auxiliary k; t the target)
        update_j = g_tj + sum_{k auxiliary} g_kj

    r (`relax`) = 1 gives every auxiliary gradient the target's (averaged) magnitude, r = 0
    the plain sum. Starting from 0 biases every m_kj by the same factor 1 - beta^steps, which
    cancels in the ratio. A tensor where an auxiliary task's average is 0 leaves it unscaled.
    Task-owned entries keep their plain gradient w_k grad L_k. The weights returned (logged)
    are w_k times each task's scale averaged over the shared tensors (1 for the target).

    With `on: representation` the shared representation Z is the one "layer" (J = 1): each
    auxiliary task's gradient on Z is scaled toward the target's, and the scales weight the
    whole shared update (`GradientMethod`, "weights"; every shared tensor gets the same scale).

    State: the averages m `[T, J]` (J shared tensors) in the buffer `norm_averages`, sized at
    the first step (checkpoints carry it). Under data parallel it acts on each process's
    gradients before the trainer averages them, so each process keeps its own averages of its
    own gradient norms.
    """

    class Options(GradientOptions):
        target: str | int = Field(0, description="the target task, by name or index; the others are auxiliary")
        beta: float = Field(0.9, ge=0, lt=1, description="moving-average factor of the gradient norms")
        relax: float = Field(0.7, ge=0, le=1, description="how far auxiliary magnitudes move to the target's "
                             "(1: equal, 0: unchanged)")

    def __init__(self, tasks: TaskSet, options: Options | None = None):
        super().__init__(tasks, options)
        target = self.options.target
        if isinstance(target, str):
            if target not in tasks.names:
                raise ValueError(f"weighting 'metabalance' option target: no task {target!r}; tasks: {tasks.names}")
            target = tasks.names.index(target)
        elif not 0 <= target < self.num_tasks:
            raise ValueError(f"weighting 'metabalance' option target: index {target} out of range for "
                             f"{self.num_tasks} tasks")
        self.target = target
        self.register_buffer("norm_averages", torch.zeros(self.num_tasks, 0))

    def combine(self, grads: Tensor, losses: Tensor, shared: SharedParameters | None) -> Combined:
        """update_j per shared tensor j (Z, one tensor, for `shared` None); weights w_k times each
        task's mean scale over the tensors."""
        sizes = [grads.shape[1]] if shared is None else [p.numel() for p in shared.params]
        norms = torch.stack([part.norm(dim=1) for part in grads.detach().split(sizes, dim=1)], 1)  # [T, J]
        if self.norm_averages.shape != norms.shape:
            self.norm_averages = torch.zeros_like(norms).to(self.norm_averages)
        beta = self.options.beta
        self.norm_averages.mul_(beta).add_((1 - beta) * norms.to(self.norm_averages))
        scales = self.tensor_scales().to(grads)  # [T, J]
        per_entry = torch.repeat_interleave(scales, torch.tensor(sizes, device=grads.device), dim=1)  # [T, P]
        return Combined((per_entry * grads).sum(0), scales.mean(1).detach() * self.base)

    def tensor_scales(self) -> Tensor:
        """`[T, J]`: r m_target / m_k + 1 - r for auxiliary tasks (1 where m_k = 0), 1 for the target."""
        averages = self.norm_averages
        relax = self.options.relax
        ratio = torch.where(averages > 0, averages[self.target] / averages.clamp(min=1e-300),
                            torch.ones_like(averages))
        scales = relax * ratio + (1 - relax)
        scales[self.target] = 1.0
        return scales

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "norm_averages")
        if saved is not None and saved.shape != self.norm_averages.shape:  # sized at the first step
            self.norm_averages = torch.zeros_like(saved).to(self.norm_averages)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
