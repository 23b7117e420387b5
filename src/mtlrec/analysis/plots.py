"""Figures (PNG, matplotlib): training curves, seesaw / Pareto scatter, expert utilisation,
metric against task correlation. Each function writes one file and returns its panel titles.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend
from matplotlib.ticker import MaxNLocator


def _save(fig, path: Path) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    return titles


def model_colour(names: list[str], name: str) -> str:
    """One colour per model, by its place in the bench's model list: the same in every figure."""
    return f"C{names.index(name) % 10}"


def training_curves(bench_dir: Path, metrics: list[str], path: Path, order: list[str] | None = None) -> list[str]:
    """Validation metric per epoch, a panel per task metric, a line per model and seed (one
    colour per model, by its place in `order`, the bench's model list; default: by name),
    read from each run's epochs.jsonl under `bench_dir/MODEL/seedN/`."""
    fig = Figure(figsize=(5 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    seeds: set[str] = set()
    models = [p for p in sorted(bench_dir.iterdir()) if p.is_dir() and list(p.glob("seed*/epochs.jsonl"))]
    order = order or [p.name for p in models]
    models.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
    for model_dir in models:
        colour = model_colour(order, model_dir.name) if model_dir.name in order else "k"
        for n, run in enumerate(sorted(model_dir.glob("seed*/epochs.jsonl"))):
            seeds.add(run.parent.name)
            rows = [json.loads(line) for line in run.read_text().splitlines()]
            for ax, metric in zip(axes[0], metrics):
                ax.plot([r["epoch"] for r in rows], [r[f"valid/{metric}"] for r in rows], color=colour, lw=1,
                        alpha=0.8, marker=".", ms=3, label=model_dir.name if n == 0 else None)
    for ax, metric in zip(axes[0], metrics):
        ax.set_title(f"validation {metric} ({len(seeds)} seed(s), a line each)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return _save(fig, path)


def pareto(summary: dict, path: Path) -> list[str]:
    """Task A's metric against task B's, a point per model (mean, std as error bars) with
    its seeds as small dots, for each pair of tasks: where the seesaw shows, models trade one
    task for the other. The title says which corner is better (higher AUC, lower MSE)."""
    from mtlrec.tasks import higher_is_better

    metrics = summary["metrics"]
    pairs = [(a, b) for i, a in enumerate(metrics) for b in metrics[i + 1 :]] or [(metrics[0], metrics[0])]
    fig = Figure(figsize=(5 * len(pairs), 4))
    axes = fig.subplots(1, len(pairs), squeeze=False)
    runs = summary.get("runs", [])
    for ax, (a, b) in zip(axes[0], pairs):
        for row in summary["rows"]:
            colour = model_colour([r["model"] for r in summary["rows"]], row["model"])
            mine = [r for r in runs if r["model"] == row["model"]]
            ax.scatter([r[a] for r in mine], [r[b] for r in mine], s=9, color=colour, alpha=0.5)
            ax.errorbar(row[a], row[b], xerr=row[f"{a} std"], yerr=row[f"{b} std"], fmt="o", capsize=3, color=colour,
                        label=row["model"])
        ax.legend(fontsize=7)  # a legend, not labels at the points: models level with each other overlap
        ax.set_xlabel(f"{a} ({'higher' if higher_is_better(a) else 'lower'} is better)")
        ax.set_ylabel(f"{b} ({'higher' if higher_is_better(b) else 'lower'} is better)")
        ax.xaxis.set_major_locator(MaxNLocator(5))  # metric values near 1 need room
        corner = f"{'upper' if higher_is_better(b) else 'lower'} {'right' if higher_is_better(a) else 'left'}"
        ax.set_title(f"{a} vs {b}\nbetter toward the {corner}", fontsize=10)
    return _save(fig, path)


def utilisation(table: pd.DataFrame, path: Path) -> list[str]:
    """Mean gate weight per expert, a heat map per level (rows: gates, columns: experts)."""
    levels = list(dict.fromkeys(table["level"]))
    width = max(4.5, 1.1 * table["expert"].nunique() / len(levels) + 3) * len(levels)
    fig = Figure(figsize=(width, 3.8))
    axes = fig.subplots(1, len(levels), squeeze=False)
    for ax, level in zip(axes[0], levels):
        grid = table[table["level"] == level].pivot(index="gate", columns="expert", values="weight")
        grid = grid[list(dict.fromkeys(table[table["level"] == level]["expert"]))]
        image = ax.imshow(grid.fillna(0).to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [c.split("/", 1)[-1] for c in grid.columns], rotation=60, fontsize=7)
        ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
        for (i, j), value in pd.DataFrame(grid.to_numpy()).stack().items():
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w" if value < 0.5 else "k")
        ax.set_title(f"{level}: mean gate weight")
        fig.colorbar(image, ax=ax, fraction=0.04)
    return _save(fig, path)


def correlation_sweep(sweep: list[dict], metrics: list[str], path: Path) -> list[str]:
    """Test metric against the synthetic tasks' correlation, a line per model, a panel per
    task metric (the MMoE paper's Fig. 4)."""
    fig = Figure(figsize=(5 * len(metrics), 3.8))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in sweep))
    for ax, metric in zip(axes[0], metrics):
        for model in models:
            rows = sorted((r for r in sweep if r["model"] == model), key=lambda r: r["correlation"])
            ax.errorbar([r["correlation"] for r in rows], [r[metric] for r in rows],
                        yerr=[r[f"{metric} std"] for r in rows], marker="o", capsize=3, label=model)
        ax.set_xlabel("task correlation p")
        ax.set_title(f"test {metric}")
        ax.legend(fontsize=7)
    return _save(fig, path)
