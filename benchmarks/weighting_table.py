"""Print the tables of `benchmarks/weighting_quality.sh`: for each data set, every weighting's
test metrics with MMoE and PLE, each against fixed weighting (the same model and seeds, paired
seed by seed) and against the single-task baseline; then a summary over all data sets.

    python benchmarks/weighting_table.py runs/weighting
    python benchmarks/weighting_table.py runs/weighting --data synthetic_p0.2

A cell reads `mean (difference to fixed, seeds won of seeds)`; the difference is signed so that
positive is better (AUC up, MSE / logloss down). The MTL-gain columns give the paired
difference to single-task. `train s`: mean seconds per run (the runs shared two cores, so
use the step-time table of benchmarks/weighting_speed.py for cost).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtlrec.analysis.paired import paired
from mtlrec.tasks import higher_is_better

MODELS = ("mmoe", "ple")


def load(folder: Path) -> tuple[dict[str, dict[tuple[str, int], dict]], list[str]]:
    """(weighting -> (model, seed) -> run, the primary metrics) for one data set's folder
    (single_task under its own name)."""
    out, metrics = {}, []
    for path in sorted(folder.glob("*/bench.json")):
        summary = json.loads(path.read_text())
        out[path.parent.name] = {(r["model"], r["seed"]): r for r in summary["runs"]}
        metrics = summary["metrics"]
    return out, metrics


def compare(runs: dict, other: dict, model: str, other_model: str, metric: str):
    seeds = sorted(s for (m, s) in runs if m == model)
    if not seeds or any((other_model, s) not in other for s in seeds):
        return None
    return paired([runs[(model, s)][metric] for s in seeds], [other[(other_model, s)][metric] for s in seeds],
                  higher_is_better(metric))


def data_set_table(name: str, results: dict, metrics: list[str]) -> tuple[str, list[dict]]:
    """The markdown table of one data set and its comparisons (for the summary)."""
    fixed, single = results.get("fixed"), results.get("single_task")
    head = ["weighting", *(f"{m.upper()} {metric}" for m in MODELS for metric in metrics),
            *(f"{m.upper()} gain over single-task" for m in MODELS), "train s (MMoE / PLE)"]
    lines = [f"**{name}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    comparisons = []
    order = ["fixed", *sorted(w for w in results if w not in ("fixed", "single_task"))]
    for weighting in order:
        if weighting not in results:
            continue
        runs = results[weighting]
        cells = [weighting]
        for model in MODELS:
            for metric in metrics:
                values = [r[metric] for (m, _), r in runs.items() if m == model]
                if not values:
                    cells.append("n/a")
                    continue
                mean = sum(values) / len(values)
                versus = compare(runs, fixed, model, model, metric) if fixed and weighting != "fixed" else None
                cells.append(f"{mean:.4f}" + (f" ({versus.mean:+.4f}, {versus.won}/{versus.seeds})" if versus else ""))
                if versus:
                    comparisons.append({"data": name, "weighting": weighting, "model": model, "metric": metric,
                                        "versus": "fixed", "diff": versus})
        for model in MODELS:
            gains = []
            for metric in metrics:
                versus = compare(runs, single, model, "single_task", metric) if single else None
                gains.append("n/a" if versus is None else f"{versus.mean:+.4f} ({versus.won}/{versus.seeds})")
                if versus:
                    comparisons.append({"data": name, "weighting": weighting, "model": model, "metric": metric,
                                        "versus": "single_task", "diff": versus})
            cells.append(", ".join(gains))
        seconds = [sum(r["seconds"] for (m, _), r in runs.items() if m == model)
                   / max(1, sum(1 for (m, _) in runs if m == model)) for model in MODELS]
        cells.append(" / ".join(f"{s:.1f}" for s in seconds))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), comparisons


def summary_table(comparisons: list[dict]) -> str:
    """Per weighting, over every (data set, model, metric): how often it beat fixed weighting
    and single-task on every seed, on the mean, and lost on every seed."""
    head = ["weighting", "cells", "> fixed on all seeds", "> fixed on the mean", "< fixed on all seeds",
            "> single-task on the mean", "> single-task on all seeds"]
    rows = []
    weightings = sorted({c["weighting"] for c in comparisons}, key=lambda w: (w != "fixed", w))
    for w in weightings:
        vf = [c["diff"] for c in comparisons if c["weighting"] == w and c["versus"] == "fixed"]
        vs = [c["diff"] for c in comparisons if c["weighting"] == w and c["versus"] == "single_task"]
        cells = max(len(vf), len(vs))
        fixed_cells = ["–"] * 3 if w == "fixed" else [  # counts only: AUC and MSE differences do not add up
            str(sum(d.won == d.seeds for d in vf)), str(sum(d.mean > 0 for d in vf)), str(sum(d.won == 0 for d in vf))]
        rows.append([w, str(cells), *fixed_cells, str(sum(d.mean > 0 for d in vs)), str(sum(d.won == d.seeds for d in vs))])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the OUT folder of weighting_quality.sh")
    parser.add_argument("--data", help="one data set's folder name (default: every one)")
    args = parser.parse_args()
    folders = [args.root / args.data] if args.data else sorted(p for p in args.root.iterdir() if p.is_dir())
    comparisons = []
    for folder in folders:
        results, metrics = load(folder)
        if not results:
            continue
        table, found = data_set_table(folder.name, results, metrics)
        comparisons += found
        print(table, end="\n\n")
    print("Summary over data sets, models and tasks (difference signed: positive is better):\n")
    print(summary_table(comparisons))


if __name__ == "__main__":
    main()
