"""Does behaviour history help, and does target attention beat mean pooling? (DIN, Zhou et
al., KDD 2018.) And does a transformer over the history and the target do better still?
(BST, Chen et al., DLP-KDD 2019.)

Data: `configs/history.yaml`, synthetic rows whose task y1 depends on the share of the row's
history in the target item's cluster (`mtlrec.data.synthetic`, steps 5-6); y2 does not.
The same model (MMoE in that config) trains four times per seed on the same data, split and
seed, only the `history` input changes:
  none         the history column is left out (the target `item` stays an input);
  mean         history mean-pooled through the item table;
  attention    history pooled by DIN target attention against `item`;
  transformer  history kept as a sequence (`pooling: none`, `sequence_target: item`) and read
               by the model's `sequence_encoder` (the Behavior Sequence Transformer, defaults
               unless `--encoder` sets an option).
Each run trains through `run_experiment` for the config's fixed epoch budget and keeps its
best epoch by validation loss. Printed: each task's test metric per variant (mean ± std over
seeds), the paired differences of `PAIRS` (mean ± std over seeds, min, max, seeds where
positive), and every run.

    python benchmarks/history_quality.py --seeds 3
    python benchmarks/history_quality.py --seeds 1 --encoder output=mean --encoder heads=2
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np
import torch
import yaml

from mtlrec.config import Experiment, load_config, validate_config
from mtlrec.experiment import run_experiment
from mtlrec.tasks import TaskSet, higher_is_better

VARIANTS = ("none", "mean", "attention", "transformer")
PAIRS = (("attention", "mean"), ("mean", "none"), ("transformer", "attention"), ("transformer", "mean"))


def as_sequence(cfg: Experiment, encoder: dict) -> Experiment:
    """`cfg` (history mean-pooled) with the history kept as a sequence against `item` and the
    model reading it with `sequence_encoder` {name: transformer, **encoder}."""
    raw = cfg.to_dict()
    history = next(f for f in raw["features"]["sparse"] if f["name"] == "history")
    history |= {"pooling": "none", "sequence_target": "item"}
    raw["model"]["sequence_encoder"] = {"name": "transformer", **encoder}
    return validate_config(raw)


def variant_config(config: str, overrides: list[str], seed: int, variant: str, encoder: dict) -> Experiment:
    """The config of one run: the history pooled as `variant` says."""
    pooling = "mean" if variant == "transformer" else variant
    cfg = load_config(config, [*overrides, f"seed={seed}", f"data.synthetic.history.pooling={pooling}"])
    return as_sequence(cfg, encoder) if variant == "transformer" else cfg


def run(config: str, seeds: list[int], overrides: list[str], encoder: dict | None = None, log=print) -> list[dict]:
    """One row per (seed, variant): the test metrics, epochs and seconds."""
    runs = []
    for seed in seeds:
        for variant in VARIANTS:
            cfg = variant_config(config, overrides, seed, variant, encoder or {})
            result = run_experiment(cfg)
            row = {"seed": seed, "variant": variant, "epochs": len(result.history), "seconds": result.seconds,
                   **result.test_metrics}
            shown = "  ".join(f"{m} {row[m]:.4f}" for m in TaskSet(cfg.schema).primary_metrics)
            log(f"seed {seed} {variant:>11}: {result.seconds:5.1f} s  {shown}")
            runs.append(row)
    return runs


def tables(runs: list[dict], metrics: list[str]) -> str:
    """Markdown: metric per variant (mean ± std over seeds), paired differences, every run."""
    seeds = sorted({r["seed"] for r in runs})
    value = {(r["variant"], r["seed"]): r for r in runs}
    per = {(v, m): np.array([value[v, s][m] for s in seeds]) for v in VARIANTS for m in metrics}
    std = (lambda a: a.std(ddof=1)) if len(seeds) > 1 else (lambda a: 0.0)
    arrows = {m: "↑" if higher_is_better(m) else "↓" for m in metrics}

    lines = ["| history | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " | train s |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for v in VARIANTS:
        cells = [f"{per[v, m].mean():.4f} ± {std(per[v, m]):.4f}" for m in metrics]
        seconds = np.mean([value[v, s]["seconds"] for s in seeds])
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {seconds:.1f} |")

    lines += ["", "| paired difference | metric | mean ± std | min | max | seeds > 0 |", "|---|---|---|---|---|---|"]
    for a, b in PAIRS:
        for m in metrics:
            d = per[a, m] - per[b, m]
            lines.append(f"| {a} − {b} | {m} | {d.mean():+.4f} ± {std(d):.4f} | {d.min():+.4f} | {d.max():+.4f} "
                         f"| {int((d > 0).sum())}/{len(d)} |")

    lines += ["", "| seed | history | " + " | ".join(metrics) + " | epochs | s |",
              "|---|---|" + "---|" * (len(metrics) + 2)]
    for s in seeds:
        for v in VARIANTS:
            r = value[v, s]
            lines.append(f"| {s} | {v} | " + " | ".join(f"{r[m]:.4f}" for m in metrics)
                         + f" | {r['epochs']} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/history.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="seeds first .. first + N - 1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set data.synthetic.rows=20000")
    parser.add_argument("--encoder", action="append", default=[], metavar="OPTION=VALUE",
                        help="an option of the transformer variant's sequence_encoder, e.g. --encoder output=mean")
    args = parser.parse_args(argv)
    encoder = {}
    for item in args.encoder:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--encoder {item!r} is not of the form OPTION=VALUE")
        encoder[key] = yaml.safe_load(value)
    torch.set_num_threads(1)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    start = time.perf_counter()
    runs = run(args.config, seeds, args.set, encoder)
    metrics = TaskSet(load_config(args.config, args.set).schema).primary_metrics
    print()
    print(tables(runs, metrics))
    command = shlex.join(["python", "benchmarks/history_quality.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"\nseeds {seeds} (each: data, split, init and batch order; the variants share them); "
          f"1 thread; {time.perf_counter() - start:.0f} s in all\ncommand: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
