"""A strong non-neural reference for `mtlrec bench`: LightGBM, one booster per task.

Every task gets its own gradient-boosted trees (Ke et al., NeurIPS 2017), trained on the
same encoded features and the same split as the neural models of the bench: the
single-valued sparse ids as LightGBM categorical features, the standardised dense values as
numbers, each task on the rows of its own sample space, with its sample weights, stopped
early on the validation split. Multi-valued (list) features are not read: a booster takes
one value per feature (the bench says so when a config has lists).

Each task kind maps to the LightGBM objective of its loss: binary and focal -> `binary`,
regression -> `regression` (clipped to `bounds` when the task has them), count ->
`poisson`, tweedie -> `tweedie` with the task's power, lognormal -> `regression` on log y,
predicted as exp, multiclass -> `multiclass` (the class probabilities). The predictions are then scored by the task's own metrics, as a neural
model's are. Needs `pip install lightgbm` (in the `bench` extra).

Example (with `models: {lightgbm: {num_leaves: 63}}` in the config for other options):

    mtlrec bench CONFIG --models single_task,mmoe,ple,lightgbm --seeds 5
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mtlrec.data.tensors import TensorData
from mtlrec.tasks import TaskKind, TaskSet

NAME = "lightgbm"


class LightGBMOptions(BaseModel):
    """The boosters' settings (LightGBM's names); defaults are LightGBM's, with early stopping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_leaves: int = Field(31, ge=2, description="leaves per tree")
    learning_rate: float = Field(0.05, gt=0.0, le=1.0)
    rounds: int = Field(2000, ge=1, description="most boosting rounds; early stopping usually ends sooner")
    early_stopping_rounds: int = Field(50, ge=1, description="rounds without a better validation loss")
    min_data_in_leaf: int = Field(20, ge=1)
    feature_fraction: float = Field(1.0, gt=0.0, le=1.0)
    lambda_l2: float = Field(0.0, ge=0.0)
    categorical: bool = Field(True, description="sparse ids as LightGBM categoricals (else as numeric codes)")


@dataclass
class ReferenceRun:
    """What a reference run leaves for the bench: test metrics (the split's valid metrics when
    there is no test split), seconds, total leaves (its size) and boosting rounds per task."""

    metrics: dict[str, float]
    seconds: float
    leaves: int
    rounds: list[int]


def objective(kind: TaskKind) -> dict[str, object]:
    """LightGBM's objective for a task kind (see the module docstring)."""
    name = kind.name
    if name in ("binary", "focal"):
        return {"objective": "binary"}
    if name in ("regression", "lognormal"):
        return {"objective": "regression"}
    if name == "count":
        return {"objective": "poisson"}
    if name == "tweedie":
        return {"objective": "tweedie", "tweedie_variance_power": kind.options.power}
    if name == "multiclass":
        return {"objective": "multiclass", "num_class": kind.width}
    raise ValueError(f"the {NAME} reference has no objective for task type {name!r}")


def features(data: TensorData) -> np.ndarray:
    """`[N, S + D]`: the sparse ids (as float codes) then the dense values."""
    return np.concatenate([data.sparse.cpu().numpy().astype(np.float64), data.dense.cpu().numpy().astype(np.float64)],
                          axis=1)


def fit_lightgbm(tasks: TaskSet, train: TensorData, valid: TensorData, test: TensorData | None,
                 options: LightGBMOptions = LightGBMOptions(), seed: int = 0, threads: int | None = None
                 ) -> ReferenceRun:
    """One booster per task on `train`, early-stopped on `valid`; metrics on `test` (or `valid`)."""
    try:
        import lightgbm
    except ImportError:
        raise ImportError(f"the {NAME} reference needs LightGBM: pip install lightgbm "
                          "(or pip install 'mtlrec[bench]')") from None
    start = time.perf_counter()
    scored = test if test is not None else valid
    x_train, x_valid, x_scored = features(train), features(valid), features(scored)
    n_sparse = train.sparse.shape[1]
    predictions = np.zeros((len(scored), tasks.num_logits))  # task k's columns: tasks.slices[k]
    leaves, rounds = 0, []
    for k, kind in enumerate(tasks.kinds):
        params = {**objective(kind), "num_leaves": options.num_leaves, "learning_rate": options.learning_rate,
                  "min_data_in_leaf": options.min_data_in_leaf, "feature_fraction": options.feature_fraction,
                  "lambda_l2": options.lambda_l2, "seed": seed, "deterministic": True, "verbosity": -1,
                  "num_threads": threads or 0}
        categorical = list(range(n_sparse)) if options.categorical else []
        sets = [_task_rows(x, data, k, kind, categorical, lightgbm) for x, data in ((x_train, train), (x_valid, valid))]
        booster = lightgbm.train(params, sets[0], num_boost_round=options.rounds, valid_sets=[sets[1]],
                                 callbacks=[lightgbm.early_stopping(options.early_stopping_rounds, verbose=False)])
        raw = booster.predict(x_scored, num_iteration=booster.best_iteration)
        predictions[:, tasks.slices[k]] = _prediction(kind, raw).reshape(len(scored), kind.width)
        rounds.append(booster.best_iteration)
        leaves += sum(tree["num_leaves"] for tree in booster.dump_model(num_iteration=booster.best_iteration)["tree_info"])
    weights = scored.weights.cpu().numpy() if tasks.weighted_metrics and scored.weights is not None else None
    metrics = tasks.metrics(predictions, scored.labels.cpu().numpy(), scored.mask.cpu().numpy(), weights)
    return ReferenceRun(metrics, time.perf_counter() - start, leaves, rounds)


def _task_rows(x: np.ndarray, data: TensorData, k: int, kind: TaskKind, categorical: list[int], lightgbm):
    """The rows of task k's sample space as a LightGBM Dataset (label, weights)."""
    keep = data.mask[:, k].cpu().numpy()
    label = data.labels[:, k].cpu().numpy()[keep].astype(np.float64)
    if kind.name == "lognormal":
        label = np.log(label)
    weight = data.weights[:, k].cpu().numpy()[keep] if data.weights is not None else None
    return lightgbm.Dataset(x[keep], label=label, weight=weight, categorical_feature=categorical or "auto",
                            free_raw_data=False)


def _prediction(kind: TaskKind, raw: np.ndarray) -> np.ndarray:
    """What the task reports, from the booster's output (already a probability or a mean)."""
    if kind.name == "lognormal":
        return np.exp(raw)
    bounds = getattr(kind.options, "bounds", None)
    if bounds is not None:
        return np.clip(raw, *bounds)
    return raw


def reference_options(options: dict) -> LightGBMOptions:
    """`models: {lightgbm: {...}}` of a config, typed; a ValueError names a bad option."""
    from mtlrec.schema import typed_options

    return typed_options(f"bench reference {NAME!r}", LightGBMOptions, options, list(LightGBMOptions.model_fields))


__all__ = ["LightGBMOptions", "NAME", "ReferenceRun", "fit_lightgbm", "objective", "reference_options"]
