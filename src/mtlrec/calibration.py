"""Post-hoc calibration of a binary task's probability: Platt scaling or isotonic regression,
fitted on the validation split after training and applied wherever the model predicts.

A task asks for it in the config, `{name: click, calibration: platt}` (binary and focal tasks;
not a task `within` another or one that another is within, whose product would then no
longer keep P(child) <= P(parent); `mtlrec.schema.Task`). Each method is a map on the
task's logit z, so what follows the model (the link, the metrics, ranking, export, the
service) reads calibrated logits and is otherwise unchanged:

- `platt` (Platt 1999; Niculescu-Mizil & Caruana, ICML 2005): z' = a z + b, with (a, b)
  minimising the log loss of sigmoid(a z + b) on the task's labelled validation rows, each
  row weighted by its sample weight when the schema has them (as in the training loss). This
  is the maximum-likelihood logistic regression of the label on z (without the smoothed
  targets of Platt's paper), solved by Newton's method in float64. With a > 0 the order of
  the rows, and so the AUC, is unchanged.
- `isotonic` (Zadrozny & Elkan, KDD 2002): a non-decreasing map of p = sigmoid(z), fitted by
  scikit-learn's `IsotonicRegression` on the same rows and weights and kept as its knots
  (x_i, y_i), x strictly increasing. A prediction p' is the linear interpolation between the
  knots around p, the first or last knot's y outside them (scikit-learn's
  `out_of_bounds="clip"`), clipped to [EPS, 1 - EPS] (EPS = 1e-6) so that z' = logit(p') is
  finite. Rows whose p fall on one flat step get one prediction, so the AUC may move a little.
  Between adjacent validation rows at the edges of the flat steps the map is steep (slopes
  dp'/dp of hundreds): there a prediction is that much more sensitive to the last bits of its
  logit, and an exported model, whose float32 logits differ from PyTorch's by about 1e-6,
  can differ from `predict` by some 1e-5 (computing the map itself in float64 adds nothing).

Calibration needs both labels among the task's weighted validation rows; Platt also needs
logits that do not separate the labels perfectly (no finite a, b would fit them: use
isotonic there). The fitted maps are written to the model folder as `calibration.json`,
numbers only, checked when read, never run as code.

Example:
    >>> import torch
    >>> from mtlrec.schema import DenseFeature, Schema, Task
    >>> schema = Schema(dense=[DenseFeature(name="x")],
    ...                 tasks=[Task(name="click", calibration="platt"), Task(name="watch", type="regression")])
    >>> calibration = Calibration(schema, {"click": PlattMap(a=0.5, b=-1.0)})
    >>> calibration(torch.tensor([[2.0, 7.5], [-4.0, 1.0]]))
    tensor([[ 0.0000,  7.5000],
            [-3.0000,  1.0000]])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mtlrec.data.tensors import TensorData
from mtlrec.schema import Schema
from mtlrec.tasks import TaskSet
from mtlrec.train.evaluation import evaluate_logits

if TYPE_CHECKING:
    from mtlrec.data.source import BatchSource
    from mtlrec.train.trainer import Trainer

EPS = 1e-6  # isotonic predictions are clipped to [EPS, 1 - EPS]: their logit stays finite
NEWTON_STEPS = 100  # Platt's Newton iterations at most (it converges in under 10 when a fit exists)
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class PlattMap(BaseModel):
    """Platt scaling of one task: z' = a z + b."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Literal["platt"] = "platt"
    a: FiniteFloat
    b: FiniteFloat


class IsotonicMap(BaseModel):
    """Isotonic calibration of one task: p' = the linear interpolation of the knots (x, y) at
    p = sigmoid(z), clipped to their ends and to [EPS, 1 - EPS]; z' = logit(p')."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Literal["isotonic"] = "isotonic"
    x: list[FiniteFloat] = Field(min_length=2, description="the knots' probabilities before, strictly increasing")
    y: list[FiniteFloat] = Field(min_length=2, description="after: non-decreasing, in [0, 1]")

    @model_validator(mode="after")
    def _check(self) -> IsotonicMap:
        x, y = np.array(self.x), np.array(self.y)
        if len(x) != len(y):
            raise ValueError(f"isotonic knots: {len(x)} x but {len(y)} y")
        if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0) or y.min() < 0 or y.max() > 1:
            raise ValueError("isotonic knots: x must increase strictly, y must not decrease and lie in [0, 1]")
        return self


TaskMap = Annotated[PlattMap | IsotonicMap, Field(discriminator="method")]


class CalibrationFile(BaseModel):
    """What `calibration.json` holds: each calibrated task's map, by task name."""

    model_config = ConfigDict(extra="forbid")
    tasks: dict[str, TaskMap]


def fit_platt(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None,
              task: str = "the task") -> PlattMap:
    """(a, b) minimising sum_i w_i logloss(y_i, sigmoid(a z_i + b)): Newton's method in float64,
    from a = 1, b = 0, each step halved until the loss does not rise. logits, labels (0/1),
    weights: `[n]`. ValueError (naming `task`) when no finite (a, b) minimises it."""
    from scipy.special import expit  # imported here: not on every `import mtlrec`

    z, y, w = _rows(logits, labels, weights, task)
    if np.ptp(z[w > 0]) == 0:
        raise ValueError(f"task {task!r}: Platt scaling cannot be fitted: every validation row has the same logit")
    design = np.stack([z, np.ones_like(z)], axis=1)  # [n, 2]

    def loss(theta: np.ndarray) -> float:
        s = design @ theta
        return float(np.sum(w * (np.logaddexp(0.0, s) - y * s)))

    theta = np.array([1.0, 0.0])
    current = loss(theta)
    for _ in range(NEWTON_STEPS):
        p = expit(design @ theta)
        gradient = design.T @ (w * (p - y))
        hessian = (design * (w * p * (1 - p))[:, None]).T @ design
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:  # every row's probability saturated at 0 or 1
            raise _separated(task) from None
        if np.max(np.abs(step)) <= 1e-12 * (1 + np.max(np.abs(theta))):
            break
        scale = 1.0
        while True:
            candidate = theta - scale * step
            new = loss(candidate)
            if new <= current + 1e-12 * abs(current) or scale < 1e-8:
                break
            scale /= 2
        theta, current = candidate, new
    else:
        raise _separated(task)
    return PlattMap(a=float(theta[0]), b=float(theta[1]))


def _separated(task: str) -> ValueError:
    return ValueError(f"task {task!r}: Platt scaling does not converge on the validation split: the logits separate "
                      "its labels (almost) perfectly, so no finite (a, b) fits; use calibration: isotonic")


def fit_isotonic(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None,
                 task: str = "the task") -> IsotonicMap:
    """The isotonic regression of the labels on p = sigmoid(z) (scikit-learn's, with the
    weights), as its knots. logits, labels (0/1), weights: `[n]`. A fit with one knot (every p
    equal) gets a second at x + 1 with the same y, so interpolation always has two."""
    from scipy.special import expit
    from sklearn.isotonic import IsotonicRegression

    z, y, w = _rows(logits, labels, weights, task)
    fitted = IsotonicRegression(out_of_bounds="clip").fit(expit(z), y, sample_weight=w)
    knots_x, knots_y = fitted.X_thresholds_.tolist(), fitted.y_thresholds_.tolist()
    if len(knots_x) == 1:
        knots_x, knots_y = [knots_x[0], knots_x[0] + 1.0], knots_y * 2
    return IsotonicMap(x=knots_x, y=knots_y)


FITTERS = {"platt": fit_platt, "isotonic": fit_isotonic}


def _rows(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None,
          task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 logits, labels and weights (1 when None); ValueError unless both labels have weight."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    w = np.ones_like(z) if weights is None else np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(z)):
        raise ValueError(f"task {task!r}: cannot calibrate: the validation split has non-finite logits")
    positive, negative = w[y == 1].sum(), w[y == 0].sum()
    if positive <= 0 or negative <= 0:
        raise ValueError(f"task {task!r}: cannot calibrate on the validation split: it needs both labels among the "
                         f"task's labelled rows (weight of positives {positive:g}, of negatives {negative:g}, "
                         f"{len(z)} rows)")
    return z, y, w


def logit_columns(schema: Schema) -> dict[str, int]:
    """Each task's first logit column (`TaskSet.slices`), by name."""
    return {name: columns.start for name, columns in zip(schema.task_names, TaskSet(schema).slices)}


def platt(z: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """z' = a z + b, elementwise."""
    return a * z + b


def isotonic(z: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """z' = logit(p') with p' the knots' (x `[K]`, y `[K]`, K >= 2) linear interpolation at
    p = sigmoid(z), held at the end values outside [x_0, x_{K-1}] and clipped to [EPS, 1 - EPS].
    z `[N]`. The knot left of p is found by counting the knots at or below it (a comparison
    `[N, K]`, no searchsorted), which ONNX exports. Computed in float64 (x, y given so), z'
    returned in z's dtype: the map is steep between adjacent validation rows (slopes of
    hundreds), where float32's rounding of p would show in p'."""
    p = torch.sigmoid(z.double())
    left = ((p.unsqueeze(-1) >= x).sum(-1) - 1).clamp(0, x.shape[0] - 2)  # [N]
    x0, x1, y0, y1 = x[left], x[left + 1], y[left], y[left + 1]
    t = ((p - x0) / (x1 - x0)).clamp(0.0, 1.0)
    calibrated = (y0 + t * (y1 - y0)).clamp(EPS, 1 - EPS)
    return (torch.log(calibrated) - torch.log1p(-calibrated)).to(z.dtype)


class Calibration(nn.Module):
    """Logits `[N, L]` -> the same logits with each calibrated task's column mapped by its
    method (`PlattMap`, `IsotonicMap`); every other column is copied as it is. Without
    calibrated tasks in the schema it returns the very tensor it is given.

    Built with `maps` for every task of the schema that asks for calibration (`Task.calibration`),
    or with none (not fitted yet: applying it is then an error, never uncalibrated output).
    The maps are float64 buffers, moved to the logits' device when applied; Platt's cast to
    the logits' dtype, isotonic computed in float64.
    """

    def __init__(self, schema: Schema, maps: Mapping[str, PlattMap | IsotonicMap] | None = None):
        super().__init__()
        self.methods = {t.name: t.calibration for t in schema.tasks if t.calibration}  # task -> method asked
        self.maps = dict(maps or {})
        if self.maps:
            unknown = sorted(set(self.maps) - set(self.methods))
            if unknown:
                raise ValueError(f"calibration of task(s) {unknown}, which ask for none; calibrated tasks: "
                                 f"{sorted(self.methods)}")
            for name, method in self.methods.items():
                if name not in self.maps or self.maps[name].method != method:
                    given = self.maps[name].method if name in self.maps else None
                    raise ValueError(f"task {name!r} asks for calibration {method!r}; the calibration given has "
                                     f"{given!r}")
        column = logit_columns(schema)
        self.columns = [column[name] for name in self.maps]  # the logit column of each map, in self.maps order
        for i, fitted in enumerate(self.maps.values()):
            values = [[fitted.a], [fitted.b]] if fitted.method == "platt" else [fitted.x, fitted.y]
            self.register_buffer(f"map_{i}", torch.tensor(values, dtype=torch.float64), persistent=False)

    @property
    def fitted(self) -> bool:
        """Whether every task asking for calibration has its map (True without any)."""
        return len(self.maps) == len(self.methods)

    def forward(self, logits: Tensor) -> Tensor:
        if not self.methods:
            return logits
        if not self.fitted:
            raise ValueError(f"task(s) {sorted(self.methods)} ask for calibration, which is fitted on the validation "
                             "split after training (run_experiment, mtlrec.fit, mtlrec train); this model has none yet")
        columns = list(logits.unbind(-1))
        for i, (column, fitted) in enumerate(zip(self.columns, self.maps.values())):
            first, second = getattr(self, f"map_{i}").to(logits.device)
            if fitted.method == "platt":
                columns[column] = platt(columns[column], first.to(logits.dtype), second.to(logits.dtype))
            else:
                columns[column] = isotonic(columns[column], first, second)
        return torch.stack(columns, dim=-1)

    @classmethod
    def fit(cls, schema: Schema, logits: Tensor, targets: TensorData) -> Calibration:
        """Each calibrated task's map, fitted on its labelled rows of a split: logits `[N, L]`
        (uncalibrated), the rows' labels and mask `[N, T]`, and their sample weights when the
        schema has them (`Trainer.predict_split`)."""
        methods, column = cls(schema).methods, logit_columns(schema)
        names = [t.name for t in schema.tasks]
        logits, labels, mask = (t.detach().cpu().double().numpy() for t in (logits, targets.labels, targets.mask))
        weights = None if targets.weights is None else targets.weights.detach().cpu().double().numpy()
        maps = {}
        for name, method in methods.items():
            k = names.index(name)
            keep = mask[:, k].astype(bool)
            maps[name] = FITTERS[method](logits[keep, column[name]], labels[keep, k],
                                         None if weights is None else weights[keep, k], name)
        return cls(schema, maps)

    def to_json(self) -> str:
        """The maps as `calibration.json` holds them."""
        if not self.fitted:
            raise ValueError(f"task(s) {sorted(self.methods)} ask for calibration, which has not been fitted")
        return CalibrationFile(tasks=self.maps).model_dump_json(indent=1)

    @classmethod
    def from_json(cls, schema: Schema, text: str) -> Calibration:
        """Read `calibration.json` (data only); ValueError when it is malformed or does not match
        the schema's calibrated tasks."""
        return cls(schema, CalibrationFile.model_validate_json(text).tasks)

    def uncalibrated_metrics(self, tasks: TaskSet, logits: Tensor, targets: TensorData) -> dict[str, float]:
        """The calibrated tasks' losses and metrics from the uncalibrated logits `[N, L]`, named
        `uncalibrated/METRIC/TASK` (e.g. `uncalibrated/ece/click`); empty without calibrated tasks."""
        if not self.methods:
            return {}
        raw = evaluate_logits(tasks, logits, targets)
        return {f"uncalibrated/{key}": value for key, value in raw.items() if key.partition("/")[2] in self.methods}


def calibrate(schema: Schema, trainer: Trainer, valid: BatchSource | None) -> Calibration:
    """The calibration of a trained model (`trainer.model`): fitted on the validation split's
    predictions. ValueError without a validation split."""
    calibration = Calibration(schema)
    if not calibration.methods:
        return calibration
    if valid is None:
        raise ValueError(f"task(s) {sorted(calibration.methods)} ask for calibration, which is fitted on the "
                         "validation split: this run has none")
    return Calibration.fit(schema, *trainer.predict_split(valid))


def refuse_ordered_outputs(model: str, schema: Schema) -> None:
    """ESMM predicts pCTCVR = pCTR * pCVR <= pCTR by construction: calibrating either task
    separately would break that, so it is refused (ValueError naming the tasks)."""
    calibrated = [t.name for t in schema.tasks if t.calibration]
    if model == "esmm" and calibrated:
        raise ValueError(f"task(s) {calibrated}: calibration cannot apply to esmm's tasks, whose product structure "
                         "keeps pCTCVR <= pCTR; remove their calibration")


__all__ = ["EPS", "Calibration", "CalibrationFile", "IsotonicMap", "PlattMap", "calibrate", "fit_isotonic",
           "fit_platt", "isotonic", "platt", "refuse_ordered_outputs"]
