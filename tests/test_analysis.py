"""Bench tables, figures, report and expert utilisation."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mtlrec.analysis import gate_utilisation, plots, utilisation_table
from mtlrec.bench import run_bench, run_sweep
from mtlrec.cli import main
from mtlrec.config import load_config
from mtlrec.experiment import load_splits, run_experiment

PNG = b"\x89PNG\r\n\x1a\n"


def pairwise_auc(y, p):
    pos, neg = p[y == 1], p[y == 0]
    return ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    raw = {"name": "t", "data": {"synthetic": {"rows": 1500, "dim": 8, "task_types": ["binary", "regression"]}},
           "models": {"single_task": {"hidden": [8]}, "ple": {"expert_hidden": [8], "tower_hidden": [4]}},
           "train": {"epochs": 2, "batch_size": 128, "lr": 0.01, "progress": False}}
    summary = run_bench(load_config(raw), ["single_task", "ple"], 2, out, log=lambda *_: None)
    return out, summary


def test_table_numbers_equal_metrics_recomputed_from_saved_predictions(bench):
    out, summary = bench
    saved = json.loads((out / "bench.json").read_text())
    assert saved["rows"] == summary["rows"]
    for model in ("single_task", "ple"):
        aucs, mses = [], []
        for seed in (0, 1):
            rows = pd.read_parquet(out / model / f"seed{seed}" / "test_predictions.parquet")
            aucs.append(pairwise_auc(rows["y1:label"].to_numpy(), rows["y1"].to_numpy()))
            mses.append(float(np.mean((rows["y2"] - rows["y2:label"]) ** 2)))
        row = next(r for r in summary["rows"] if r["model"] == model)
        assert row["auc/y1"] == pytest.approx(np.mean(aucs), abs=1e-9)
        assert row["auc/y1 std"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-9)
        assert row["mse/y2"] == pytest.approx(np.mean(mses), rel=1e-5)
    csv = pd.read_csv(out / "bench.csv")
    assert list(csv["model"]) == ["single_task", "ple"] and "gain auc/y1" in csv.columns


def test_figures_and_report(bench):
    out, summary = bench
    for name in ("curves.png", "pareto.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert plots.training_curves(out, summary["metrics"], out / "c.png") == ["validation auc/y1", "validation mse/y2"]
    assert plots.pareto(summary, out / "p.png") == ["auc/y1 vs mse/y2"]
    page = (out / "report.html").read_text()
    assert page.count("<tr>") == 3 and page.count("data:image/png;base64,") == 2
    assert f"{summary['rows'][1]['auc/y1']:.4f}" in page


def test_utilisation_sums_match_the_gates(tmp_path, tiny_config):
    cfg = load_config(tiny_config | {"model": {"name": "ple", "task_experts": [1, 2], "shared_experts": 2,
                                               "expert_hidden": [8], "tower_hidden": [4]}})
    trained = run_experiment(cfg).trained
    table = load_splits(cfg).test
    means = gate_utilisation(trained, table, batch_size=97)
    data = trained.encoder.transform(table, labels=False)
    with torch.no_grad():
        gates = trained.model.eval()(data.features).gates
    assert set(means) == set(gates)
    for name, weights in gates.items():
        torch.testing.assert_close(means[name], weights.mean(0), atol=1e-6, rtol=0)
        assert means[name].sum().item() == pytest.approx(1.0, abs=1e-5)
    rows = utilisation_table(trained, means)
    per_gate = rows.groupby("gate")["weight"].sum()
    assert np.allclose(per_gate.to_numpy(), 1.0, atol=1e-5)
    y2 = rows[rows["gate"] == "level1/y2"]
    assert list(y2["owner"]) == ["own", "own", "shared", "shared"]
    assert list(rows[rows["gate"] == "level1/shared"]["owner"]) == ["other task"] * 3 + ["shared"] * 2
    assert plots.utilisation(rows, tmp_path / "u.png") == ["level1: mean gate weight", "level2: mean gate weight"]


def test_correlation_sweep(tmp_path):
    raw = {"data": {"synthetic": {"rows": 800, "dim": 6, "task_types": ["regression", "regression"]}},
           "models": {"shared_bottom": {"hidden": [8]}, "mmoe": {"expert_hidden": [8]}},
           "train": {"epochs": 1, "batch_size": 128, "progress": False}}
    rows = run_sweep(load_config(raw), [0.0, 1.0], ["shared_bottom", "mmoe"], 1, tmp_path, log=lambda *_: None)
    assert [(r["correlation"], r["model"]) for r in rows] == [(0.0, "shared_bottom"), (0.0, "mmoe"),
                                                               (1.0, "shared_bottom"), (1.0, "mmoe")]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows


def test_analyze_cli(tmp_path, tiny_config, capsys):
    cfg = load_config(tiny_config)
    run_experiment(cfg, tmp_path / "m")
    load_splits(cfg).test.to_csv(tmp_path / "t.csv", index=False)
    assert main(["analyze", str(tmp_path / "m"), str(tmp_path / "t.csv"), "--out", str(tmp_path / "a")]) == 0
    assert "level2/y1" in capsys.readouterr().out
    assert (tmp_path / "a" / "utilisation.png").exists() and (tmp_path / "a" / "utilisation.csv").exists()
    run_experiment(load_config(tiny_config | {"model": {"name": "shared_bottom", "hidden": [8]}}), tmp_path / "sb")
    assert main(["analyze", str(tmp_path / "sb"), str(tmp_path / "t.csv")]) == 2
    assert "has no gates" in capsys.readouterr().err
