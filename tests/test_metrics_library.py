"""The metrics now come from scikit-learn: they must give the numbers the project's own
implementations gave (kept here, as they were, as the reference) on a fixture with ties,
zeros and sample weights."""

import math

import numpy as np
import pytest

from mtlrec.rank import gauc
from mtlrec.train import metrics


def old_auc(labels, scores, weights=None):
    """Mann-Whitney U with average ranks for ties; weighted: pairs weighted w_i w_j."""
    labels = labels.astype(bool)
    if weights is not None:
        w = weights.astype(np.float64)
        pos_total, neg_total = w[labels].sum(), w[~labels].sum()
        if pos_total <= 0 or neg_total <= 0:
            return math.nan
        distinct, group = np.unique(scores, return_inverse=True)
        neg = np.bincount(group, weights=np.where(labels, 0.0, w), minlength=distinct.size)
        pos = np.bincount(group, weights=np.where(labels, w, 0.0), minlength=distinct.size)
        below = np.cumsum(neg) - neg
        return float((pos * (below + neg / 2)).sum() / (pos_total * neg_total))
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], scores.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mean(values, weights):
    return float(np.mean(values)) if weights is None else float(np.dot(values, weights) / np.sum(weights))


def old_log_loss(y, p, w=None, eps=1e-7):
    p = np.clip(p, eps, 1 - eps)
    return mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)), w)


def old_poisson(y, p, w=None, eps=1e-12):
    p = np.maximum(p, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        y_log = np.where(y > 0, y * np.log(y / p), 0.0)
    return mean(2.0 * (y_log - (y - p)), w)


def old_tweedie(y, mu, w=None, power=1.5, eps=1e-12):
    p, mu = power, np.maximum(mu, eps)
    terms = y ** (2 - p) / ((1 - p) * (2 - p)) - y * mu ** (1 - p) / (1 - p) + mu ** (2 - p) / (2 - p)
    return mean(2.0 * terms, w)


@pytest.fixture
def fixture():
    rng = np.random.default_rng(7)
    n = 2000
    scores = np.round(rng.random(n), 2)  # many ties
    scores[:5] = [0.0, 1.0, 1.0, 0.0, 0.5]  # probabilities at the clip limits
    labels = (rng.random(n) < scores).astype(np.float64)
    counts = rng.poisson(2.0, n).astype(np.float64)  # zeros included
    rates = rng.gamma(2.0, 1.0, n)
    weights = rng.integers(0, 4, n).astype(np.float64)  # zero weights included
    return labels, scores, counts, rates, weights


@pytest.mark.parametrize("weighted", [False, True])
def test_library_metrics_give_the_numbers_of_the_former_implementations(fixture, weighted):
    y, s, counts, rates, w = fixture
    w = w if weighted else None
    assert metrics.auc(y, s, w) == pytest.approx(old_auc(y, s, w), abs=1e-12)
    assert metrics.log_loss(y, s, w) == pytest.approx(old_log_loss(y, s, w), abs=1e-12)
    assert metrics.mean_squared_error(counts, rates, w) == pytest.approx(mean((rates - counts) ** 2, w), abs=1e-12)
    assert metrics.mean_absolute_error(counts, rates, w) == pytest.approx(mean(np.abs(rates - counts), w), abs=1e-12)
    assert metrics.poisson_deviance(counts, rates, w) == pytest.approx(old_poisson(counts, rates, w), abs=1e-10)
    for power in (1.2, 1.5, 1.8):
        assert metrics.tweedie_deviance(counts, rates, w, power=power) == pytest.approx(
            old_tweedie(counts, rates, w, power=power), abs=1e-10)


def test_undefined_cases_are_nan(fixture):
    y, s, *_ = fixture
    assert math.isnan(metrics.auc(np.ones(5), s[:5]))
    assert math.isnan(metrics.auc(y[:50], s[:50], np.zeros(50)))
    assert math.isnan(metrics.auc(np.array([1.0, 0.0]), np.array([0.3, 0.2]), np.array([1.0, 0.0])))  # no negative weight
    assert math.isnan(metrics.log_loss(y[:50], s[:50], np.zeros(50)))
    assert math.isnan(metrics.mean_squared_error(y[:50], s[:50], np.zeros(50)))


def test_gauc_is_the_row_weighted_mean_of_per_group_library_aucs(fixture):
    y, s, *_ = fixture
    groups = np.arange(y.size) % 7
    groups[groups == 6] = 5  # a bigger group
    y[groups == 0] = 1.0  # a group with one class: left out
    per_group = [(np.sum(groups == g), old_auc(y[groups == g], s[groups == g])) for g in range(1, 6)]
    expected = sum(n * a for n, a in per_group) / sum(n for n, _ in per_group)
    assert gauc(y, s, groups) == pytest.approx(expected, abs=1e-12)
