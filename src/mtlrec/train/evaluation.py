"""Scoring a split: the weighted loss, each task's loss and metrics, from its logits.

Used by training (validation), a trained model (`evaluate`) and the bench, none of which
needs the training loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from mtlrec.data.tensors import TensorData
from mtlrec.tasks import TaskSet

if TYPE_CHECKING:
    from mtlrec.config import RankConfig


def evaluate_logits(tasks: TaskSet, logits: Tensor, data: TensorData, ranking: RankConfig | None = None
                    ) -> dict[str, float]:
    """The config-weighted loss, each task's loss and its metrics, from a split's logits `[N, L]`;
    with `ranking.group_by` and the rows' groups (`data.groups`), the ranking metrics too
    (`ranking_metrics`).

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
    if ranking is not None and ranking.group_by is not None and data.groups is not None:
        out |= ranking_metrics(tasks, predictions.cpu().numpy(), data, ranking)
    return out


def validation_keys(tasks: TaskSet, ranking: RankConfig | None) -> list[str]:
    """What early stopping (and a search) may watch: the tasks' losses and metrics
    (`TaskSet.validation_keys`) and, with `ranking.group_by`, the ranking metrics."""
    return tasks.validation_keys + (ranking_metric_names(tasks, ranking) if ranking is not None else [])


def ranking_metric_names(tasks: TaskSet, ranking: RankConfig) -> list[str]:
    """The metrics `ranking_metrics` reports: none without `ranking.group_by`."""
    if ranking.group_by is None:
        return []
    return [f"gauc/{name}" for name, kind in zip(tasks.names, tasks.kinds) if kind.probability and kind.width == 1
            ] + [f"ndcg@{ranking.ndcg_k}"]


def ranking_metrics(tasks: TaskSet, predictions, data: TensorData, ranking: RankConfig) -> dict[str, float]:
    """Per ranking list (`data.groups`, from `rank.group_by`): the GAUC of each probability task
    over its sample space, and NDCG@`ndcg_k` of the fused score's task part prod_k p_k^w_k
    (`rank.weights`; the item factor `rank.item` needs the raw item column and is left out
    here), relevance sum_k r_k y_k (`rank.relevance`, a label outside its task's space
    counting 0); `mtlrec.rank.gauc` and `ndcg_at_k`. predictions `[N, L]`."""
    from mtlrec.rank import gauc, ndcg_at_k, rank_weights, relevance, relevance_weights, task_log_score

    labels, mask, groups = data.labels.cpu().numpy(), data.mask.cpu().numpy(), data.groups.cpu().numpy()
    out = {}
    for k, (name, kind) in enumerate(zip(tasks.names, tasks.kinds)):
        if kind.probability and kind.width == 1:
            keep = mask[:, k]
            out[f"gauc/{name}"] = gauc(labels[keep, k], predictions[keep, tasks.slices[k].start], groups[keep])
    weights = rank_weights(ranking, tasks.names)
    score = task_log_score(tasks.rank_values(predictions), tasks.names, weights)  # the order is exp's
    by_task = {name: np.where(mask[:, k], labels[:, k], np.nan) for k, name in enumerate(tasks.names)}
    rel = relevance(relevance_weights(ranking, tasks.names), dict(zip(tasks.names, tasks.kinds)), by_task)
    out[f"ndcg@{ranking.ndcg_k}"] = ndcg_at_k(rel, score, groups, ranking.ndcg_k)
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


__all__ = ["constant_baseline", "evaluate_logits", "prediction_table", "ranking_metric_names", "ranking_metrics",
           "validation_keys"]
