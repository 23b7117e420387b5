"""Scoring a split: the weighted loss, each task's loss and metrics, from its logits.

Used by training (validation), a trained model (`evaluate`) and the bench, none of which
needs the training loop.
"""

from __future__ import annotations

from torch import Tensor

from mtlrec.data.tensors import TensorData
from mtlrec.tasks import TaskSet


def evaluate_logits(tasks: TaskSet, logits: Tensor, data: TensorData) -> dict[str, float]:
    """The config-weighted loss, each task's loss and its metrics, from a split's logits `[N, L]`.

    Example:
        >>> import torch
        >>> from mtlrec.schema import DenseFeature, Schema, Task
        >>> tasks = TaskSet(Schema(dense=[DenseFeature(name="x")], tasks=[Task(name="y", type="regression")]))
        >>> rows = TensorData(torch.zeros(2, 0), torch.zeros(2, 1), torch.tensor([[1.0], [3.0]]),
        ...                   torch.ones(2, 1, dtype=torch.bool))
        >>> evaluate_logits(tasks, torch.tensor([[2.0], [2.0]]), rows)["mse/y"]
        1.0
    """
    losses = tasks.losses(logits, data.labels, data.mask, data.weights)
    out = {"loss": float((tasks.weights.to(losses.device) * losses).sum())}
    out |= {f"loss/{name}": float(v) for name, v in zip(tasks.names, losses)}
    predictions = tasks.predict(logits)
    weights = data.weights.cpu().numpy() if tasks.weighted_metrics and data.weights is not None else None
    out |= tasks.metrics(*(t.cpu().numpy() for t in (predictions, data.labels, data.mask)), weights)
    return out


def constant_baseline(tasks: TaskSet, train: TensorData, data: TensorData) -> dict[str, float]:
    """Metrics of predicting each task's training mean for every row (what a model must beat;
    a multiclass task: its training class frequencies)."""
    logits = tasks.baseline_logits(train.labels, train.mask).expand(len(data), -1)
    return evaluate_logits(tasks, logits, data.to("cpu"))


def prediction_table(tasks: TaskSet, logits: Tensor, targets: TensorData):
    """Per task: the prediction (a multiclass task: a column per class, as `TrainedModel.predict`
    names them), the label and whether the row is in the task's space."""
    import pandas as pd

    predictions = tasks.predict(logits).cpu().numpy()
    labels, mask = targets.labels.cpu().numpy(), targets.mask.cpu().numpy()
    columns = {}
    for k, (name, columns_k) in enumerate(zip(tasks.names, tasks.slices)):
        columns |= dict(zip(tasks.output_names[columns_k], predictions[:, columns_k].T))
        columns |= {f"{name}:label": labels[:, k], f"{name}:in_space": mask[:, k]}
    return pd.DataFrame(columns)


__all__ = ["constant_baseline", "evaluate_logits", "prediction_table"]
