"""Learning-rate schedules: linear warm-up, cosine, step decay and reduce-on-plateau, per optimizer.

Each torch optimizer (one per `train.optimizers` group, or one for the whole model) follows
its group's `schedule`, else `train.schedule`. Steps are counted by batch position: the
batch `b` (1-based) of epoch `e` is step s = (e - 1) x B + b - 1 (0-based), B the batches per
epoch, so a resumed run computes the same rates as an uninterrupted one. Before step s the
optimizer's learning rate is set to

    lr(s) = base lr x warmup(s) x decay(s) x plateau

- warmup(s) = min(1, (s + 1) / W) with W = warmup_steps (1 without warm-up): linear
  warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD"); it combines with any decay.
- cosine: decay(s) = m + (1 - m) (1 + cos(pi p)) / 2, p = (s - W) / (S - W) clipped to
  [0, 1]: the cosine starts after the warm-up and reaches m = min_ratio at the end of the
  run, S = train.epochs x B steps (SGDR, Loshchilov & Hutter, ICLR 2017, without restarts;
  torch's CosineAnnealingLR with T_max = S - W). A run stopped early ends above m.
- step: decay = gamma ^ floor((e - 1) / every_epochs): a cut at the start of every
  `every_epochs`-th epoch.
- constant, plateau: decay = 1.
- plateau: a factor stepped once per epoch, after validation, on train.early_stopping.metric
  (direction from `mtlrec.tasks.higher_is_better`; 'combined' is higher-is-better). After
  `patience` epochs without an improvement larger than min_delta it is multiplied by gamma,
  never below min_ratio (torch's ReduceLROnPlateau with patience - 1, threshold_mode 'abs',
  no cooldown). It needs validation data.

Every factor but the plateau's is a function of the step; the plateau's state is saved in
checkpoints (`LearningRates.state_dict`). A resume that changes train.epochs under a cosine
schedule (whose length it sets) is refused.

TorchRec's fused tables (train.embedding_tables: fused, embedding_sharding) update inside
fbgemm with their own constant learning rate: no schedule reaches them, and the config refuses
one that would (see `TrainConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mtlrec.config import Schedule, TrainConfig
from mtlrec.tasks import higher_is_better


@dataclass(frozen=True)
class GroupSchedule:
    """The schedule of one torch optimizer: its name in the epoch log (`lr/<name>`: the
    `train.optimizers` group's params, or 'all' for the single optimizer), base lr and schedule."""

    name: str
    lr: float
    schedule: Schedule


def group_schedules(config: TrainConfig) -> list[GroupSchedule]:
    """One `GroupSchedule` per optimizer that `mtlrec.train.optimizers.build_optimizers` makes
    from `config`, in its order (a group's schedule, else `config.schedule`).

    Example:
        >>> from mtlrec.config import TrainConfig
        >>> config = TrainConfig(schedule="cosine", optimizers=[
        ...     {"params": "embedding", "lr": 0.1, "schedule": "constant"}, {"params": "rest"}])
        >>> [(g.name, g.lr, g.schedule.name) for g in group_schedules(config)]
        [('embedding', 0.1, 'constant'), ('rest', 0.001, 'cosine')]
    """
    if not config.optimizers:
        return [GroupSchedule("all", config.scaled_lr(config.lr), config.schedule)]
    return [GroupSchedule(g.params, config.scaled_lr(g.lr), g.schedule or config.schedule) for g in config.optimizers]


def step_factor(schedule: Schedule, step: int, epoch: int, total_steps: int) -> float:
    """warmup(s) x decay(s) of the module docstring: the multiple of the base lr at 0-based
    step `step`, in 1-based `epoch`, of a run of `total_steps` steps (the plateau factor aside).

    Example:
        >>> from mtlrec.config import Schedule
        >>> cosine = Schedule(name="cosine", warmup_steps=2)
        >>> [round(step_factor(cosine, s, 1, total_steps=6), 3) for s in range(6)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
        >>> halving = Schedule(name="step", every_epochs=2, gamma=0.5)
        >>> [step_factor(halving, 0, e, total_steps=10) for e in (1, 2, 3, 5)]
        [1.0, 1.0, 0.5, 0.25]
    """
    warm = schedule.warmup_steps
    factor = min(1.0, (step + 1) / warm) if warm else 1.0
    if schedule.name == "cosine":
        progress = min(1.0, max(0.0, (step - warm) / (total_steps - warm)))
        m = schedule.min_ratio
        factor *= m + (1 - m) * (1 + math.cos(math.pi * progress)) / 2
    elif schedule.name == "step":
        factor *= schedule.gamma ** ((epoch - 1) // schedule.every_epochs)
    return factor


@dataclass
class Plateau:
    """Reduce-on-plateau for one optimizer: `factor` is cut by `schedule.gamma` (not below
    `schedule.min_ratio`) after `schedule.patience` epochs without an improvement of the
    score by more than `schedule.min_delta`. `sign` is +1 where higher scores are better, -1
    where lower are. A NaN score never counts as an improvement.

    Example:
        >>> from mtlrec.config import Schedule
        >>> plateau = Plateau(Schedule(name="plateau", patience=2, gamma=0.5), sign=-1.0)
        >>> for loss in (0.9, 0.8, 0.85, 0.81, 0.7, 0.75, 0.72):
        ...     plateau.observe(loss)
        >>> plateau.factor, plateau.best, plateau.waited
        (0.25, 0.7, 0)
    """

    schedule: Schedule
    sign: float
    factor: float = 1.0
    best: float | None = None
    waited: int = 0  # epochs since the last improvement or cut

    def observe(self, score: float) -> None:
        if self.best is None or (not math.isnan(score) and self.sign * (score - self.best) > self.schedule.min_delta):
            self.best, self.waited = score, 0
            return
        self.waited += 1
        if self.waited >= self.schedule.patience:
            self.factor = max(self.factor * self.schedule.gamma, self.schedule.min_ratio)
            self.waited = 0

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "best": self.best, "waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factor, self.best, self.waited = state["factor"], state["best"], state["waited"]


class LearningRates:
    """Sets each optimizer's learning rate before every step (`set`) and steps the plateau
    factors after every validation (`observe`).

    `optimizers[i]` follows `groups[i]`; `batches_per_epoch` x `epochs` is the run's length S;
    `metric` is the validation metric a plateau watches (train.early_stopping.metric);
    `validated`: whether the run has validation data (a plateau schedule needs it).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], groups: list[GroupSchedule],
                 batches_per_epoch: int, epochs: int, metric: str, validated: bool):
        if len(optimizers) != len(groups):
            raise ValueError(f"{len(groups)} learning-rate schedules for {len(optimizers)} optimizers")
        self.optimizers, self.groups = optimizers, groups
        self.batches_per_epoch = batches_per_epoch
        self.total_steps = batches_per_epoch * epochs
        self.metric = metric
        for g in groups:
            where = f"the schedule of group {g.name!r}" if g.name != "all" else "train.schedule"
            if g.schedule.warmup_steps and g.schedule.warmup_steps >= self.total_steps:
                raise ValueError(f"{where}: warmup_steps {g.schedule.warmup_steps} must be fewer than the run's "
                                 f"{self.total_steps} steps (train.epochs x {batches_per_epoch} batches per epoch)")
            if g.schedule.name == "plateau" and not validated:
                raise ValueError(f"{where}: 'plateau' steps on the validation metric {metric!r}: training needs "
                                 "validation data")
        sign = 1.0 if higher_is_better(metric) else -1.0
        self.plateaus = [Plateau(g.schedule, sign) if g.schedule.name == "plateau" else None for g in groups]

    def set(self, epoch: int, batch: int) -> None:
        """Set every optimizer's lr for batch `batch` (1-based) of epoch `epoch` (1-based)."""
        step = (epoch - 1) * self.batches_per_epoch + batch - 1
        for optimizer, group, plateau in zip(self.optimizers, self.groups, self.plateaus):
            lr = group.lr * step_factor(group.schedule, step, epoch, self.total_steps)
            if plateau is not None:
                lr *= plateau.factor
            for param_group in optimizer.param_groups:
                if isinstance(param_group["lr"], torch.Tensor):  # a recorded CUDA graph reads it where it lies
                    param_group["lr"].fill_(lr)
                else:
                    param_group["lr"] = lr

    def observe(self, row: dict[str, float]) -> None:
        """Step the plateau factors on an epoch row's `valid/<metric>`."""
        for plateau in self.plateaus:
            if plateau is not None:
                plateau.observe(row[f"valid/{self.metric}"])

    def row(self) -> dict[str, float]:
        """`lr/<group>` -> the learning rate each optimizer last stepped with."""
        return {f"lr/{g.name}": float(opt.param_groups[0]["lr"]) for g, opt in zip(self.groups, self.optimizers)}

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps,
                "plateaus": [p.state_dict() if p is not None else None for p in self.plateaus]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cosine = [g.name for g in self.groups if g.schedule.name == "cosine"]
        if cosine and state["total_steps"] != self.total_steps:
            raise ValueError(f"cannot resume: the cosine schedule spans the run's {self.total_steps} steps "
                             f"(train.epochs x {self.batches_per_epoch} batches), the checkpoint's "
                             f"{state['total_steps']}: restore train.epochs")
        for plateau, saved in zip(self.plateaus, state["plateaus"]):
            if plateau is not None:
                plateau.load_state_dict(saved)


__all__ = ["GroupSchedule", "LearningRates", "Plateau", "group_schedules", "step_factor"]
