"""mtlrec.fit: the DataFrame API, the same training as `mtlrec train` on files."""

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import mtlrec
from mtlrec.config import ConfigError, load_config
from mtlrec.experiment import run_experiment


def tables(rows=900, seed=0):
    rng = np.random.default_rng(seed)
    t = pd.DataFrame({"age": rng.normal(size=rows), "price": rng.gamma(2.0, size=rows),
                      "item": rng.choice([f"i{k}" for k in range(20)], rows)})
    t["click"] = ((t.age + (t.item < "i1") + rng.normal(scale=0.5, size=rows)) > 0.5).astype(int)
    t["watch"] = t.age * 2 - t.price + rng.normal(size=rows)
    return t.iloc[:600].reset_index(drop=True), t.iloc[600:750].reset_index(drop=True), t.iloc[750:].reset_index(drop=True)


def config(**train):
    return {"name": "fit", "features": {"dense": ["age", "price"], "sparse": ["item"]},
            "tasks": ["click", {"name": "watch", "type": "regression"}],
            "model": {"name": "ple", "expert_hidden": [8], "tower_hidden": [4]},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.02, "progress": False} | train}


def test_dataframes_train_exactly_as_the_same_tables_read_from_files(tmp_path):
    train, valid, test = tables()
    model = mtlrec.fit(config(), train=train, valid=valid, test=test)
    for name, table in (("train", train), ("valid", valid), ("test", test)):
        table.to_parquet(tmp_path / f"{name}.parquet")
    files = config() | {"data": {"source": "files", **{n: str(tmp_path / f"{n}.parquet")
                                                       for n in ("train", "valid", "test")}}}
    result = run_experiment(load_config(files))
    assert model.test_metrics == result.test_metrics
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in model.history] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]
    for p, q in zip(model.model.parameters(), result.trained.model.parameters()):
        assert torch.equal(p, q)
    assert model.config.data.source == "dataframes"


def test_missing_splits_are_cut_from_train_and_the_model_predicts_evaluates_and_saves(tmp_path):
    train, _, test = tables()
    model = mtlrec.fit(config(), train=train)
    assert len(model.history) == 2 and "auc/click" in model.test_metrics
    predictions = model.predict(test)
    assert list(predictions.columns) == ["click", "watch"] and len(predictions) == len(test)
    assert predictions["click"].between(0, 1).all()
    assert model.evaluate(test)["auc/click"] > 0.6
    folder = model.save(tmp_path / "model")
    again = mtlrec.load(folder)
    pd.testing.assert_frame_equal(again.predict(test), predictions)


def test_a_folder_keeps_the_epoch_log_and_test_metrics(tmp_path):
    train, valid, test = tables()
    model = mtlrec.fit(config(), train=train, valid=valid, test=test, folder=tmp_path / "run")
    loaded = mtlrec.load(tmp_path / "run")
    assert loaded.test_metrics == pytest.approx(model.test_metrics)
    assert [r["epoch"] for r in loaded.history] == [1, 2]
    assert loaded.history[-1]["valid/loss"] == pytest.approx(model.history[-1]["valid/loss"])


def test_config_as_path_dict_or_experiment_with_overrides(tmp_path):
    train, valid, test = tables()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config()))
    by_path = mtlrec.fit(path, train=train, valid=valid, test=test, overrides=["train.epochs=1"])
    by_object = mtlrec.fit(mtlrec.load_config(config()), train=train, valid=valid, test=test,
                           overrides=["train.epochs=1"])
    assert len(by_path.history) == len(by_object.history) == 1
    assert by_path.test_metrics == by_object.test_metrics


def test_a_pyarrow_table_is_read_like_its_dataframe():
    pa = pytest.importorskip("pyarrow")
    train, valid, test = tables()
    a = mtlrec.fit(config(epochs=1), train=pa.Table.from_pandas(train), valid=valid, test=test)
    b = mtlrec.fit(config(epochs=1), train=train, valid=valid, test=test)
    assert a.test_metrics == b.test_metrics


def test_without_tables_the_config_reads_its_own_data(tiny_config):
    model = mtlrec.fit(tiny_config | {"train": tiny_config["train"] | {"epochs": 1}})
    assert model.config.data.source == "synthetic" and len(model.history) == 1


def test_bad_calls_fail_clearly(tmp_path):
    train, valid, _ = tables()
    with pytest.raises(ValueError, match="give the data once"):
        mtlrec.fit(config() | {"data": {"source": "files", "train": "x.csv"}}, train=train)
    with pytest.raises(ValueError, match="without a train table"):
        mtlrec.fit(config(), valid=valid)
    with pytest.raises(TypeError, match="train must be a pandas DataFrame"):
        mtlrec.fit(config(), train=train.to_dict())
    with pytest.raises(ValueError, match="needs the tables"):
        mtlrec.fit(config() | {"data": {"source": "dataframes"}})
    with pytest.raises(ConfigError, match="dataframes"):
        load_config(config() | {"data": {"source": "dataframes", "train": "x.csv"}})
    with pytest.raises(ValueError, match=r"missing column\(s\) \['price'\]"):
        mtlrec.fit(config(), train=train.drop(columns="price"))


def test_a_name_alone_stands_for_a_feature_or_task():
    short = load_config(config())
    long = load_config(config() | {"features": {"dense": [{"name": "age"}, {"name": "price"}],
                                                "sparse": [{"name": "item"}]},
                                   "tasks": [{"name": "click"}, {"name": "watch", "type": "regression"}]})
    assert short.schema == long.schema
