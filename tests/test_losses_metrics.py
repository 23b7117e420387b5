import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlrec.schema import DenseFeature, Schema, Task
from mtlrec.tasks import TaskSet
from mtlrec.train.metrics import auc, log_loss
from helpers import dense_schema


def task_losses(logits, labels, mask, binary):
    """The task set's losses for tasks that are binary where `binary`, regression elsewhere."""
    types = ["binary" if b else "regression" for b in binary.tolist()]
    schema = dense_schema(tasks=tuple(f"t{k}" for k in range(len(types))), types=types)
    return TaskSet(schema).losses(logits, labels, mask)


def test_masked_loss_equals_the_loss_of_the_kept_rows_alone():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 2), torch.randint(0, 2, (50, 2)).float()
    labels[:, 1] = torch.randn(50)
    mask = torch.rand(50, 2) > 0.4
    labels[~mask] = float("nan")  # what is under the mask must not matter
    binary = torch.tensor([True, False])
    got = task_losses(logits, labels, mask, binary)
    keep0, keep1 = mask[:, 0], mask[:, 1]
    expected = torch.stack([
        F.binary_cross_entropy_with_logits(logits[keep0, 0], labels[keep0, 0]),
        F.mse_loss(logits[keep1, 1], labels[keep1, 1]),
    ])
    torch.testing.assert_close(got, expected)


def test_task_without_labels_in_the_batch_has_zero_loss_and_gradient():
    logits = torch.randn(4, 2, requires_grad=True)
    mask = torch.tensor([[True, False]] * 4)
    losses = task_losses(logits, torch.zeros(4, 2), mask, torch.tensor([True, True]))
    assert losses[1] == 0
    losses.sum().backward()
    assert logits.grad[:, 1].abs().max() == 0 and logits.grad[:, 0].abs().max() > 0



def brute_force_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + 0.3 * labels, 1)  # many ties
    assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)
    assert auc(np.array([0, 1]), np.array([0.2, 0.9])) == 1.0
    assert math.isnan(auc(np.ones(5), np.random.rand(5)))  # one class: undefined


def test_task_metrics_over_the_task_sample_space():
    schema = dense_schema(tasks=("c", "r"), types=["binary", "regression"])
    preds = np.array([[0.9, 1.0], [0.2, 2.0], [0.6, 9.0], [0.4, 4.0]])
    labels = np.array([[1, 1.0], [0, 1.0], [0, 0.0], [1, 5.0]])
    mask = np.array([[1, 1], [1, 1], [0, 0], [1, 1]], dtype=bool)
    m = TaskSet(schema).metrics(preds, labels, mask)
    assert m["auc/c"] == 1.0
    assert m["logloss/c"] == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.4)) / 3)
    assert m["mse/r"] == pytest.approx((0 + 1 + 1) / 3) and m["mae/r"] == pytest.approx(2 / 3)
    one_class = TaskSet(schema).metrics(preds, np.zeros_like(labels), mask)
    assert math.isnan(one_class["auc/c"]) and not math.isnan(one_class["logloss/c"])
    assert log_loss(np.array([1.0]), np.array([1.0])) < 1e-6  # clipped, finite


def test_expected_calibration_error_equals_a_loop_over_bins_and_is_reported_for_binary_tasks():
    from mtlrec.train.metrics import expected_calibration_error

    rng = np.random.default_rng(3)
    p = rng.random(500)
    y = (rng.random(500) < p ** 2).astype(float)  # over-confident probabilities
    w = rng.integers(0, 3, 500).astype(float)
    for weights in (None, w):
        ww = np.ones(500) if weights is None else weights
        total = 0.0
        for b in range(15):  # equal-width bins, the last one closed
            inside = (p >= b / 15) & ((p < (b + 1) / 15) if b < 14 else (p <= 1))
            if ww[inside].sum() > 0:
                gap = np.average(y[inside], weights=ww[inside]) - np.average(p[inside], weights=ww[inside])
                total += ww[inside].sum() / ww.sum() * abs(gap)
        assert expected_calibration_error(y, p, weights) == pytest.approx(total, abs=1e-12)
    assert expected_calibration_error(y, p) > 0.1  # p vs a rate of p^2: far from calibrated
    calibrated = (rng.random(200_000) < (q := rng.random(200_000))).astype(float)
    assert expected_calibration_error(calibrated, q) < 0.01
    schema = Schema(dense=[DenseFeature(name="x")], tasks=[Task(name="c"), Task(name="r", type="regression")])
    metrics = TaskSet(schema).metrics(np.stack([p, p], 1), np.stack([y, y], 1), np.ones((500, 2), dtype=bool))
    assert metrics["ece/c"] == pytest.approx(expected_calibration_error(y, p)) and "ece/r" not in metrics
