"""Compare models on one data set: each trained for several seeds, per-task test metrics as
mean and std, and the MTL gain over the single-task baseline (PLE paper, Eq. 11):

    gain_k(model) = M_k(model) - M_k(single_task)  for metrics where higher is better (AUC),
                    M_k(single_task) - M_k(model)  where lower is better (MSE, log loss),

so a positive gain always means the multi-task model did better on task k. Every model is
also compared seed by seed with the baseline and with a reference model (MMoE by default):
the paired differences, their 95% interval, an exact sign-flip p and the seeds won
(`mtlrec.analysis.paired`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtlrec.analysis.paired import paired
from mtlrec.config import Experiment, validate_config
from mtlrec import gbdt
from mtlrec.data.tensors import TensorData
from mtlrec.experiment import Encoded, encode_splits, run_experiment
from mtlrec.tasks import TaskSet, higher_is_better

BASELINE = "single_task"
REFERENCE = "mmoe"


def run_bench(config: Experiment, model_names: list[str], seeds: int, out_dir: Path | None = None,
              log=print, reference: str = REFERENCE, tune_trials: int = 0) -> dict:
    """Train every model for seeds config.seed .. config.seed + seeds - 1; returns the summary
    (paired comparisons against single_task and `reference`, where they are among the models).
    With `tune_trials`, every model is first tuned with that many trials (`tuned_configs`)."""
    if seeds < 1 or not model_names:
        raise ValueError(f"a bench needs at least one seed and one model (got {seeds} seeds, models {model_names})")
    tuned = tuned_configs(config, model_names, tune_trials, out_dir, log) if tune_trials else {}
    runs = []
    for seed in range(config.seed, config.seed + seeds):
        encoded = encode_splits(config.with_model(config.model.name, seed))  # one split and encoding per seed
        for name in model_names:
            if name == gbdt.NAME:  # the non-neural reference row, on the same encoded split
                runs.append(reference_run(config, encoded, seed, log))
                continue
            own = tuned[name].config if name in tuned else config
            cfg = own.with_model(name, seed, progress=False)  # one line per run below, not per epoch
            folder = out_dir / name / f"seed{seed}" if out_dir else None
            result = run_experiment(cfg, folder, encoded=encoded, overwrite=True)  # a bench rewrites its runs
            metrics = result.test_metrics or {k.removeprefix("valid/"): v for k, v in result.history[-1].items()}
            shown = "  ".join(f"{m} {metrics[m]:.4f}" for m in TaskSet(config.schema).primary_metrics)
            capped = " (hit the epoch cap while improving)" if result.hit_epoch_cap else ""
            log(f"{name:>14} seed {seed}: {len(result.history)} epochs{capped}, {result.seconds:.1f} s, {shown}")
            runs.append({"model": name, "seed": seed, "seconds": result.seconds, "parameters": result.parameters,
                         "epochs": len(result.history), "hit_epoch_cap": result.hit_epoch_cap, **metrics})
    summary = summarize(config, model_names, runs, reference)
    if tuned:
        summary["tuned"] = {name: {"trials": t.trials, "metric": t.metric, "value": t.value, "values": t.values}
                            for name, t in tuned.items()}
    if out_dir:
        write_outputs(summary, out_dir, config.name)
    return summary


@dataclass(frozen=True)
class Tuned:
    """A model's config after its search: the best trial's values written in."""

    config: Experiment
    trials: int  # finished trials of its study
    metric: str
    value: float  # the best trial's validation metric
    values: dict[str, Any]  # field path -> value


def tuned_configs(config: Experiment, model_names: list[str], trials: int, out_dir: Path | None,
                  log) -> dict[str, Tuned]:
    """An equal-budget search per model before the seeds run: `trials` finished trials of
    `config.tune.space` each (its `train.*` keys and the model's own options), judged on the
    validation split of the first seed (`mtlrec.tune`; the test split is not read). The
    studies live in OUT/tune/MODEL/tune.db, so a bench run again reuses them."""
    import tempfile

    from mtlrec.tune import run_search, searched_config

    if config.tune is None:
        raise ValueError("bench --tune needs a tune section in the config: tune.space names the fields to search")
    base = config.to_dict()
    del base["tune"]
    root = out_dir / "tune" if out_dir else Path(tempfile.mkdtemp(prefix="mtlrec-tune-"))
    encoded = encode_splits(config)  # the first seed's split, encoded once for every model's trials
    tuned = {}
    for name in model_names:
        if name == gbdt.NAME:
            log(f"{gbdt.NAME:>14}: not tuned (its options: models.{gbdt.NAME})")
            continue
        log(f"{name:>14}: tuning, {trials} trials")
        result = run_search(config, trials, root / name, model=name, log=lambda line: log(f"{'':>14}  {line}"),
                            encoded=encoded)
        tuned[name] = Tuned(searched_config(base, result.best_values, name), result.finished, result.metric,
                            result.best_value, result.best_values)
    return tuned


def reference_run(config: Experiment, encoded: Encoded, seed: int, log) -> dict:
    """The LightGBM reference (`mtlrec.gbdt`) on this seed's split, as a bench run row:
    `parameters` counts its trees' leaves, `epochs` its mean boosting rounds per task."""
    if not isinstance(encoded.train, TensorData):
        raise ValueError(f"the {gbdt.NAME} reference trains on in-memory data, not data.streaming")
    options = gbdt.reference_options(config.models.get(gbdt.NAME, {}))
    if config.schema.lists:
        log(f"{gbdt.NAME:>14}: list features {[f.name for f in config.schema.lists]} are not read by the boosters")
    run = gbdt.fit_lightgbm(TaskSet(encoded.encoder.schema), encoded.train, encoded.valid, encoded.test, options,
                            seed, config.train.threads)
    shown = "  ".join(f"{m} {run.metrics[m]:.4f}" for m in TaskSet(config.schema).primary_metrics)
    capped = " (hit the round cap)" if options.rounds in run.rounds else ""
    log(f"{gbdt.NAME:>14} seed {seed}: rounds {run.rounds}{capped}, {run.seconds:.1f} s, {shown}")
    return {"model": gbdt.NAME, "seed": seed, "seconds": run.seconds, "parameters": run.leaves,
            "epochs": float(np.mean(run.rounds)), "hit_epoch_cap": options.rounds in run.rounds, **run.metrics}


def write_outputs(summary: dict, out_dir: Path, title: str) -> list[Path]:
    """bench.json, bench.md, bench.csv, the figures and report.html under `out_dir`."""
    from mtlrec.analysis import plots
    from mtlrec.analysis.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "bench.md").write_text(markdown_table(summary) + "\n")
    pd.DataFrame(summary["rows"]).to_csv(out_dir / "bench.csv", index=False)
    images = [out_dir / "curves.png", out_dir / "pareto.png"]
    plots.training_curves(out_dir, summary["metrics"], images[0], [r["model"] for r in summary["rows"]])
    plots.pareto(summary, images[1])
    write_report(summary, images, out_dir / "report.html", f"mtlrec bench: {title}")
    return images


def run_sweep(config: Experiment, correlations: list[float], model_names: list[str], seeds: int,
              out_dir: Path, log=print) -> list[dict]:
    """The MMoE paper's Fig. 4: a bench on synthetic data for each task correlation p."""
    from mtlrec.analysis import plots

    if config.data.source != "synthetic":
        raise ValueError("a correlation sweep needs synthetic data (data.source: synthetic)")
    rows = []
    for p in correlations:
        raw = config.to_dict()
        raw["data"]["synthetic"]["correlation"] = p
        log(f"correlation {p}")
        summary = run_bench(validate_config(raw), model_names, seeds, out_dir / f"p{p:g}", log)
        rows += [{"correlation": p, **row} for row in summary["rows"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
    pd.DataFrame(rows).to_csv(out_dir / "sweep.csv", index=False)
    plots.correlation_sweep(rows, TaskSet(config.schema).primary_metrics, out_dir / "sweep.png")
    return rows


def summarize(config: Experiment, model_names: list[str], runs: list[dict], reference: str = REFERENCE) -> dict:
    """Mean / std per model of every metric, the MTL gain on each task's primary metric, and
    each model's paired differences (seed by seed) against single_task and `reference`."""
    tasks = TaskSet(config.schema)
    metric_names = tasks.metric_names
    rows = []
    for name in model_names:
        mine = [r for r in runs if r["model"] == name]
        row = {"model": name, "seeds": len(mine), "parameters": mine[0]["parameters"],
               "seconds": float(np.mean([r["seconds"] for r in mine])),
               "epochs": float(np.mean([r["epochs"] for r in mine])),
               "capped": sum(bool(r.get("hit_epoch_cap")) for r in mine)}
        for metric in metric_names:
            values = np.array([r[metric] for r in mine], dtype=float)
            row[metric] = float(values.mean())
            row[f"{metric} std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    baseline = next((r for r in rows if r["model"] == BASELINE), None)
    gains = []
    if baseline is not None:
        for metric in tasks.primary_metrics:
            sign = 1.0 if higher_is_better(metric) else -1.0
            for row in rows:
                row[f"gain {metric}"] = sign * (row[metric] - baseline[metric])
            gains.append(f"gain {metric}")
    return {"metrics": tasks.primary_metrics, "all_metrics": metric_names, "gains": gains, "rows": rows,
            "paired": paired_differences(runs, model_names, tasks.primary_metrics, reference), "runs": runs}


def paired_differences(runs: list[dict], model_names: list[str], metrics: list[str], reference: str) -> list[dict]:
    """For every model and every metric, its paired difference over the seeds against
    single_task and against `reference` (each where present and not the model itself):
    {"model", "versus", "metric", mean, low, high, p, won, seeds}; positive: the model did better."""
    by_seed = {(r["model"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = []
    for versus in dict.fromkeys([BASELINE, reference]):
        if versus not in model_names:
            continue
        for name in model_names:
            if name == versus:
                continue
            for metric in metrics:
                a = [by_seed[(name, s)][metric] for s in seeds]
                b = [by_seed[(versus, s)][metric] for s in seeds]
                diff = paired(a, b, higher_is_better(metric))
                out.append({"model": name, "versus": versus, "metric": metric, **diff.as_dict()})
    return out


def table_cells(summary: dict, metrics: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """The bench table as text cells: (header, one row per model), the primary metrics (or
    `metrics`) as mean ± std. bench.md and report.html both render this."""
    gains = summary["gains"] if metrics is None else []
    metrics = summary["metrics"] if metrics is None else metrics
    head = ["model", *metrics, *gains, "params", "train s", "epochs (capped)"]
    rows = []
    for row in summary["rows"]:
        cells = [row["model"]]
        for m in metrics:
            cells.append(_fmt(row[m]) + (f" ± {_fmt(row[m + ' std'])}" if row["seeds"] > 1 else ""))
        cells += [_fmt(row[g], signed=True) for g in gains]
        epochs = f"{row.get('epochs', float('nan')):.1f}" + (f" ({row['capped']})" if row.get("capped") else "")
        cells += [f"{row['parameters']:,}", f"{row['seconds']:.1f}", epochs]
        rows.append(cells)
    return head, rows


def paired_cells(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The paired differences as text cells: one row per (model, versus), one column per
    metric: mean [95% interval], seeds won / seeds, sign-flip p."""
    metrics = summary["metrics"]
    head = ["model", "versus", *metrics]
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for d in summary.get("paired", []):
        interval = "" if math.isnan(d["low"]) else f" [{_fmt(d['low'], True)}, {_fmt(d['high'], True)}]"
        rows.setdefault((d["model"], d["versus"]), {})[d["metric"]] = (
            f"{_fmt(d['mean'], True)}{interval}, won {d['won']}/{d['seeds']}, p {d['p']:.2f}")
    return head, [[model, versus, *(cells.get(m, "") for m in metrics)] for (model, versus), cells in rows.items()]


def markdown_table(summary: dict) -> str:
    """bench.md: the primary metrics with the MTL gain, the paired differences, every metric."""
    parts = [_markdown(*table_cells(summary))]
    if summary.get("paired"):
        parts.append("Paired differences, seed by seed (positive: the model did better than `versus`; "
                     "mean [95% paired-t interval], seeds won, exact sign-flip p):\n\n"
                     + _markdown(*paired_cells(summary)))
    extra = [m for m in summary.get("all_metrics", []) if m not in summary["metrics"]]
    if extra:
        parts.append("Every metric (mean ± std):\n\n" + _markdown(*table_cells(summary, summary["all_metrics"])))
    if summary.get("tuned"):
        rows = [[name, str(t["trials"]), f"{t['metric']} {t['value']:.4f}",
                 ", ".join(f"{k} {json.dumps(v)}" for k, v in t["values"].items())]
                for name, t in summary["tuned"].items()]
        parts.append("Each model tuned before the seeds ran (trials judged on the first seed's validation split):"
                     "\n\n" + _markdown(["model", "trials", "best validation", "values"], rows))
    return "\n\n".join(parts)


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _fmt(value: float, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{value:+.4f}" if signed else f"{value:.4f}"
    return text.replace("-0.0000", "+0.0000") if signed else text
