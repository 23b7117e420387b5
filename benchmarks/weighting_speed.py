"""Step time of every loss weighting against fixed weights, on the throughput workload.

26 sparse + 13 dense features, 2 binary tasks (or --tasks N), PLE or MMoE as in
benchmarks/throughput.py, batch 1024. Each method trains --steps steps after 3 untimed ones;
the table prints milliseconds per step (median of --rounds) and the ratio to `fixed`, all
in one process so the ratios compare like with like. Every method that reads task gradients
runs twice (`--on`, default both): with its task gradients on the shared parameters and on
the model's shared representation Z (`on: representation`; db_mtl there with beta 0, the
only beta it allows on Z); the last column is the step time on Z over the one on the parameters.

    python benchmarks/weighting_speed.py --model ple --steps 30 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from mtlrec import models
from mtlrec.config import TrainConfig
from mtlrec.data import TensorData
from mtlrec.losses import WEIGHTINGS
from mtlrec.schema import Schema, Task
from mtlrec.train.trainer import Trainer
from throughput import MODELS, workload


def with_tasks(schema: Schema, data: TensorData, tasks: int) -> tuple[Schema, TensorData]:
    """The workload with `tasks` binary tasks (labels repeated from the two it has)."""
    if tasks == 2:
        return schema, data
    schema = Schema(sparse=schema.sparse, dense=schema.dense, tasks=[Task(name=f"t{k}") for k in range(tasks)])
    columns = torch.arange(tasks) % 2
    return schema, TensorData(data.sparse, data.dense, data.labels[:, columns], data.mask[:, columns])


ON_REPRESENTATION = {"db_mtl": {"beta": 0.0}}  # options a method needs with on: representation
REFUSE_REPRESENTATION = {"nash_mtl", "fairgrad"}  # coefficients ~ 1 / ||g||: refused on Z


def runs(methods: list[str], on: list[str]) -> dict[str, str | dict]:
    """Row label -> weighting spec: fixed, then each method, a gradient method once per place in `on`."""
    specs: dict[str, str | dict] = {"fixed": "fixed"}
    for name in methods:
        if not WEIGHTINGS[name].needs_task_gradients:
            specs[name] = name
            continue
        if "parameters" in on:
            specs[name] = name
        if "representation" in on and name not in REFUSE_REPRESENTATION:
            specs[f"{name} on Z"] = {"name": name, "on": "representation", **ON_REPRESENTATION.get(name, {})}
    return specs


def step_ms(spec: str | dict, schema: Schema, data: TensorData, model_name: str, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = models.create(model_name, schema, **MODELS[model_name])
    config = TrainConfig(epochs=1, batch_size=1024, progress=False, weighting=spec,
                         early_stopping={"patience": None})
    trainer = Trainer(model, schema, config, seed=seed)
    batches = list(data.batches(1024))[: steps + 3]
    for batch in batches[:3]:
        trainer._step(batch)
    start = time.perf_counter()
    for batch in batches[3:]:
        trainer._step(batch)
    return 1000 * (time.perf_counter() - start) / (len(batches) - 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(MODELS), default="ple")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", default=",".join(WEIGHTINGS), help="comma-separated (default: all)")
    parser.add_argument("--on", default="parameters,representation",
                        help="where gradient methods take the task gradients: parameters, representation or both")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    schema, data = with_tasks(*workload(1024 * (args.steps + 3)), args.tasks)
    specs = runs([n for n in args.methods.split(",") if n and n != "fixed"], args.on.split(","))
    times: dict[str, list[float]] = {label: [] for label in specs}
    for r in range(args.rounds):  # rounds interleave the methods, so host noise hits them alike
        for label, spec in specs.items():
            times[label].append(step_ms(spec, schema, data, args.model, args.steps, seed=r))
    median = {label: sorted(v)[len(v) // 2] for label, v in times.items()}
    print(f"{args.model}, {args.tasks} tasks, batch 1024, threads {torch.get_num_threads()}, "
          f"{args.steps} steps, median of {args.rounds}")
    print(f"{'weighting':>17} {'ms/step':>9} {'x fixed':>8} {'Z / params':>11}")
    for label in specs:
        method = label.removesuffix(" on Z")
        versus = f"{median[label] / median[method]:>11.2f}" if label != method and method in median else ""
        print(f"{label:>17} {median[label]:>9.1f} {median[label] / median['fixed']:>8.2f} {versus}".rstrip())


if __name__ == "__main__":
    main()
