"""Dense against sparse dispatch of a routed MMoE: FLOPs and rows per second of forward + backward.

A routed MMoE backbone (`mtlrec.models.moe.MMoE`, top-k 2 per gate, 2 tasks, no always-on
expert) on random input, at 16, 32 and 64 experts. Dense dispatch runs every expert on every
row and weights the unchosen ones by 0; sparse runs each expert on the rows that chose it
(`mtlrec.nn.routing.sparse_mix`: rows gathered per expert, padded to the most any expert serves).

FLOPs are analytic, 2 per multiply-add, forward + backward = 3 x forward, gates included:
dense B * E experts' rows; sparse as run, E * C rows (C: the padded rows per expert, measured);
sparse ideal, the (row, expert) pairs routed. Rows/s: batch rows over the median wall time of
a forward + backward step; rows per CPU second: over the median CPU time of the process
(`time.process_time`, all its threads), which other work on a shared machine does not inflate.
Dense and sparse steps alternate, so that a busy machine slows both alike.

    python benchmarks/routing_speed.py --batch 4096 --in-dim 128 --hidden 128,64 --steps 5 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from mtlrec.models.moe import MMoE, MoEOptions

TASKS = ["click", "buy"]


def forward_flops_per_row(in_dim: int, hidden: list[int]) -> int:
    """Multiply-adds x 2 of one expert MLP on one row."""
    sizes = [in_dim, *hidden]
    return 2 * sum(a * b for a, b in itertools.pairwise(sizes))


def step_seconds(backbones: dict[str, MMoE], x: torch.Tensor, steps: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of a forward + backward pass of each backbone; `steps` passes
    each, taken in turn, after 2 untimed ones."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in backbones}
    for i in range(steps + 2):
        for name, backbone in backbones.items():
            wall, cpu = time.perf_counter(), time.process_time()
            backbone(x).task_reps.square().mean().backward()
            if i >= 2:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            backbone.zero_grad(set_to_none=True)
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--in-dim", type=int, default=128)
    parser.add_argument("--hidden", default="128,64", help="each expert's layer sizes")
    parser.add_argument("--experts", default="16,32,64")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = [int(h) for h in args.hidden.split(",")]
    per_row = forward_flops_per_row(args.in_dim, hidden)
    b = args.batch
    print(f"routed MMoE, {len(TASKS)} tasks, top_k {args.top_k}, batch {b}, input {args.in_dim}, "
          f"expert hidden {hidden}, {torch.get_num_threads()} threads, forward + backward, median of {args.steps}")
    header = (f"{'experts':>7} | {'dense GFLOP':>11} | {'sparse GFLOP run':>16} | {'sparse GFLOP ideal':>18} | "
              f"{'rows/expert run':>15} | {'dense rows/s':>12} | {'sparse rows/s':>13} | "
              f"{'dense rows/CPU s':>16} | {'sparse rows/CPU s':>17} | {'speed-up (CPU)':>14}")
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(b, args.in_dim, generator=generator)
    for e in [int(n) for n in args.experts.split(",")]:
        backbones = {}
        for dispatch in ("dense", "sparse"):
            torch.manual_seed(0)  # the same weights: the same routing
            options = MoEOptions(num_experts=e, expert_hidden=hidden, top_k=args.top_k, dispatch=dispatch)
            backbones[dispatch] = MMoE(args.in_dim, TASKS, options).train()
        seconds = step_seconds(backbones, x, args.steps)
        wall = {name: b / w for name, (w, _) in seconds.items()}
        cpu = {name: b / c for name, (_, c) in seconds.items()}
        with torch.no_grad():
            serves = torch.stack([g > 0 for g in backbones["sparse"](x).gates.values()]).any(0)  # [B, E]
        counts = serves.sum(0)
        capacity = int(counts.max())
        gate_flops = 3 * 2 * b * args.in_dim * e * len(TASKS)
        flops = {"dense": gate_flops + 3 * per_row * b * e, "run": gate_flops + 3 * per_row * e * capacity,
                 "ideal": gate_flops + 3 * per_row * int(counts.sum())}
        print(f"{e:>7} | {flops['dense'] / 1e9:>11.2f} | {flops['run'] / 1e9:>16.2f} | {flops['ideal'] / 1e9:>18.2f} | "
              f"{capacity:>15} | {wall['dense']:>12,.0f} | {wall['sparse']:>13,.0f} | "
              f"{cpu['dense']:>16,.0f} | {cpu['sparse']:>17,.0f} | {cpu['sparse'] / cpu['dense']:>14.2f}")


if __name__ == "__main__":
    main()
