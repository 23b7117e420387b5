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
    assert plots.training_curves(out, summary["metrics"], out / "c.png") == [
        "validation auc/y1 (2 seed(s), a line each)", "validation mse/y2 (2 seed(s), a line each)"]
    assert plots.pareto(summary, out / "p.png") == ["auc/y1 vs mse/y2\nbetter toward the lower right"]
    page = (out / "report.html").read_text()
    # three tables: primary metrics (header + 2 models), paired (header + ple vs single_task), every metric
    assert page.count("<table>") == 3 and page.count("<tr>") == 3 + 2 + 3 and page.count("data:image/png;base64,") == 2
    assert f"{summary['rows'][1]['auc/y1']:.4f}" in page and f"{summary['rows'][1]['mae/y2']:.4f}" in page
    assert "Paired differences" in page and "Paired differences" in (out / "bench.md").read_text()


def test_report_renders_in_a_headless_browser_with_every_figure_decoded(bench):
    """Chromium (Debian's `chromium` package) loads report.html, decodes both inlined figures
    and, with --screenshot, draws the page; skipped where no Chromium is installed."""
    import re
    import shutil
    import subprocess

    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium installed (Debian: apt install chromium)")
    out, _ = bench
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    page = (out / "report.html").resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert re.search(r'data-images-loaded="2 of 2"', dom), dom[-500:]
    shot = out / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", page], capture_output=True,
                   timeout=120)
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 20_000  # a drawn page, not a blank one


def test_paired_differences_equal_a_recomputation_from_the_runs(bench):
    import math

    from mtlrec.analysis.paired import t_quantile

    _, summary = bench
    runs = {(r["model"], r["seed"]): r for r in summary["runs"]}
    found = {(d["model"], d["versus"], d["metric"]): d for d in summary["paired"]}
    assert set(found) == {("ple", "single_task", "auc/y1"), ("ple", "single_task", "mse/y2")}  # no mmoe: no reference
    for metric, sign in (("auc/y1", 1.0), ("mse/y2", -1.0)):
        d = [sign * (runs[("ple", s)][metric] - runs[("single_task", s)][metric]) for s in (0, 1)]
        got = found[("ple", "single_task", metric)]
        mean, sd = sum(d) / 2, abs(d[0] - d[1]) / math.sqrt(2)
        assert got["mean"] == pytest.approx(mean, abs=1e-12)
        assert got["high"] - got["mean"] == pytest.approx(t_quantile(0.975, 1) * sd / math.sqrt(2), rel=1e-9)
        assert got["won"] == sum(x > 0 for x in d) and got["seeds"] == 2
        assert got["p"] == (1.0 if d[0] * d[1] <= 0 else 0.5)  # flipping one sign is as extreme iff signs differ


def test_t_quantiles_match_the_tables_and_sign_flip_p_enumerates_every_pattern():
    import itertools

    from mtlrec.analysis.paired import paired, sign_flip_p, t_quantile

    table = {1: 12.7062, 2: 4.3027, 4: 2.7764, 10: 2.2281, 30: 2.0423}  # Student's t, 97.5% (any statistics table)
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    d = np.array([0.3, -0.1, 0.5, 0.2])
    extreme = sum(abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12
                  for s in itertools.product((1, -1), repeat=4))
    assert sign_flip_p(d) == extreme / 16
    worse = paired([0.5, 0.6, 0.7], [0.4, 0.5, 0.6], higher_is_better=False)  # lower is better: a is worse
    assert worse.mean == pytest.approx(-0.1) and worse.won == 0 and worse.p == 0.25
    with pytest.raises(ValueError, match="same seeds"):
        paired([0.1], [0.1, 0.2], higher_is_better=True)


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
