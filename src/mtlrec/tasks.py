"""Task kinds, and the task set a schema builds: everything that depends on what a label means.

A `TaskKind` says, for one kind of label, how its tower's logit is scored and reported:
the loss on the logit, the link from logit to prediction, the metrics (with their
direction, the first one primary), which labels are valid, the constant baseline and the
uncertainty-weighting constant. Adding a kind is one class with `@register_kind` here; the
config, encoder, trainer, weighting, bench and ranking read it through `TaskSet`.

| kind       | label        | loss on the logit z         | prediction | metrics (primary first) |
|------------|--------------|-----------------------------|------------|-------------------------|
| binary     | 0 or 1       | log loss of sigmoid(z)      | sigmoid(z) | auc, logloss            |
| regression | finite real  | squared error (z - y)^2     | z          | mse, mae                |
| count      | finite, >= 0 | Poisson: exp(z) - y z       | exp(z)     | poisson_deviance, mae   |

Example:
    >>> import torch
    >>> from mtlrec.schema import Schema, DenseFeature, Task
    >>> schema = Schema(dense=[DenseFeature(name="x")],
    ...                 tasks=[Task(name="click"), Task(name="watch", type="regression")])
    >>> tasks = TaskSet(schema)
    >>> tasks.primary_metrics
    ['auc/click', 'mse/watch']
    >>> tasks.predict(torch.tensor([[0.0, 2.5]]))
    tensor([[0.5000, 2.5000]])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrec.train.metrics import auc, log_loss, mean_absolute_error, mean_squared_error, poisson_deviance

if TYPE_CHECKING:
    from mtlrec.schema import Schema


@dataclass(frozen=True)
class Metric:
    """A metric of one task over a split: `compute(labels [N], predictions [N]) -> float`, and
    `compute(labels, predictions, weights [N])` for weighted metrics (`Schema.weighted_metrics`)."""

    name: str
    compute: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool


class TaskKind:
    """What one kind of label means. Subclasses set the class attributes and `loss`."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]  # the first is the primary metric
    label_rule: ClassVar[str]  # what a valid label is, for error messages
    probability: ClassVar[bool] = False  # predictions are probabilities of a 0/1 label
    uncertainty_scale: ClassVar[float] = 1.0  # c_k of uncertainty weighting (Kendall et al. 2018)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-element loss, same shape as `logits`; finite for every real logit and label."""
        raise NotImplementedError

    def link(self, logits: Tensor) -> Tensor:
        """Logits -> predictions, elementwise."""
        return logits

    def invalid_labels(self, values: np.ndarray) -> np.ndarray:
        """Bool mask of the label values this kind refuses (NaN means missing and is never passed)."""
        return ~np.isfinite(values)

    def baseline_logit(self, mean: Tensor) -> Tensor:
        """The logit that predicts the training mean for every row (what a model must beat)."""
        return mean


KINDS: dict[str, TaskKind] = {}


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: make a kind available to configs as `type: <cls.name>`."""
    KINDS[cls.name] = cls()
    return cls


def kind_of(name: str) -> TaskKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task type {name!r}; allowed: {list(KINDS)}") from None


@register_kind
class Binary(TaskKind):
    name = "binary"
    metrics = (Metric("auc", auc, True), Metric("logloss", log_loss, False))
    label_rule = "0 or 1"
    probability = True

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")

    def link(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def invalid_labels(self, values: np.ndarray) -> np.ndarray:
        return (values != 0) & (values != 1)

    def baseline_logit(self, mean: Tensor) -> Tensor:
        p = mean.clamp(1e-6, 1 - 1e-6)
        return torch.log(p / (1 - p))


@register_kind
class Regression(TaskKind):
    name = "regression"
    metrics = (Metric("mse", mean_squared_error, False), Metric("mae", mean_absolute_error, False))
    label_rule = "finite"
    uncertainty_scale = 0.5

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return (logits - labels).square()


@register_kind
class Count(TaskKind):
    """Counts and other non-negative targets with a log link: the Poisson negative
    log-likelihood without its constant, exp(z) - y z, minimised where exp(z) = y."""

    name = "count"
    metrics = (Metric("poisson_deviance", poisson_deviance, False), Metric("mae", mean_absolute_error, False))
    label_rule = "finite and >= 0"

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return torch.exp(logits) - labels * logits

    def link(self, logits: Tensor) -> Tensor:
        return torch.exp(logits)

    def invalid_labels(self, values: np.ndarray) -> np.ndarray:
        return ~np.isfinite(values) | (values < 0)

    def baseline_logit(self, mean: Tensor) -> Tensor:
        return torch.log(mean.clamp(min=1e-6))


def higher_is_better(metric: str) -> bool:
    """Direction of a metric named like `auc/click` or `loss`."""
    kind = metric.split("/", 1)[0]
    directions = {"loss": False} | {m.name: m.higher_is_better for k in KINDS.values() for m in k.metrics}
    if kind not in directions:
        raise ValueError(f"unknown metric {metric!r}; metrics are {sorted(directions)} (+ '/task')")
    return directions[kind]


class TaskSet(nn.Module):
    """The schema's tasks, built once: their kinds, config weights, losses, predictions and metrics.

    Tensors index tasks in schema order (`[B, T]`). Holds no parameters; its buffers
    (weights `[T]`, one column mask `[T]` per kind present) follow `.to(device)`, and are
    moved to the inputs' device where they are not there yet.
    """

    def __init__(self, schema: Schema):
        super().__init__()
        self.names = [t.name for t in schema.tasks]
        self.kinds = [kind_of(t.type) for t in schema.tasks]
        self.weighted = schema.weighted  # rows carry sample weights
        self.weighted_metrics = schema.weighted_metrics
        self.register_buffer("weights", torch.tensor([t.weight for t in schema.tasks], dtype=torch.float32),
                             persistent=False)
        self.register_buffer("uncertainty_scales", torch.tensor([k.uncertainty_scale for k in self.kinds]),
                             persistent=False)
        # each kind present, with the columns that are of that kind
        self.present = [kind for kind in KINDS.values() if kind in self.kinds]
        for i, kind in enumerate(self.present):
            self.register_buffer(f"columns_{i}", torch.tensor([k is kind for k in self.kinds]), persistent=False)

    def __len__(self) -> int:
        return len(self.names)

    def _columns(self) -> list[tuple[TaskKind, Tensor]]:
        return [(kind, getattr(self, f"columns_{i}")) for i, kind in enumerate(self.present)]

    def _by_kind(self, values: Tensor, fn: Callable[[TaskKind, Tensor], Tensor]) -> Tensor:
        """`fn(kind, values)` in the columns of each kind, `[..., T]`. A kind sees 0 in the
        other kinds' columns, so its function stays finite (and its gradient zero) there."""
        if len(self.present) == 1:
            return fn(self.present[0], values)
        out = None
        for kind, mine in self._columns():
            mine = mine.to(values.device)
            part = fn(kind, torch.where(mine, values, 0.0))
            out = part if out is None else torch.where(mine, part, out)
        return out

    def losses(self, logits: Tensor, labels: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
        """Each task's loss over its own sample space (PLE paper, Eq. 9), `[T]`.

        L_k = sum_i m_ik l_k(logit_ik, y_ik) / sum_i m_ik, l_k the loss of task k's kind. With
        sample weights w `[B, T]`, the weighted mean sum_i w_ik m_ik l_ik / sum_i w_ik m_ik.
        A task with no labelled row (or only weight 0) in the batch has loss 0 (no gradient).
        logits, labels `[B, T]` float; mask `[B, T]` bool.
        """
        labels = labels.masked_fill(~mask, 0.0)
        per_row = self._by_kind(logits, lambda kind, z: kind.loss(z, labels)) * mask
        if weights is None:
            return per_row.sum(0) / mask.sum(0).clamp(min=1)
        weights = weights * mask
        total = weights.sum(0)
        return torch.where(total > 0, (per_row * weights).sum(0) / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)

    def predict(self, logits: Tensor) -> Tensor:
        """`[B, T]` logits -> what each task reports: a probability (binary), a value, a rate."""
        return self._by_kind(logits, lambda kind, z: kind.link(z))

    def baseline_logits(self, mean: Tensor) -> Tensor:
        """`[T]` training label means -> `[T]` logits of the constant predictor."""
        return self._by_kind(mean, lambda kind, m: kind.baseline_logit(m))

    def metrics(self, predictions: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                weights: np.ndarray | None = None) -> dict[str, float]:
        """`{"auc/click": ..., "logloss/click": ..., "mse/watch": ..., ...}` over the rows in each
        task's sample space; predictions, labels, mask (and sample weights, for weighted
        metrics) `[N, T]`. NaN for a task without rows."""
        out: dict[str, float] = {}
        for k, (name, kind) in enumerate(zip(self.names, self.kinds)):
            keep = mask[:, k].astype(bool)
            y, p = labels[keep, k].astype(np.float64), predictions[keep, k].astype(np.float64)
            w = () if weights is None else (weights[keep, k].astype(np.float64),)
            for metric in kind.metrics:
                out[f"{metric.name}/{name}"] = metric.compute(y, p, *w) if y.size else math.nan
        return out

    @property
    def primary_metrics(self) -> list[str]:
        """Each task's headline metric, e.g. `["auc/click", "mse/watch"]`."""
        return [f"{kind.metrics[0].name}/{name}" for name, kind in zip(self.names, self.kinds)]

    @property
    def metric_names(self) -> list[str]:
        """Every metric of every task, primary metrics first."""
        rest = [f"{m.name}/{name}" for name, kind in zip(self.names, self.kinds) for m in kind.metrics[1:]]
        return self.primary_metrics + rest

    @property
    def validation_keys(self) -> list[str]:
        """What early stopping may watch: the weighted loss, each task's loss, each metric."""
        return ["loss"] + [f"loss/{n}" for n in self.names] + [
            f"{m.name}/{name}" for name, kind in zip(self.names, self.kinds) for m in kind.metrics]


__all__ = ["KINDS", "Metric", "TaskKind", "TaskSet", "higher_is_better", "kind_of", "register_kind"]
