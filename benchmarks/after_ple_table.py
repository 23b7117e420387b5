"""Print the tables of `benchmarks/after_ple.sh`: for each bench.json given, the mean ± std per
model and the paired differences against single_task and mmoe. Several bench.json files of one
data set (the same config and seeds, e.g. a model re-run on its own) are merged by giving them
joined with '+': runs of a model in a later file replace those in an earlier one.

    python benchmarks/after_ple_table.py runs/after_ple/*/bench.json
    python benchmarks/after_ple_table.py --compact runs/after_ple/*/bench.json   # one line per model
    python benchmarks/after_ple_table.py runs/a/bench.json+runs/a_extra/bench.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mtlrec.bench import markdown_table, paired_differences
from mtlrec.tasks import higher_is_better


def merged(paths: list[str]) -> dict:
    """One summary from several bench.json files of one data set (later runs of a model win)."""
    summaries = [json.loads(Path(p).read_text()) for p in paths]
    runs: dict[tuple[str, int], dict] = {}
    models: list[str] = []
    rows: dict[str, dict] = {}
    for summary in summaries:
        replaced = {r["model"] for r in summary["runs"]}
        runs = {k: v for k, v in runs.items() if k[0] not in replaced}
        runs.update({(r["model"], r["seed"]): r for r in summary["runs"]})
        rows.update({r["model"]: r for r in summary["rows"]})
        models += [m for m in (r["model"] for r in summary["rows"]) if m not in models]
    first = summaries[0]
    out = dict(first, rows=[rows[m] for m in models], runs=list(runs.values()))
    baseline = rows.get("single_task")
    if baseline is not None:  # the gains again, against the baseline of the merged runs
        for metric in first["metrics"]:
            sign = 1.0 if higher_is_better(metric) else -1.0
            for row in out["rows"]:
                row[f"gain {metric}"] = sign * (row[metric] - baseline[metric])
    out["paired"] = paired_differences(out["runs"], models, first["metrics"], "mmoe")
    return out


def compact(summary: dict) -> str:
    """One line per model: each primary metric as mean ± std, then its paired difference
    against single_task and against mmoe as mean (seeds won / seeds)."""
    metrics = summary["metrics"]
    found = {(d["model"], d["versus"], d["metric"]): d for d in summary["paired"]}

    def vs(model: str, versus: str, metric: str) -> str:
        d = found.get((model, versus, metric))
        return "" if d is None else f"{d['mean']:+.4f} ({d['won']}/{d['seeds']})"

    head = ["model", *metrics, *(f"vs single_task {m}" for m in metrics), *(f"vs mmoe {m}" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        name = row["model"]
        cells = [name, *(f"{row[m]:.4f} ± {row[m + ' std']:.4f}" for m in metrics),
                 *(vs(name, "single_task", m) for m in metrics), *(vs(name, "mmoe", m) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(arguments: list[str]) -> None:
    short = "--compact" in arguments
    for argument in (a for a in arguments if a != "--compact"):
        paths = argument.split("+")
        print(f"## {Path(paths[0]).parent.name}\n")
        summary = merged(paths)
        print((compact(summary) if short else markdown_table(summary)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
