"""Per-task metrics over a whole split: AUC and log loss (binary), MSE and MAE (regression).

Metrics are computed from all of a split's predictions at once, never averaged per batch.
A binary task whose split holds one class only has an undefined AUC, reported as NaN.
"""

from __future__ import annotations

import math

import numpy as np

from mtlrec.schema import Schema

# metric -> True when higher is better
HIGHER_IS_BETTER = {"auc": True, "logloss": False, "mse": False, "mae": False, "loss": False}


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN with one class."""
    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average 1-based rank over each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], scores.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(probs.astype(np.float64), eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def task_metrics(schema: Schema, predictions: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """`{"auc/click": ..., "logloss/click": ..., "mse/watch": ..., ...}` over the rows in each
    task's sample space. predictions, labels, mask: `[N, T]` (predictions are probabilities
    for binary tasks). A task without any labelled row gets NaN metrics.
    """
    out: dict[str, float] = {}
    for k, task in enumerate(schema.tasks):
        keep = mask[:, k].astype(bool)
        y, p = labels[keep, k].astype(np.float64), predictions[keep, k].astype(np.float64)
        if task.type == "binary":
            out[f"auc/{task.name}"] = auc(y, p) if y.size else math.nan
            out[f"logloss/{task.name}"] = log_loss(y, p) if y.size else math.nan
        else:
            out[f"mse/{task.name}"] = float(np.mean((p - y) ** 2)) if y.size else math.nan
            out[f"mae/{task.name}"] = float(np.mean(np.abs(p - y))) if y.size else math.nan
    return out


def higher_is_better(metric: str) -> bool:
    """Direction of a metric named like `auc/click` or `loss`."""
    kind = metric.split("/", 1)[0]
    if kind not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; metrics are {sorted(HIGHER_IS_BETTER)} (+ '/task')")
    return HIGHER_IS_BETTER[kind]
