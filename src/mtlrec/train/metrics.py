"""Metric functions over a whole split: `metric(labels [N], predictions [N], weights [N] = None) -> float`.

With sample weights every row counts `weights[i]` times: weighted means, and an AUC over
pairs weighted by the product of their weights.

Metrics are computed from all of a split's predictions at once, never averaged per batch.
Which metrics a task reports, and their direction, is its kind's (`mtlrec.tasks`).
A binary task whose split holds one class only has an undefined AUC, reported as NaN.
"""

from __future__ import annotations

import math

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN with one class.
    Weighted: sum over (positive i, negative j) of w_i w_j ([s_i > s_j] + [s_i = s_j] / 2),
    over the sum of w_i w_j."""
    labels = labels.astype(bool)
    if weights is not None:
        return _weighted_auc(labels, scores, weights)
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


def _weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    w = weights.astype(np.float64)
    pos_total, neg_total = w[labels].sum(), w[~labels].sum()
    if pos_total <= 0 or neg_total <= 0:
        return math.nan
    distinct, group = np.unique(scores, return_inverse=True)
    neg = np.bincount(group, weights=np.where(labels, 0.0, w), minlength=distinct.size)
    pos = np.bincount(group, weights=np.where(labels, w, 0.0), minlength=distinct.size)
    below = np.cumsum(neg) - neg  # negative weight strictly below each distinct score
    return float((pos * (below + neg / 2)).sum() / (pos_total * neg_total))


def log_loss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None, eps: float = 1e-7) -> float:
    p = np.clip(probs.astype(np.float64), eps, 1 - eps)
    return _mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)), weights)


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
    return _mean((predictions - labels) ** 2, weights)


def mean_absolute_error(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray | None = None) -> float:
    return _mean(np.abs(predictions - labels), weights)


def poisson_deviance(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray | None = None,
                     eps: float = 1e-12) -> float:
    """Mean Poisson deviance 2 (y log(y / p) - (y - p)), with y log y = 0 at y = 0."""
    p = np.maximum(predictions, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        y_log = np.where(labels > 0, labels * np.log(labels / p), 0.0)
    return _mean(2.0 * (y_log - (labels - p)), weights)


def tweedie_deviance(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray | None = None,
                     power: float = 1.5, eps: float = 1e-12) -> float:
    """Mean Tweedie unit deviance for 1 < power < 2 (Jorgensen 1987):
    2 (y^(2-p) / ((1-p)(2-p)) - y mu^(1-p) / (1-p) + mu^(2-p) / (2-p)), mu the prediction."""
    p, mu = power, np.maximum(predictions, eps)
    terms = (np.power(labels, 2 - p) / ((1 - p) * (2 - p)) - labels * np.power(mu, 1 - p) / (1 - p)
             + np.power(mu, 2 - p) / (2 - p))
    return _mean(2.0 * terms, weights)


def mean_squared_error_of_logs(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray | None = None,
                               eps: float = 1e-300) -> float:
    """Mean (log p - log y)^2 of positive labels and predictions (not log(1 + y))."""
    return _mean((np.log(np.maximum(predictions, eps)) - np.log(labels)) ** 2, weights)


def _mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    if weights is None:
        return float(np.mean(values))
    total = float(np.sum(weights, dtype=np.float64))
    return float(np.dot(values, weights) / total) if total > 0 else math.nan
