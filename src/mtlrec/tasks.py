"""Task kinds, and the task set a schema builds: everything that depends on what a label means.

A `TaskKind` says, for one kind of label, how its tower's logit is scored and reported:
the loss on the logit, the link from logit to prediction, the metrics (with their
direction, the first one primary), which labels are valid, the constant baseline and the
uncertainty-weighting constant. Adding a kind is one class with `@register_kind` here; the
config, encoder, trainer, weighting, bench and ranking read it through `TaskSet`. A kind
may take options (its `Options` class), given per task as `Task.options`; each task then
holds its own kind instance, and tasks of one kind with different options are scored apart.

| kind       | label        | loss on the logit z                           | prediction | metrics (primary first) |
|------------|--------------|-----------------------------------------------|------------|-------------------------|
| binary     | 0 or 1       | log loss of sigmoid(z)                        | sigmoid(z) | auc, logloss            |
| regression | finite real  | squared error (z - y)^2                       | z          | mse, mae                |
| count      | finite, >= 0 | Poisson: exp(z) - y z                         | exp(z)     | poisson_deviance, mae   |
| focal      | 0 or 1       | -alpha_t (1 - p_t)^gamma log p_t, p = sig(z)  | sigmoid(z) | auc, logloss            |
| tweedie    | finite, >= 0 | -y e^((1-p) z)/(1-p) + e^((2-p) z)/(2-p)      | exp(z)     | tweedie_deviance, mae   |
| lognormal  | finite, > 0  | (z - log y)^2                                 | exp(z)     | mse_log, mae            |

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
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from mtlrec.train.metrics import (
    auc,
    expected_calibration_error,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    mean_squared_error_of_logs,
    poisson_deviance,
    tweedie_deviance,
)

if TYPE_CHECKING:
    from mtlrec.schema import Schema


@dataclass(frozen=True)
class Metric:
    """A metric of one task over a split: `compute(labels [N], predictions [N]) -> float`, and
    `compute(labels, predictions, weights [N])` for weighted metrics (`Schema.weighted_metrics`)."""

    name: str
    compute: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool


class KindOptions(BaseModel):
    """A kind's options, given per task as `Task.options`: none here; a kind with options
    subclasses this as its `Options` with typed, constrained fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskKind:
    """What one kind of label means. Subclasses set the class attributes and `loss`.

    An instance carries its options (`self.options`, an `Options`); two instances are equal
    when they are of one class with equal options, so `TaskSet` scores them together.
    """

    name: ClassVar[str]
    metrics: tuple[Metric, ...]  # the first is the primary; a class attribute, or a property reading the options
    label_rule: ClassVar[str]  # what a valid label is, for error messages
    probability: ClassVar[bool] = False  # predictions are probabilities of a 0/1 label
    uncertainty_scale: ClassVar[float] = 1.0  # c_k of uncertainty weighting (Kendall et al. 2018)
    Options: ClassVar[type[KindOptions]] = KindOptions

    def __init__(self, options: KindOptions | None = None):
        self.options = self.Options() if options is None else options

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options == self.options

    def __hash__(self) -> int:
        return hash((type(self), self.options))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-element loss, same shape as `logits`; finite for every real logit and label."""
        raise NotImplementedError

    def link(self, logits: Tensor) -> Tensor:
        """Logits -> predictions, elementwise."""
        return logits

    def invalid_labels(self, values: np.ndarray) -> np.ndarray:
        """Bool mask of the label values this kind refuses (NaN means missing and is never passed)."""
        return ~np.isfinite(values)

    def baseline_values(self, labels: Tensor) -> Tensor:
        """What the constant baseline averages over the training labels (elementwise): the
        labels themselves, or e.g. their logarithm for a kind fitted on the log scale."""
        return labels

    def baseline_logit(self, mean: Tensor) -> Tensor:
        """The logit of the constant predictor, from the training mean of `baseline_values`
        (what a model must beat)."""
        return mean


KINDS: dict[str, TaskKind] = {}


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: make a kind available to configs as `type: <cls.name>`."""
    KINDS[cls.name] = cls()
    return cls


def kind_of(name: str) -> TaskKind:
    """The registered kind with its default options (`Task.kind` carries a task's own)."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task type {name!r}; allowed: {list(KINDS)}") from None


@register_kind
class Binary(TaskKind):
    name = "binary"
    metrics = (Metric("auc", auc, True), Metric("logloss", log_loss, False),
               Metric("ece", expected_calibration_error, False))
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
    """Squared error. With `bounds: [lo, hi]` (a known range, e.g. ratings 1..5) the prediction
    is lo + (hi - lo) sigmoid(z), so it never leaves the range, and the loss is the squared
    error of that prediction; labels outside the range are refused.

    Example:
        >>> kind = Regression(Regression.Options(bounds=(1.0, 5.0)))
        >>> kind.link(torch.tensor([-50.0, 0.0, 50.0])).tolist()
        [1.0, 3.0, 5.0]
        >>> kind.link(kind.baseline_logit(torch.tensor(4.0))).item()
        4.0
    """

    name = "regression"
    metrics = (Metric("mse", mean_squared_error, False), Metric("mae", mean_absolute_error, False))
    uncertainty_scale = 0.5

    class Options(KindOptions):
        bounds: tuple[float, float] | None = Field(
            None, description="[lo, hi]: predictions lo + (hi - lo) sigmoid(z), inside the range")

        @field_validator("bounds")
        @classmethod
        def _ordered(cls, bounds: tuple[float, float] | None) -> tuple[float, float] | None:
            if bounds is not None and not (math.isfinite(bounds[0]) and math.isfinite(bounds[1])
                                           and bounds[0] < bounds[1]):
                raise ValueError(f"bounds must be finite with lo < hi, got {list(bounds)}")
            return bounds

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return (self.link(logits) - labels).square()

    def link(self, logits: Tensor) -> Tensor:
        if self.options.bounds is None:
            return logits
        lo, hi = self.options.bounds
        return lo + (hi - lo) * torch.sigmoid(logits)

    def invalid_labels(self, values: np.ndarray) -> np.ndarray:
        if self.options.bounds is None:
            return ~np.isfinite(values)
        lo, hi = self.options.bounds
        return ~np.isfinite(values) | (values < lo) | (values > hi)

    @property
    def label_rule(self) -> str:  # type: ignore[override]
        return "finite" if self.options.bounds is None else f"finite and in {list(self.options.bounds)}"

    def baseline_logit(self, mean: Tensor) -> Tensor:
        if self.options.bounds is None:
            return mean
        lo, hi = self.options.bounds
        p = ((mean - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)
        return torch.log(p / (1 - p))


class LogLink(TaskKind):
    """Non-negative targets predicted as exp(z) (a log link); the constant baseline is log(mean)."""

    label_rule = "finite and >= 0"

    def link(self, logits: Tensor) -> Tensor:
        return torch.exp(logits)

    def invalid_labels(self, values: np.ndarray) -> np.ndarray:
        return ~np.isfinite(values) | (values < 0)

    def baseline_logit(self, mean: Tensor) -> Tensor:
        return torch.log(mean.clamp(min=1e-6))


@register_kind
class Count(LogLink):
    """Counts and other non-negative targets with a log link: the Poisson negative
    log-likelihood without its constant, exp(z) - y z, minimised where exp(z) = y."""

    name = "count"
    metrics = (Metric("poisson_deviance", poisson_deviance, False), Metric("mae", mean_absolute_error, False))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return torch.exp(logits) - labels * logits


@register_kind
class Focal(Binary):
    """0/1 labels scored by the focal loss (Lin et al., ICCV 2017, Eq. 5):
        FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t),  p = sigmoid(z),
    p_t = p and alpha_t = alpha for a positive, 1 - p and 1 - alpha for a negative; by
    default gamma = 2 and alpha = 0.25, the paper's. With s = 2y - 1 it is computed from the
    logit as -alpha_t exp(gamma logsigmoid(-s z)) logsigmoid(s z), finite with a finite
    gradient for every logit. gamma = 0 and alpha = None is the log loss.
    Predictions are sigmoid(z), reported like binary's (auc, logloss); the loss down-weights
    easy rows, so they are less calibrated than binary's."""

    name = "focal"

    class Options(KindOptions):
        gamma: float = Field(2.0, ge=0, description="focusing parameter: how much easy rows are down-weighted")
        alpha: float | None = Field(0.25, ge=0, le=1, description="weight of positives (negatives: 1 - alpha); "
                                                                  "None weighs both 1")

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        sign = 2 * labels - 1  # +1 for a positive, -1 for a negative
        loss = -torch.exp(self.options.gamma * F.logsigmoid(-sign * logits)) * F.logsigmoid(sign * logits)
        alpha = self.options.alpha
        return loss if alpha is None else (alpha * labels + (1 - alpha) * (1 - labels)) * loss


@register_kind
class Tweedie(LogLink):
    """Non-negative targets with many zeros and a long tail (spend, watch time incl. none) on a
    log link, mu = exp(z): the Tweedie negative log-likelihood without its terms in y alone,
        -y mu^(1-p) / (1-p) + mu^(2-p) / (2-p),  1 < p < 2,
    which is half the unit deviance (Jorgensen 1987) less y^(2-p) / ((1-p)(2-p)); minimised
    where mu = y. As in Yang, Qian & Zou (J. Bus. Econ. Stat. 2018) and XGBoost/LightGBM's
    `tweedie`. Like count's exp(z), it overflows float32 only for |z| > 88 / min(p - 1, 2 - p).
    The metric `tweedie_deviance` uses the task's power."""

    name = "tweedie"

    class Options(KindOptions):
        power: float = Field(1.5, gt=1, lt=2, description="variance power p: Var(y) = phi mu^p")

    @property
    def metrics(self) -> tuple[Metric, ...]:
        deviance = partial(tweedie_deviance, power=self.options.power)
        return Metric("tweedie_deviance", deviance, False), Metric("mae", mean_absolute_error, False)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        p = self.options.power
        return -labels * torch.exp((1 - p) * logits) / (1 - p) + torch.exp((2 - p) * logits) / (2 - p)


@register_kind
class LogNormal(LogLink):
    """Positive targets whose logarithm is roughly normal (watch time, price): squared error on
    the log scale, (z - log y)^2, so z estimates the mean of log y. The prediction is exp(z),
    the median of y under a log-normal (the mean, exp(z + sigma^2 / 2), would need sigma, which
    is not learned) and the point that minimises the absolute error. Metrics: `mse_log`, the
    squared error on the log scale (the loss), and `mae` on the original scale."""

    name = "lognormal"
    metrics = (Metric("mse_log", mean_squared_error_of_logs, False), Metric("mae", mean_absolute_error, False))
    label_rule = "finite and > 0"
    uncertainty_scale = 0.5  # a Gaussian likelihood, of log y

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        # rows outside the task's space (label 0) and other kinds' columns read log 1 = 0: finite
        return (logits - torch.where(labels > 0, labels, 1.0).log()).square()

    def invalid_labels(self, values: np.ndarray) -> np.ndarray:
        return ~np.isfinite(values) | (values <= 0)

    def baseline_values(self, labels: Tensor) -> Tensor:
        return torch.where(labels > 0, labels, 1.0).log()  # the best constant logit is the mean of log y

    def baseline_logit(self, mean: Tensor) -> Tensor:
        return mean


def higher_is_better(metric: str) -> bool:
    """Direction of a metric named like `auc/click` or `loss`."""
    kind = metric.split("/", 1)[0]
    directions = {"loss": False} | {m.name: m.higher_is_better for k in KINDS.values() for m in k.metrics}
    if kind not in directions:
        raise ValueError(f"unknown metric {metric!r}; metrics are {sorted(directions)} (+ '/task')")
    return directions[kind]


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends. Near 0 it uses
    1 - e^x = -2t / (1 - t), t = tanh(x / 2), exact and free of cancellation (and, unlike
    expm1, exportable to ONNX)."""
    t = torch.tanh(x / 2)
    return torch.where(x > -0.6931, torch.log(-2 * t) - torch.log1p(-t), torch.log1p(-torch.exp(x)))


def product_logit(logit_a: Tensor, logit_b: Tensor) -> Tensor:
    """The logit of sigmoid(a) * sigmoid(b), computed in log space (ESMM's pCTCVR, and a task
    `within` another)."""
    log_p = (F.logsigmoid(logit_a) + F.logsigmoid(logit_b)).clamp(max=-1e-7)
    return log_p - log1mexp(log_p)


class TaskSet(nn.Module):
    """The schema's tasks, built once: their kinds, config weights, losses, predictions and metrics.

    Tensors index tasks in schema order (`[B, T]`). Holds no parameters; its buffers
    (weights `[T]`, one column mask `[T]` per kind present, tasks of one kind with different
    options counting as different kinds) follow `.to(device)`, and are moved to the inputs'
    device where they are not there yet.
    """

    def __init__(self, schema: Schema):
        super().__init__()
        self.names = [t.name for t in schema.tasks]
        self.kinds = [t.kind for t in schema.tasks]
        self.weighted = schema.weighted  # rows carry sample weights
        self.weighted_metrics = schema.weighted_metrics
        self.register_buffer("weights", torch.tensor([t.weight for t in schema.tasks], dtype=torch.float32),
                             persistent=False)
        self.register_buffer("uncertainty_scales", torch.tensor([k.uncertainty_scale for k in self.kinds]),
                             persistent=False)
        # each kind present (equal kinds: one class, equal options), with the columns of that kind
        self.present = list(dict.fromkeys(self.kinds))
        for i, kind in enumerate(self.present):
            self.register_buffer(f"columns_{i}", torch.tensor([k == kind for k in self.kinds]), persistent=False)
        # nested events (`Task.within`): (task, its parent), parents first
        self.nested = [(self.names.index(t.name), self.names.index(t.within)) for t in schema.nested_order()]

    def constrain(self, logits: Tensor) -> Tensor:
        """Logits `[B, T]` with each nested task's replaced by the logit of
        sigmoid(parent's) * sigmoid(its own): P(task) = P(parent) * P(task | parent) <= P(parent),
        whatever the model outputs (the product parameterisation of ESMM). The identity when no
        task is `within` another."""
        if not self.nested:
            return logits
        columns = list(logits.unbind(-1))
        for child, parent in self.nested:
            columns[child] = product_logit(columns[parent], columns[child])
        return torch.stack(columns, dim=-1)

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
        logits = self.constrain(logits)
        per_row = self._by_kind(logits, lambda kind, z: kind.loss(z, labels)) * mask
        if weights is None:
            return per_row.sum(0) / mask.sum(0).clamp(min=1)
        weights = weights * mask
        total = weights.sum(0)
        return torch.where(total > 0, (per_row * weights).sum(0) / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)

    def predict(self, logits: Tensor) -> Tensor:
        """`[B, T]` logits -> what each task reports: a probability (binary), a value, a rate."""
        return self._by_kind(self.constrain(logits), lambda kind, z: kind.link(z))

    def baseline_logits(self, labels: Tensor, mask: Tensor) -> Tensor:
        """`[T]` logits of each task's constant predictor, from the training labels and mask
        `[N, T]`: the logit of the mean of its kind's `baseline_values` over the task's space."""
        values = torch.where(mask, self._by_kind(labels, lambda kind, y: kind.baseline_values(y)), 0.0)
        mean = values.sum(0) / mask.sum(0).clamp(min=1)
        logits = self._by_kind(mean, lambda kind, m: kind.baseline_logit(m))
        for child, parent in self.nested:  # the constant of P(task | parent): predicted through `constrain`
            ratio = (mean[child] / mean[parent].clamp(min=1e-6)).clamp(1e-6, 1 - 1e-6)
            logits[child] = torch.log(ratio / (1 - ratio))
        return logits

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


__all__ = ["KINDS", "KindOptions", "Metric", "TaskKind", "TaskSet", "higher_is_better", "kind_of", "register_kind"]
