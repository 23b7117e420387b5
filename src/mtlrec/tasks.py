"""Task kinds, and the task set a schema builds: everything that depends on what a label means.

A `TaskKind` says, for one kind of label, how its tower's logit is scored and reported:
the loss on the logit, the link from logit to prediction, the metrics (with their
direction, the first one primary), which labels are valid, the constant baseline and the
uncertainty-weighting constant. Adding a kind is one class with `@register_kind` here; the
config, encoder, trainer, weighting, bench and ranking read it through `TaskSet`. A kind
may take options (its `Options` class), given per task as `Task.options`; each task then
holds its own kind instance, and tasks of one kind with different options are scored apart.

A kind's `width` is the number of logits its tower ends in: 1 for every kind but
multiclass, whose tower gives one logit per class. Model logits and predictions are
`[B, L]`, L the sum of the tasks' widths, task k's columns the slice `TaskSet.slices[k]`
(L = T when every task has width 1); labels, masks and losses stay `[B, T]` / `[T]`, a
multiclass label being its class index.

| kind       | label        | loss on the logit z                           | prediction | metrics (primary first)      |
|------------|--------------|-----------------------------------------------|------------|------------------------------|
| binary     | 0 or 1       | log loss of sigmoid(z)                        | sigmoid(z) | auc, logloss                 |
| regression | finite real  | squared error (z - y)^2                       | z          | mse, mae                     |
| count      | finite, >= 0 | Poisson: exp(z) - y z                         | exp(z)     | poisson_deviance, mae        |
| focal      | 0 or 1       | -alpha_t (1 - p_t)^gamma log p_t, p = sig(z)  | sigmoid(z) | auc, logloss                 |
| tweedie    | finite, >= 0 | -y e^((1-p) z)/(1-p) + e^((2-p) z)/(2-p)      | exp(z)     | tweedie_deviance, mae        |
| lognormal  | finite, > 0  | (z - log y)^2                                 | exp(z)     | mse_log, mae                 |
| multiclass | 0..C-1       | -log softmax(z)_y, z the C logits             | softmax(z) | macro_auc, accuracy, logloss |

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
from itertools import accumulate
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import (BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator,
                      model_validator)
from torch import Tensor, nn

from mtlrec.train.metrics import (
    accuracy,
    auc,
    expected_calibration_error,
    log_loss,
    macro_auc,
    mean_absolute_error,
    mean_squared_error,
    mean_squared_error_of_logs,
    multiclass_log_loss,
    poisson_deviance,
    tweedie_deviance,
)

if TYPE_CHECKING:
    from mtlrec.schema import Schema


@dataclass(frozen=True)
class Metric:
    """A metric of one task over a split: `compute(labels [N], predictions [N]) -> float`, and
    `compute(labels, predictions, weights [N])` for weighted metrics (`Schema.weighted_metrics`).
    A kind of width w > 1 gets its predictions as `[N, w]`."""

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
    width: int = 1  # logits of the task's tower: a class attribute, or a property reading the options
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
        """Per-element loss, same shape as `logits`; finite for every real logit and label.
        (Width w > 1: logits `[B, w]`, labels `[B]`, loss `[B]`.)"""
        raise NotImplementedError

    def link(self, logits: Tensor) -> Tensor:
        """Logits -> predictions, elementwise (width w > 1: `[B, w]` -> `[B, w]`)."""
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

    def output_names(self, task: str) -> list[str]:
        """The names of the task's prediction columns (`predict`, `prediction_table`): its own
        name, or one per logit for a kind of width w > 1."""
        return [task]

    def rank_value(self, predictions: np.ndarray) -> np.ndarray:
        """What the fused ranking score reads as the task's p_k, from its predictions `[N, width]`: `[N]`."""
        return predictions[:, 0]

    def rank_label(self, labels: np.ndarray) -> np.ndarray:
        """The label's counterpart of `rank_value`, for the NDCG relevance: labels `[N]` (NaN:
        missing, kept) -> `[N]`."""
        return labels


KINDS: dict[str, TaskKind] = {}


def register_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: make a kind available to configs as `type: <cls.name>`. The registry
    holds it with its default options; a kind with a required option (multiclass's `classes`)
    is held with its options unset, for its class attributes (name, metrics, Options)."""
    try:
        options = cls.Options()
    except ValidationError:
        options = cls.Options.model_construct()
    KINDS[cls.name] = cls(options)
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


RESERVED_CLASS_NAMES = ("label", "in_space")  # `prediction_table` suffixes beside a task's prediction columns


@register_kind
class Multiclass(TaskKind):
    """One of C classes (a rating 0..4, the action taken): labels are class indices 0..C-1
    (a float column holding whole numbers is fine; map text with the task's `values`). The
    task's tower ends in C logits z; the loss is the cross-entropy of their softmax,
    -log softmax(z)_y, and the prediction is the C probabilities softmax(z). The constant
    baseline's logits are the log class frequencies of the training labels (its prediction:
    the frequencies). Uncertainty weighting takes c = 1 (a categorical likelihood, as binary's).

    Metrics: `macro_auc` (primary), the one-vs-rest AUC of each class averaged over the
    classes present; `accuracy`, the share of rows whose most probable class is the label;
    `logloss`, the mean -log P(label). Macro AUC leads, as AUC does for binary tasks: it
    measures how well each class's probability orders the rows (what ranking by a class
    reads), it does not reward predicting the majority class (a constant predictor scores 0.5
    on any class mix, while its accuracy is the majority's share), and it moves smoothly
    with the model, where accuracy changes only when an argmax flips.

    Ranking: the fused score reads as the task's p_k the probability of one class
    (`rank_class`), or by default the expected class value sum_c P(c) v_c, v_c from
    `class_values` (default: the class index c). The NDCG relevance reads the label the same
    way: [y = rank_class], or v_y.

    Example:
        >>> kind = Multiclass(Multiclass.Options(classes=3, class_values=[1.0, 2.0, 5.0]))
        >>> kind.width, kind.output_names("rating")
        (3, ['rating:0', 'rating:1', 'rating:2'])
        >>> p = kind.link(torch.tensor([[0.0, 0.0, 0.0]]))
        >>> p
        tensor([[0.3333, 0.3333, 0.3333]])
        >>> kind.rank_value(p.double().numpy()).round(6)  # (1 + 2 + 5) / 3
        array([2.666667])
        >>> kind.loss(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([2.0]))  # log 3
        tensor([1.0986])
    """

    name = "multiclass"
    metrics = (Metric("macro_auc", macro_auc, True), Metric("accuracy", accuracy, True),
               Metric("logloss", multiclass_log_loss, False))

    class Options(KindOptions):
        classes: int = Field(ge=2, description="C, the number of classes; labels are 0..C-1")
        names: list[str] | None = Field(
            None, description="a name per class, for the prediction columns (TASK:NAME); default: 0..C-1")
        rank_class: StrictInt | StrictStr | None = Field(
            None, description="the class (index or name) whose probability the fused ranking score reads; "
                              "none: the expected class value")
        class_values: list[float] | None = Field(
            None, description="v_c per class for the expected value sum_c P(c) v_c the fused score reads; "
                              "default: the class index")

        @model_validator(mode="after")
        def _check(self) -> Multiclass.Options:
            c = self.classes
            if self.names is not None:
                if len(self.names) != c:
                    raise ValueError(f"names gives {len(self.names)} names for {c} classes")
                bad = sorted({n for n in self.names if self.names.count(n) > 1 or not n or n in RESERVED_CLASS_NAMES})
                if bad:
                    raise ValueError(f"names must be distinct, non-empty and not {list(RESERVED_CLASS_NAMES)}; "
                                     f"got {bad}")
            if self.class_values is not None:
                if len(self.class_values) != c or not all(math.isfinite(v) for v in self.class_values):
                    raise ValueError(f"class_values needs {c} finite values, one per class")
                if self.rank_class is not None:
                    raise ValueError("class_values are read for the expected value, rank_class picks one class "
                                     "instead: give one of them")
            if isinstance(self.rank_class, str) and self.rank_class not in (self.names or []):
                raise ValueError(f"rank_class {self.rank_class!r} is not a class name; names: {self.names} "
                                 "(a class index is a number)")
            if isinstance(self.rank_class, int) and not 0 <= self.rank_class < c:
                raise ValueError(f"rank_class {self.rank_class} is not a class index 0..{c - 1}")
            return self

    @property
    def width(self) -> int:  # type: ignore[override]
        return self.options.classes

    @property
    def label_rule(self) -> str:  # type: ignore[override]
        return f"a class index, a whole number in 0..{self.options.classes - 1}"

    @property
    def class_names(self) -> list[str]:
        return self.options.names or [str(c) for c in range(self.options.classes)]

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels.long(), reduction="none")

    def link(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1)

    def invalid_labels(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return ~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values >= self.options.classes)

    def baseline_values(self, labels: Tensor) -> Tensor:
        """Labels `[n]` -> one-hot `[n, C]`: their mean is the class frequencies."""
        return F.one_hot(labels.long(), self.options.classes).to(torch.float32)

    def baseline_logit(self, mean: Tensor) -> Tensor:
        return torch.log(mean.clamp(min=1e-6))

    def output_names(self, task: str) -> list[str]:
        return [f"{task}:{name}" for name in self.class_names]

    def _class_index(self) -> int | None:
        chosen = self.options.rank_class
        return self.class_names.index(chosen) if isinstance(chosen, str) else chosen

    def _class_values(self) -> np.ndarray:
        values = self.options.class_values
        return np.arange(self.options.classes, dtype=np.float64) if values is None else np.array(values)

    def rank_value(self, predictions: np.ndarray) -> np.ndarray:
        chosen = self._class_index()
        return predictions[:, chosen] if chosen is not None else predictions @ self._class_values()

    def rank_label(self, labels: np.ndarray) -> np.ndarray:
        missing = np.isnan(labels)
        index = np.where(missing, 0, labels).astype(np.int64)
        chosen = self._class_index()
        value = (index == chosen).astype(np.float64) if chosen is not None else self._class_values()[index]
        return np.where(missing, np.nan, value)


def higher_is_better(metric: str) -> bool:
    """Direction of a metric named like `auc/click` or `loss`."""
    kind = metric.split("/", 1)[0]
    if kind in ("gauc", "combined") or kind.startswith("ndcg@"):  # ranking metrics; early stopping's combined
        return True
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

    Labels, masks and per-row losses index tasks in schema order (`[B, T]`); logits and
    predictions are `[B, L]`, task k's columns `slices[k]` (one column for every kind but
    multiclass; L = T when every task has one). Holds no parameters; its buffers (weights
    `[T]`, one column mask per kind present among the one-column tasks, tasks of one kind
    with different options counting as different kinds) follow `.to(device)`, and are moved
    to the inputs' device where they are not there yet.

    The one-column ("narrow") tasks are scored together, kind by kind, on their columns; each
    task of several columns ("wide": multiclass) on its own slice. With no wide task the
    narrow columns are all the columns, and nothing is gathered or reassembled.
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
        # the logit columns of each task: task k's are slices[k], L of them in all
        self.widths = [k.width for k in self.kinds]
        ends = list(accumulate(self.widths))
        self.slices = [slice(end - width, end) for end, width in zip(ends, self.widths)]
        self.num_logits = ends[-1]
        self.output_names = [n for name, kind in zip(self.names, self.kinds) for n in kind.output_names(name)]
        self.narrow = [k for k, width in enumerate(self.widths) if width == 1]
        self.wide = [k for k, width in enumerate(self.widths) if width > 1]
        self.register_buffer("narrow_tasks", torch.tensor(self.narrow, dtype=torch.long), persistent=False)
        self.register_buffer("narrow_logits", torch.tensor([self.slices[k].start for k in self.narrow],
                                                           dtype=torch.long), persistent=False)
        # each kind present among the narrow tasks (equal kinds: one class, equal options), with
        # the narrow columns of that kind
        narrow_kinds = [self.kinds[k] for k in self.narrow]
        self.present = list(dict.fromkeys(narrow_kinds))
        for i, kind in enumerate(self.present):
            self.register_buffer(f"columns_{i}", torch.tensor([k == kind for k in narrow_kinds]), persistent=False)
        # nested events (`Task.within`): (task, its parent), parents first; both narrow (probabilities)
        self.nested = [(self.names.index(t.name), self.names.index(t.within)) for t in schema.nested_order()]

    def constrain(self, logits: Tensor) -> Tensor:
        """Logits `[B, L]` with each nested task's replaced by the logit of
        sigmoid(parent's) * sigmoid(its own): P(task) = P(parent) * P(task | parent) <= P(parent),
        whatever the model outputs (the product parameterisation of ESMM). The identity when no
        task is `within` another."""
        if not self.nested:
            return logits
        columns = list(logits.unbind(-1))
        for child, parent in self.nested:
            child, parent = self.slices[child].start, self.slices[parent].start
            columns[child] = product_logit(columns[parent], columns[child])
        return torch.stack(columns, dim=-1)

    def __len__(self) -> int:
        return len(self.names)

    def _columns(self) -> list[tuple[TaskKind, Tensor]]:
        return [(kind, getattr(self, f"columns_{i}")) for i, kind in enumerate(self.present)]

    def _by_kind(self, values: Tensor, fn: Callable[[TaskKind, Tensor], Tensor]) -> Tensor | None:
        """`fn(kind, values)` in the columns of each kind, `[..., T_narrow]` (None without narrow
        tasks). A kind sees 0 in the other kinds' columns, so its function stays finite (and its
        gradient zero) there."""
        if len(self.present) <= 1:
            return fn(self.present[0], values) if self.present else None
        out = None
        for kind, mine in self._columns():
            mine = mine.to(values.device)
            part = fn(kind, torch.where(mine, values, 0.0))
            out = part if out is None else torch.where(mine, part, out)
        return out

    def _narrow_tasks(self, values: Tensor) -> Tensor:
        """`[..., T]` -> the narrow tasks' columns `[..., T_narrow]` (itself without wide tasks)."""
        return values.index_select(-1, self.narrow_tasks.to(values.device)) if self.wide else values

    def _narrow_logits(self, logits: Tensor) -> Tensor:
        """`[..., L]` -> the narrow tasks' logit columns `[..., T_narrow]` (itself without wide tasks)."""
        return logits.index_select(-1, self.narrow_logits.to(logits.device)) if self.wide else logits

    def _per_task(self, narrow: Tensor | None, wide: list[Tensor]) -> Tensor:
        """The narrow tasks' values `[..., T_narrow]` and each wide task's `[...]` -> `[..., T]`."""
        if not self.wide:
            return narrow
        columns = dict(zip(self.narrow, narrow.unbind(-1))) if narrow is not None else {}
        columns |= dict(zip(self.wide, wide))
        return torch.stack([columns[k] for k in range(len(self))], dim=-1)

    def _per_logit(self, narrow: Tensor | None, wide: list[Tensor]) -> Tensor:
        """The narrow tasks' values `[..., T_narrow]` and each wide task's `[..., width]` -> `[..., L]`."""
        if not self.wide:
            return narrow
        pieces = {k: narrow[..., i : i + 1] for i, k in enumerate(self.narrow)} | dict(zip(self.wide, wide))
        return torch.cat([pieces[k] for k in range(len(self))], dim=-1)

    def losses(self, logits: Tensor, labels: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
        """Each task's loss over its own sample space (PLE paper, Eq. 9), `[T]`.

        L_k = sum_i m_ik l_k(logits_ik, y_ik) / sum_i m_ik, l_k the loss of task k's kind. With
        sample weights w `[B, T]`, the weighted mean sum_i w_ik m_ik l_ik / sum_i w_ik m_ik.
        A task with no labelled row (or only weight 0) in the batch has loss 0 (no gradient).
        logits `[B, L]`, labels `[B, T]` float (a multiclass label: its class index); mask `[B, T]` bool.
        """
        labels = labels.masked_fill(~mask, 0.0)
        logits = self.constrain(logits)
        narrow_labels = self._narrow_tasks(labels)
        narrow = self._by_kind(self._narrow_logits(logits), lambda kind, z: kind.loss(z, narrow_labels))
        wide = [self.kinds[k].loss(logits[..., self.slices[k]], labels[..., k]) for k in self.wide]
        per_row = self._per_task(narrow, wide) * mask
        if weights is None:
            return per_row.sum(0) / mask.sum(0).clamp(min=1)
        weights = weights * mask
        total = weights.sum(0)
        return torch.where(total > 0, (per_row * weights).sum(0) / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)

    def predict(self, logits: Tensor) -> Tensor:
        """`[B, L]` logits -> what each task reports, `[B, L]`: a probability (binary), a value,
        a rate, a multiclass task's class probabilities in its columns."""
        logits = self.constrain(logits)
        narrow = self._by_kind(self._narrow_logits(logits), lambda kind, z: kind.link(z))
        return self._per_logit(narrow, [self.kinds[k].link(logits[..., self.slices[k]]) for k in self.wide])

    def baseline_logits(self, labels: Tensor, mask: Tensor) -> Tensor:
        """`[L]` logits of each task's constant predictor, from the training labels and mask
        `[N, T]`: the logit of the mean of its kind's `baseline_values` over the task's space."""
        wide = []
        for k in self.wide:
            kind, rows = self.kinds[k], mask[:, k]
            frequencies = kind.baseline_values(labels[rows, k]).sum(0) / rows.sum().clamp(min=1)
            wide.append(kind.baseline_logit(frequencies))
        narrow = mean = None
        if self.narrow:
            labels, mask = self._narrow_tasks(labels), self._narrow_tasks(mask)
            values = torch.where(mask, self._by_kind(labels, lambda kind, y: kind.baseline_values(y)), 0.0)
            mean = values.sum(0) / mask.sum(0).clamp(min=1)
            narrow = self._by_kind(mean, lambda kind, m: kind.baseline_logit(m))
        logits = self._per_logit(narrow, wide)
        for child, parent in self.nested:  # the constant of P(task | parent): predicted through `constrain`
            c, p = self.narrow.index(child), self.narrow.index(parent)
            ratio = (mean[c] / mean[p].clamp(min=1e-6)).clamp(1e-6, 1 - 1e-6)
            logits[self.slices[child].start] = torch.log(ratio / (1 - ratio))
        return logits

    def metrics(self, predictions: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                weights: np.ndarray | None = None) -> dict[str, float]:
        """`{"auc/click": ..., "logloss/click": ..., "mse/watch": ..., ...}` over the rows in each
        task's sample space; predictions `[N, L]`, labels, mask (and sample weights, for weighted
        metrics) `[N, T]`. NaN for a task without rows."""
        out: dict[str, float] = {}
        for k, (name, kind) in enumerate(zip(self.names, self.kinds)):
            keep = mask[:, k].astype(bool)
            columns = self.slices[k] if self.widths[k] > 1 else self.slices[k].start
            y, p = labels[keep, k].astype(np.float64), predictions[keep, columns].astype(np.float64)
            w = () if weights is None else (weights[keep, k].astype(np.float64),)
            for metric in kind.metrics:
                out[f"{metric.name}/{name}"] = metric.compute(y, p, *w) if y.size else math.nan
        return out

    def rank_values(self, predictions: np.ndarray) -> np.ndarray:
        """Predictions `[N, L]` -> what the fused ranking score reads of each task, `[N, T]`:
        a one-column task's prediction, a multiclass task's chosen class probability or
        expected class value (`TaskKind.rank_value`)."""
        if not self.wide:
            return predictions
        return np.stack([kind.rank_value(predictions[:, s]) for kind, s in zip(self.kinds, self.slices)], axis=1)

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


__all__ = ["KINDS", "KindOptions", "Metric", "Multiclass", "TaskKind", "TaskSet", "higher_is_better", "kind_of",
           "register_kind"]
