"""The LightGBM reference row of `mtlrec bench` (mtlrec.gbdt)."""

import numpy as np
import pytest
import torch

from mtlrec import gbdt
from mtlrec.bench import run_bench
from mtlrec.config import ConfigError, load_config
from mtlrec.experiment import encode_splits
from mtlrec.tasks import TaskSet
from mtlrec.train.evaluation import constant_baseline

lightgbm = pytest.importorskip("lightgbm")


def small(tiny_config, types=("binary", "regression")):
    raw = dict(tiny_config)
    raw["data"] = {"synthetic": {"rows": 3000, "dim": 8, "sparse_features": 2, "task_types": list(types)}}
    return load_config(raw)


def test_each_task_is_a_booster_on_its_own_rows_scored_by_its_own_metrics(tiny_config):
    config = small(tiny_config)
    encoded = encode_splits(config)
    tasks = TaskSet(encoded.encoder.schema)
    # rows outside task 1's space hold labels that would mislead a booster trained on them
    train = encoded.train
    space = torch.arange(len(train)) % 3 != 0
    train.mask[:, 1] = space
    train.labels[~space, 1] = 1000.0
    options = gbdt.LightGBMOptions(num_leaves=7, rounds=60)
    run = gbdt.fit_lightgbm(tasks, train, encoded.valid, encoded.test, options, seed=1)
    # the same booster, by hand, on task 1's rows only
    x = gbdt.features(train)[space.numpy()]
    y = train.labels[space, 1].numpy()
    keep_valid = encoded.valid.mask[:, 1].numpy()
    params = {"objective": "regression", "num_leaves": 7, "learning_rate": 0.05, "min_data_in_leaf": 20,
              "feature_fraction": 1.0, "lambda_l2": 0.0, "seed": 1, "deterministic": True, "verbosity": -1}
    cat = [0, 1]
    booster = lightgbm.train(params, lightgbm.Dataset(x, y, categorical_feature=cat), 60, valid_sets=[
        lightgbm.Dataset(gbdt.features(encoded.valid)[keep_valid], encoded.valid.labels[keep_valid, 1].numpy(),
                         categorical_feature=cat)], callbacks=[lightgbm.early_stopping(50, verbose=False)])
    predicted = booster.predict(gbdt.features(encoded.test), num_iteration=booster.best_iteration)
    expected_mse = float(np.mean((predicted - encoded.test.labels[:, 1].numpy()) ** 2))
    assert run.metrics["mse/y2"] == pytest.approx(expected_mse, rel=1e-9)
    assert run.metrics["mse/y2"] < 100  # the misleading rows were not read
    constant = constant_baseline(tasks, encoded.train, encoded.test)
    assert run.metrics["auc/y1"] > 0.8 and run.metrics["logloss/y1"] < constant["logloss/y1"]
    assert len(run.rounds) == 2 and run.leaves > 0


def test_count_and_lognormal_tasks_predict_on_their_scale(tiny_config):
    config = small(tiny_config, types=("binary", "regression"))
    encoded = encode_splits(config)
    # relabel task 2 as a positive quantity, once as a count and once as a log-normal target
    for data in (encoded.train, encoded.valid, encoded.test):
        data.labels[:, 1] = torch.exp(data.labels[:, 1] / data.labels[:, 1].std()).round().clamp(min=1)
    for kind, metric in (("count", "poisson_deviance/y2"), ("lognormal", "mse_log/y2")):
        raw = config.to_dict()
        raw["tasks"][1]["type"] = kind
        tasks = TaskSet(load_config(raw).schema)
        run = gbdt.fit_lightgbm(tasks, encoded.train, encoded.valid, encoded.test,
                                gbdt.LightGBMOptions(num_leaves=7, rounds=100))
        constant = constant_baseline(tasks, encoded.train, encoded.test)
        assert run.metrics[metric] < constant[metric], kind


def test_bench_shows_the_reference_row_with_paired_differences(tiny_config, tmp_path):
    raw = small(tiny_config).to_dict() | {"models": {"lightgbm": {"num_leaves": 7, "rounds": 50}}}
    raw["train"]["epochs"] = 1
    summary = run_bench(load_config(raw), ["single_task", "lightgbm"], seeds=2, out_dir=tmp_path, log=lambda _: None)
    row = next(r for r in summary["rows"] if r["model"] == "lightgbm")
    assert row["seeds"] == 2 and row["epochs"] <= 50 and 0.5 < row["auc/y1"] <= 1.0
    assert row["gain auc/y1"] == pytest.approx(row["auc/y1"] - summary["rows"][0]["auc/y1"])
    assert any(d["model"] == "lightgbm" and d["versus"] == "single_task" for d in summary["paired"])
    assert "lightgbm" in (tmp_path / "bench.md").read_text()


def test_bad_reference_options_and_training_it_as_a_model_fail_clearly(tiny_config):
    with pytest.raises(ConfigError, match="num_leavs"):
        load_config(tiny_config | {"models": {"lightgbm": {"num_leavs": 7}}})
    with pytest.raises(ConfigError, match="lightgbm"):
        load_config(tiny_config | {"model": {"name": "lightgbm"}})



def test_a_multiclass_task_gets_the_multiclass_objective_and_its_class_probabilities(tiny_config):
    config = small(tiny_config)
    encoded = encode_splits(config)
    for data in (encoded.train, encoded.valid, encoded.test):  # task 2 as 3 classes of its value
        data.labels[:, 1] = torch.bucketize(data.labels[:, 1], torch.tensor([-0.5, 0.5])).float()
    raw = config.to_dict()
    raw["tasks"][1] |= {"type": "multiclass", "options": {"classes": 3}}
    tasks = TaskSet(load_config(raw).schema)
    run = gbdt.fit_lightgbm(tasks, encoded.train, encoded.valid, encoded.test, gbdt.LightGBMOptions(rounds=60))
    constant = constant_baseline(tasks, encoded.train, encoded.test)
    assert run.metrics["macro_auc/y2"] > 0.7 and run.metrics["logloss/y2"] < constant["logloss/y2"]
