"""The command line end to end on a tiny config with CSV / Parquet files."""

import json

import pandas as pd
import pytest
import torch
import yaml

import mtlrec
from mtlrec.cli import main
from mtlrec.data import SyntheticConfig, make_synthetic


@pytest.fixture
def files(tmp_path):
    table = make_synthetic(SyntheticConfig(rows=1500, dim=6, sparse_features=2, task_types=["binary", "regression"]), 0)
    table.insert(0, "id", range(len(table)))
    table.iloc[:1000].to_csv(tmp_path / "train.csv", index=False)
    table.iloc[1000:].to_parquet(tmp_path / "test.parquet", index=False)
    config = {
        "name": "cli",
        "data": {"source": "files", "train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.parquet")},
        "features": {"sparse": [{"name": "c0"}, {"name": "c1", "embedding_dim": 4}],
                     "dense": [{"name": f"x{i}"} for i in range(2, 6)]},
        "tasks": [{"name": "click", "label": "y1"}, {"name": "watch", "label": "y2", "type": "regression"}],
        "model": {"name": "ple", "expert_hidden": [8], "tower_hidden": [4]},
        "train": {"epochs": 2, "batch_size": 64, "progress": False},
        "output_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_train_evaluate_predict(files, capsys):
    assert main(["train", str(files / "config.yaml"), "--set", "model.name=mmoe", "--set", "model.num_experts=3"]) == 0
    folder = files / "runs" / "cli"
    assert "saved" in capsys.readouterr().out
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.yaml", "encoder.json", "epochs.jsonl", "metrics.json"}
    assert len((folder / "epochs.jsonl").read_text().splitlines()) == 2
    saved_test = json.loads((folder / "metrics.json").read_text())["test"]

    assert main(["evaluate", str(folder), str(files / "test.parquet")]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    assert float(printed["auc/click"]) == pytest.approx(saved_test["auc/click"], abs=1e-6)

    out = files / "pred.csv"
    assert main(["predict", str(folder), str(files / "test.parquet"), "--out", str(out), "--keep", "id"]) == 0
    predicted = pd.read_csv(out)
    assert list(predicted.columns) == ["id", "click", "watch"] and len(predicted) == 500
    assert predicted["id"].tolist() == list(range(1000, 1500))
    assert predicted["click"].between(0, 1).all()
    capsys.readouterr()
    pd.read_parquet(files / "test.parquet").rename(columns={"id": "click"}).to_parquet(files / "clash.parquet")
    assert main(["predict", str(folder), str(files / "clash.parquet"), "--out", str(out), "--keep", "click"]) == 0
    assert list(pd.read_csv(out).columns) == ["click", "click_pred", "watch"]  # the column kept, the prediction renamed
    assert "prediction is written as 'click_pred'" in capsys.readouterr().err  # and said so


def test_saved_model_predicts_like_the_model_in_memory(files):
    cfg = mtlrec.load_config(files / "config.yaml")
    result = mtlrec.run_experiment(cfg, files / "m")
    table = pd.read_parquet(files / "test.parquet").drop(columns=["y1", "y2"])
    in_memory = result.trained.predict(table)
    loaded = mtlrec.load(files / "m")
    pd.testing.assert_frame_equal(loaded.predict(table), in_memory, check_exact=True)
    for (name, p), (_, q) in zip(result.trained.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(p, q), name
    main(["predict", str(files / "m"), str(files / "test.parquet"), "--out", str(files / "p.parquet")])
    pd.testing.assert_frame_equal(pd.read_parquet(files / "p.parquet"), in_memory.reset_index(drop=True))


def test_errors_are_one_clear_line(files, capsys):
    assert main(["train", str(files / "config.yaml"), "--set", "model.name=nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["evaluate", str(files / "nowhere"), str(files / "test.parquet")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    (files / "bad.csv").write_text("c0,c1\n1,2\n")
    main(["train", str(files / "config.yaml"), "--out", str(files / "m2")])
    assert main(["predict", str(files / "m2"), str(files / "bad.csv"), "--out", str(files / "o.csv")]) == 2
    assert "missing column(s) ['x2', 'x3', 'x4', 'x5']" in capsys.readouterr().err


def test_models_lists_every_model_with_options(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in mtlrec.models.list_models():
        assert f"{name}:" in out
    assert "task_experts = 1" in out


def test_bench_table_and_gain(files, capsys):
    assert main(["bench", str(files / "config.yaml"), "--models", "single_task,mmoe", "--seeds", "2",
                 "--out", str(files / "bench")]) == 0
    summary = json.loads((files / "bench" / "bench.json").read_text())
    rows = {r["model"]: r for r in summary["rows"]}
    runs = [r for r in summary["runs"] if r["model"] == "mmoe"]
    assert rows["mmoe"]["auc/click"] == pytest.approx(sum(r["auc/click"] for r in runs) / 2)
    assert rows["mmoe"]["gain auc/click"] == pytest.approx(rows["mmoe"]["auc/click"] - rows["single_task"]["auc/click"])
    assert rows["mmoe"]["gain mse/watch"] == pytest.approx(rows["single_task"]["mse/watch"] - rows["mmoe"]["mse/watch"])
    assert "| mmoe |" in capsys.readouterr().out


def test_esmm_predict_reports_cvr(files):
    cfg = mtlrec.load_config(files / "config.yaml", ["model={name: esmm, hidden: [8]}"])
    cfg.tasks[1] = cfg.tasks[1].model_copy(update={"type": "binary", "label": "y1"})  # a funnel: buy implies click
    trained = mtlrec.run_experiment(cfg, files / "esmm").trained
    table = pd.read_parquet(files / "test.parquet")
    out = mtlrec.load(files / "esmm").predict(table)
    assert list(out.columns) == ["click", "watch", "cvr"]
    pd.testing.assert_series_equal(out["watch"], out["click"] * out["cvr"], check_names=False, atol=1e-6, rtol=0)
    assert trained.evaluate(table)["auc/click"] > 0.5
