"""Metric functions over a whole split: `metric(labels [N], predictions [N], weights [N] = None) -> float`.

The standard metrics are scikit-learn's (`roc_auc_score`, `log_loss`, `mean_squared_error`,
`mean_absolute_error`, `mean_poisson_deviance`, `mean_tweedie_deviance`), with sample
weights where given; GAUC and NDCG (`mtlrec.rank`) are built on them. What scikit-learn does
not have is written here: the expected calibration error, the squared error of logarithms,
and the multiclass metrics' averaging.

With sample weights every row counts `weights[i]` times: weighted means, and an AUC over
pairs weighted by the product of their weights (what scikit-learn's weighted ROC curve
integrates to). Metrics are computed from all of a split's predictions at once, never
averaged per batch. Which metrics a task reports, and their direction, is its kind's
(`mtlrec.tasks`). A binary task whose split holds one class only has an undefined AUC,
reported as NaN.
"""

from __future__ import annotations

import math

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve (ties count one half); NaN with one class. Weighted: sum over
    (positive i, negative j) of w_i w_j ([s_i > s_j] + [s_i = s_j] / 2), over the sum of w_i w_j.

    Example:
        >>> auc(np.array([0, 1, 1, 0]), np.array([0.1, 0.8, 0.4, 0.4]))
        0.875
    """
    labels = np.asarray(labels).astype(bool)
    if _no_weight(weights):
        return math.nan
    positive = labels if weights is None else labels & (weights > 0)
    negative = ~labels if weights is None else ~labels & (weights > 0)
    if not positive.any() or not negative.any():
        return math.nan
    return float(_sk().roc_auc_score(labels, scores, sample_weight=weights))


def log_loss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None, eps: float = 1e-7) -> float:
    """Mean -[y log p + (1 - y) log(1 - p)], p clipped to [eps, 1 - eps]."""
    p = np.clip(probs.astype(np.float64), eps, 1 - eps)
    if _no_weight(weights):
        return math.nan
    return float(_sk().log_loss(labels, p, sample_weight=weights, labels=[0, 1]))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None,
                               bins: int = 15) -> float:
    """ECE (Naeini et al., AAAI 2015; Guo et al., ICML 2017, Eq. 3): the probabilities cut into
    `bins` equal-width bins, sum_b (n_b / n) |mean label_b - mean probability_b| (weighted
    means and counts with sample weights). 0 for a calibrated model.

    Example:
        >>> round(expected_calibration_error(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.6, 0.6]), bins=2), 4)
        0.05
    """
    w = np.ones_like(probs, dtype=np.float64) if weights is None else weights.astype(np.float64)
    total = w.sum()
    if total <= 0:
        return math.nan
    which = np.minimum((probs.astype(np.float64) * bins).astype(np.int64), bins - 1)
    gap = np.bincount(which, weights=w * (labels - probs), minlength=bins)  # per bin: sum w (y - p)
    return float(np.abs(gap).sum() / total)  # = sum_b (mass_b / total) |gap_b / mass_b|


def mean_squared_error(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray | None = None) -> float:
    if _no_weight(weights):
        return math.nan
    return float(_sk().mean_squared_error(labels, predictions, sample_weight=weights))


def mean_absolute_error(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray | None = None) -> float:
    if _no_weight(weights):
        return math.nan
    return float(_sk().mean_absolute_error(labels, predictions, sample_weight=weights))


def poisson_deviance(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray | None = None,
                     eps: float = 1e-12) -> float:
    """Mean Poisson deviance 2 (y log(y / p) - (y - p)), with y log y = 0 at y = 0; predictions
    below eps count as eps."""
    if _no_weight(weights):
        return math.nan
    return float(_sk().mean_poisson_deviance(labels, np.maximum(predictions, eps), sample_weight=weights))


def tweedie_deviance(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray | None = None,
                     power: float = 1.5, eps: float = 1e-12) -> float:
    """Mean Tweedie unit deviance for 1 < power < 2 (Jorgensen 1987):
    2 (y^(2-p) / ((1-p)(2-p)) - y mu^(1-p) / (1-p) + mu^(2-p) / (2-p)), mu the prediction."""
    if _no_weight(weights):
        return math.nan
    return float(_sk().mean_tweedie_deviance(labels, np.maximum(predictions, eps), sample_weight=weights, power=power))


def mean_squared_error_of_logs(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray | None = None,
                               eps: float = 1e-300) -> float:
    """Mean (log p - log y)^2 of positive labels and predictions (not log(1 + y))."""
    return _mean((np.log(np.maximum(predictions, eps)) - np.log(labels)) ** 2, weights)


def _sk():
    """scikit-learn's metrics, imported on first use (not when mtlrec is imported: `serve` never needs them)."""
    from sklearn import metrics

    return metrics


def _no_weight(weights: np.ndarray | None) -> bool:
    """Whether sample weights were given and sum to 0 (a weighted mean is then undefined: NaN)."""
    return weights is not None and not float(np.sum(weights, dtype=np.float64)) > 0


def _mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    if weights is None:
        return float(np.mean(values))
    total = float(np.sum(weights, dtype=np.float64))
    return float(np.dot(values, weights) / total) if total > 0 else math.nan


# -- metrics of a multiclass task: labels [N] hold class indices 0..C-1, probabilities [N, C] --

def accuracy(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Share of rows whose most probable class (the first, on ties) is the label.

    Example:
        >>> accuracy(np.array([0, 2, 1]), np.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]]))
        0.6666666666666666
    """
    return _mean((probs.argmax(axis=1) == labels).astype(np.float64), weights)


def macro_auc(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """One-vs-rest AUC of each class c (`auc` of [label == c] against P(c)), averaged over the
    classes whose AUC is defined (present in the rows, and not alone); NaN if none is.

    Example:
        >>> round(macro_auc(np.array([0, 1, 2, 2]), np.array([[0.8, 0.1, 0.1], [0.2, 0.5, 0.3],
        ...                                                   [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])), 6)  # (1 + 2/3 + 5/8) / 3
        0.763889
    """
    per_class = [auc(labels == c, probs[:, c], weights) for c in range(probs.shape[1])]
    defined = [value for value in per_class if not math.isnan(value)]
    return float(np.mean(defined)) if defined else math.nan


def multiclass_log_loss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None,
                        eps: float = 1e-7) -> float:
    """Mean -log P(label), the probability clipped to [eps, 1]. With two classes it is the
    binary `log_loss` of P(class 1)."""
    chosen = np.take_along_axis(probs.astype(np.float64), labels.astype(np.int64)[:, None], axis=1)[:, 0]
    return _mean(-np.log(np.clip(chosen, eps, 1.0)), weights)
