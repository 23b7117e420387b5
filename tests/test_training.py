import math

import pytest
import torch

from mtlrec.config import load_config
from mtlrec.data import Encoder
from mtlrec.experiment import load_splits, run_experiment
from mtlrec.models import list_models, model_options
from mtlrec.tasks import TaskSet
from mtlrec.train.evaluation import constant_baseline


def small(tiny_config, **train):
    raw = dict(tiny_config)
    raw["train"] = tiny_config["train"] | train
    return raw


@pytest.mark.parametrize("name", list_models())
def test_training_lowers_loss_and_beats_a_constant_on_every_task(tiny_config, name):
    size = "hidden" if "hidden" in model_options(name) else "expert_hidden"
    raw = small(tiny_config, epochs=4) | {"model": {"name": name, "tower_hidden": [8], size: [16]}}
    funnel = name in ("esmm", "aitm")  # binary tasks only
    if funnel:
        raw["data"] = {"synthetic": {"rows": 3000, "dim": 8, "sparse_features": 2, "task_types": ["binary", "binary"]}}
    cfg = load_config(raw)
    result = run_experiment(cfg)
    losses = [row["valid/loss"] for row in result.history]
    assert losses[-1] < losses[0]
    splits = load_splits(cfg)
    enc = Encoder(cfg.schema).fit(splits.train)
    const = constant_baseline(TaskSet(enc.schema), enc.transform(splits.train), enc.transform(splits.test))
    test = result.test_metrics
    assert test["auc/y1"] > 0.75 and test["logloss/y1"] < const["logloss/y1"]
    if funnel:
        assert test["logloss/y2"] < const["logloss/y2"]
    else:
        assert test["mse/y2"] < 0.8 * const["mse/y2"]


def test_same_seed_same_metrics_other_seed_other_metrics(tiny_config):
    a = run_experiment(load_config(tiny_config))
    b = run_experiment(load_config(tiny_config))
    c = run_experiment(load_config(tiny_config | {"seed": 4}))
    assert a.history == [r | {"seconds": a.history[i]["seconds"]} for i, r in enumerate(b.history)]
    assert a.test_metrics == b.test_metrics
    assert a.test_metrics != c.test_metrics
    for p, q in zip(a.trained.model.parameters(), b.trained.model.parameters()):
        assert torch.equal(p, q)


def test_batch_size_one(tiny_config):
    raw = small(tiny_config, epochs=1, batch_size=1)
    raw["data"]["synthetic"]["rows"] = 50
    result = run_experiment(load_config(raw))
    assert math.isfinite(result.history[0]["train/loss"])


def test_batch_norm_skips_a_last_batch_of_one_row(tiny_config):
    raw = small(tiny_config, epochs=1, batch_size=40)
    raw["data"]["synthetic"]["rows"] = 51  # 41 training rows: batches of 40 and 1
    raw["model"] |= {"batch_norm": True}
    assert math.isfinite(run_experiment(load_config(raw)).history[0]["train/loss"])


def test_early_stopping_keeps_the_best_epoch(tiny_config):
    raw = small(tiny_config, epochs=12, lr=0.05, early_stopping={"metric": "auc/y1", "patience": 2})
    result = run_experiment(load_config(raw))
    history = result.history
    best = max(row["valid/auc/y1"] for row in history)
    splits = load_splits(load_config(raw))
    assert result.trained.evaluate(splits.valid)["auc/y1"] == pytest.approx(best, abs=1e-6)
    # patience: the run ends at most `patience` epochs after the best one
    best_epoch = max(history, key=lambda r: r["valid/auc/y1"])["epoch"]
    assert len(history) <= best_epoch + 2


def test_regression_only_and_three_tasks(tiny_config):
    raw = small(tiny_config, epochs=2)
    raw["data"]["synthetic"] |= {"task_types": ["regression", "regression", "binary"]}
    raw["model"] |= {"task_experts": [1, 2, 1]}
    result = run_experiment(load_config(raw))
    assert set(result.test_metrics) >= {"mse/y1", "mse/y2", "auc/y3"}


def test_metrics_of_a_task_are_restricted_to_its_sample_space(tiny_config):
    """The PLE paper's Eq. 9 setup: y2 learned and scored only where y1 == 1."""
    raw = small(tiny_config, epochs=2)
    cfg = load_config(raw)
    cfg.tasks[1].space = "y1 == 1"
    result = run_experiment(cfg)
    splits = load_splits(cfg)
    inside = splits.test[splits.test["y1"] == 1]
    predicted = result.trained.predict(splits.test)["y2"][splits.test["y1"] == 1]
    assert result.test_metrics["mse/y2"] == pytest.approx(float(((predicted - inside["y2"]) ** 2).mean()), rel=1e-5)


def test_combined_early_stopping_watches_the_weighted_sum_and_min_delta_and_cap_are_kept(tiny_config):
    raw = small(tiny_config, epochs=3, early_stopping={"metric": "combined", "patience": 5,
                                                       "combine": {"auc/y1": 1.0, "mse/y2": 0.5}})
    result = run_experiment(load_config(raw))
    for row in result.history:  # higher is better: the AUC counts up, the MSE down
        assert row["valid/combined"] == pytest.approx(row["valid/auc/y1"] - 0.5 * row["valid/mse/y2"], abs=1e-12)
    best = max(range(3), key=lambda i: result.history[i]["valid/combined"])
    assert result.hit_epoch_cap == (best == 2)  # 3 epochs, no early stop: capped iff the last was the best
    with pytest.raises(Exception, match="metric 'combined' and combine"):
        load_config(small(tiny_config, early_stopping={"metric": "combined"}))
    with pytest.raises(Exception, match=r"combine names unknown metric\(s\) \['auc/nope'\]"):
        load_config(small(tiny_config, early_stopping={"metric": "combined", "combine": {"auc/nope": 1.0}}))
    # min_delta larger than any change: the first epoch stays the best, so the run stops after patience epochs
    raw = small(tiny_config, epochs=6, early_stopping={"metric": "auc/y1", "patience": 2, "min_delta": 1.0})
    result = run_experiment(load_config(raw))
    assert len(result.history) == 3 and not result.hit_epoch_cap


def test_single_task_networks_each_keep_their_own_best_epoch(tiny_config):
    raw = small(tiny_config, epochs=8, lr=0.05, early_stopping={"metric": "loss", "patience": 2})
    raw["model"] = {"name": "single_task", "hidden": [16], "tower_hidden": [8]}
    cfg = load_config(raw)
    result = run_experiment(cfg)
    history = result.history
    valid = load_splits(cfg).valid
    got = result.trained.evaluate(valid)
    best = {t: min(range(len(history)), key=lambda i: history[i][f"valid/loss/{t}"]) for t in ("y1", "y2")}
    assert best["y1"] != best["y2"]  # the case where one stopping point would short-change a task
    for t in ("y1", "y2"):  # each network restored to the epoch of its own lowest validation loss
        assert got[f"loss/{t}"] == pytest.approx(history[best[t]][f"valid/loss/{t}"], abs=1e-6)
    # training went on until both networks had waited `patience` epochs past their best
    assert len(history) == min(8, max(best.values()) + 1 + 2)
    joint = run_experiment(load_config(raw | {"train": raw["train"] | {
        "early_stopping": {"metric": "loss", "patience": 2, "per_task": False}}}))
    one = min(range(len(joint.history)), key=lambda i: joint.history[i]["valid/loss"])
    assert joint.trained.evaluate(valid)["loss/y1"] == pytest.approx(joint.history[one]["valid/loss/y1"], abs=1e-6)
