"""The model-only training step: mtlrec's fused expert bank against per-expert modules.

Times forward, loss, backward and an Adam step (lr 1e-3) on batches built beforehand (no data
pipeline, no trainer), batch 1024, fp32, for three workloads:
  ple    the peers.py PLE workload: 26 sparse features (vocabularies 10..1000, embedded at 8),
         13 dense, 2 binary tasks (BCE); 2 levels of 2 shared + 2 task experts (256, 128) with
         batch norm, linear softmax gates, towers (64,);
  bank1  its first level's experts alone: 6 experts (256, 128) with batch norm reading one
         input [B, 221]; loss: the outputs against a fixed random tensor;
  bank2  its second level's experts alone: 6 experts (256, 128) reading 3 inputs [3, B, 128]
         (2 experts each: a task's, the other task's, the shared ones).
Variants:
  mtlrec      mtlrec's model (ple: `mtlrec.models` PLE) or its ExpertBank;
  per-expert  the same with every expert bank replaced by one Linear -> BatchNorm1d -> ReLU
              stack per expert (`mtlrec.nn.MLP`), run one by one in a Python loop and
              stacked, as DeepCTR-Torch computes its experts (ple: the rest of the model,
              embedding, gates and towers, is mtlrec's, so only the experts differ);
  deepctr     ple only, when deepctr-torch is installed: DeepCTR-Torch's own PLE (its
              embeddings, its experts, batch norm in its towers too), on the same batches;
  before      mtlrec from another source tree (`--before DIR`, e.g. a `git archive` of an
              older commit): its model, for a before/after table from one run;
  fused-adam  mtlrec with torch's fused Adam (`train.fused_optimizer: true`) in place of the
              trainer's default, which the other mtlrec variants use (not asked for by default).
The optimizer is Adam, lr 1e-3: mtlrec's trainer's default (`mtlrec.train.optim.make_optimizer`)
for the mtlrec variants and per-expert, torch.optim.Adam for DeepCTR-Torch (what its trainer builds).

Every (workload, variant, thread count, round) runs in a fresh process, rounds interleaved;
the median of the rounds is reported: rows/s, the ratio to per-expert, and the step's GFLOP/s
(the workload's FLOPs per row of forward + backward, counted by torch's FlopCounterMode on the
per-expert variant as peers.py counts them, times rows/s) as a share of a 2048^3 fp32 matmul at
that thread count (measured every round, median), and the minor page faults per step.
`--keep-freed-memory` sets glibc's malloc in every run to keep freed memory mapped
(`keep_freed_memory`); `--profile WORKLOAD VARIANT` prints the per-op self CPU time of 10 steps
instead of timing.

    python benchmarks/expert_step.py --threads 1,2 --rounds 5
    mkdir /tmp/before && git archive COMMIT | tar -x -C /tmp/before     # an older version
    python benchmarks/expert_step.py --threads 1,2 --rounds 5 --before /tmp/before
    python benchmarks/expert_step.py --profile bank1 mtlrec --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from peers import matmul_ceiling
from throughput import MODELS, workload

BATCH, BATCHES = 1024, 8  # batch size; distinct batches, cycled
EXPERTS, HIDDEN, DIM = 6, [256, 128], 26 * 8 + 13  # per level; expert layers; the PLE's input width
WORKLOADS = ("ple", "bank1", "bank2")
VARIANTS = ("mtlrec", "per-expert", "deepctr", "before", "fused-adam")


class PerExpertBank(nn.Module):
    """The reference: E separate experts, each Linear -> BatchNorm1d -> ReLU per layer
    (`mtlrec.nn.MLP`), run one by one, their outputs stacked `[B, E, H]`. Reads what an
    `ExpertBank` reads: `[B, I]` (every expert) or `[G, B, I]` (expert e reads group groups[e])."""

    def __init__(self, in_dim: int, num_experts: int, hidden: list[int], groups: list[int] | None = None):
        super().__init__()
        from mtlrec.nn import MLP

        self.experts = nn.ModuleList(MLP(in_dim, hidden, batch_norm=True) for _ in range(num_experts))
        self.groups = groups or [0] * num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = [x[g] for g in self.groups] if x.dim() == 3 else [x] * len(self.experts)
        return torch.stack([expert(h) for expert, h in zip(self.experts, inputs)], dim=1)


def adam(model: nn.Module, variant: str) -> torch.optim.Optimizer:
    """Adam, lr 1e-3, as mtlrec's trainer builds it by default (fused-adam: fused)."""
    from mtlrec.config import TrainConfig
    from mtlrec.train.optim import make_optimizer

    fused = variant == "fused-adam" or TrainConfig(epochs=1).fused_optimizer
    return make_optimizer("adam", model.parameters(), 1e-3, 0.0, fused)


def bank_step(name: str, variant: str):
    """(model, step closure, FLOP-counting closure) for the expert layer alone."""
    torch.manual_seed(0)
    groups = [0, 0, 1, 1, 2, 2] if name == "bank2" else None
    in_dim = HIDDEN[-1] if groups else DIM
    shape = (3, BATCH, in_dim) if groups else (BATCH, in_dim)
    inputs = [torch.randn(shape, requires_grad=True) for _ in range(BATCHES)]
    probe = torch.randn(BATCH, EXPERTS, HIDDEN[-1])
    if variant == "per-expert":
        model = PerExpertBank(in_dim, EXPERTS, HIDDEN, groups)
    else:
        from mtlrec.nn import ExpertBank

        model = ExpertBank(in_dim, EXPERTS, HIDDEN, batch_norm=True, groups=groups)
    optimizer = adam(model, variant)

    def step(i: int) -> None:
        x = inputs[i % BATCHES]
        loss = (model(x) * probe).sum()
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        loss.backward()
        optimizer.step()

    return model, step, lambda: model(inputs[0]) * probe


def ple_step(variant: str):
    """(model, step closure, FLOP-counting closure) for the whole PLE model."""
    schema, data = workload(BATCH * BATCHES)
    batches = [data.rows(i * BATCH, (i + 1) * BATCH) for i in range(BATCHES)]
    torch.manual_seed(0)
    if variant == "deepctr":  # it outputs probabilities
        model, inputs = deepctr_ple(schema, batches)
        forward, loss_of = (lambda i: model(inputs[i])), nn.functional.binary_cross_entropy
    else:
        from mtlrec import models

        model = models.create("ple", schema, batch_norm=True, **MODELS["ple"])
        if variant == "per-expert":
            for level in model.backbone.levels:
                bank = level.experts
                level.experts = PerExpertBank(bank.weights[0].shape[1], bank.num_experts, HIDDEN,
                                              None if level.first else bank.groups.tolist())
        forward, loss_of = (lambda i: model(batches[i].features).logits), nn.functional.binary_cross_entropy_with_logits
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3) if variant == "deepctr" else adam(model, variant)

    def step(i: int) -> None:
        batch = i % BATCHES
        loss = loss_of(forward(batch), batches[batch].labels, reduction="none").mean(0).sum()  # each task's mean
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, step, lambda: forward(0)


def deepctr_ple(schema, batches):
    """DeepCTR-Torch's PLE on this workload (the arguments peers.py gives it) and its inputs."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models.multitask import PLE as DeepCTRPLE

    columns = [SparseFeat(f.name, f.vocab_size, embedding_dim=8) for f in schema.sparse]
    columns += [DenseFeat(f.name, 1) for f in schema.dense]
    options = MODELS["ple"]
    model = DeepCTRPLE(columns, shared_expert_num=options["shared_experts"], specific_expert_num=options["task_experts"],
                       num_levels=options["num_levels"], expert_dnn_hidden_units=options["expert_hidden"],
                       gate_dnn_hidden_units=(), tower_dnn_hidden_units=options["tower_hidden"], dnn_use_bn=True,
                       task_names=("t0", "t1"), l2_reg_embedding=0.0, l2_reg_linear=0.0)
    inputs = [torch.cat([b.sparse.float(), b.dense], dim=1) for b in batches]  # its feature_index order
    return model, inputs


def keep_freed_memory() -> None:
    """glibc's malloc keeps freed memory mapped (as jemalloc and tcmalloc do) instead of
    returning the top of its heap to the system after each step and faulting it back in
    page by page in the next: blocks up to 256 MiB from the heap, trimmed past 1 GiB free."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    if not (libc.mallopt(m_mmap_threshold, 256 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise OSError("mallopt refused the thresholds")


def child(name: str, variant: str, threads: int, steps: int, warmup: int) -> None:
    torch.set_num_threads(threads)
    model, step, counted = ple_step(variant) if name == "ple" else bank_step(name, variant)
    model.train()
    with FlopCounterMode(display=False) as counter:  # forward + backward of one step
        counted().sum().backward()
    model.zero_grad(set_to_none=True)
    for i in range(warmup):
        step(i)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    seconds = time.perf_counter() - start
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    print(json.dumps({"rows_s": steps * BATCH / seconds, "flops_per_row": counter.get_total_flops() / BATCH,
                      "faults_per_step": faults}))


def profile(name: str, variant: str, threads: int) -> None:
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    model, step, _ = ple_step(variant) if name == "ple" else bank_step(name, variant)
    model.train()
    for i in range(5):
        step(i)
    with torch_profile(record_shapes=True) as prof:
        for i in range(10):
            step(i)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40,
                                                             max_name_column_width=40, max_shapes_column_width=80))


def run_child(args, name: str, variant: str, threads: int) -> dict:
    env = dict(os.environ)
    if variant == "before":  # its mtlrec first on the path; this script's own helpers still import
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.before) / "src"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, __file__, "--child", name, variant,
                          "--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
                          *(["--keep-freed-memory"] if args.keep_freed_memory else [])],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        sys.exit(f"{name} {variant} ({threads} threads) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--variants", help="default: mtlrec, per-expert, deepctr (ple, when installed), "
                                           "before (with --before); also fused-adam (ple)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="in every run, glibc's malloc keeps freed memory (see keep_freed_memory); Linux, glibc")
    parser.add_argument("--before", help="a source tree (with src/mtlrec) to time as the variant 'before'")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", nargs=2, metavar=("WORKLOAD", "VARIANT"),
                        help="print the per-op self CPU time of 10 steps (first of --threads), in this process")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    if args.keep_freed_memory and (args.child or args.profile):
        keep_freed_memory()
    if args.child:
        child(*args.child, thread_counts[0], args.steps, args.warmup)
        return
    if args.profile:
        profile(*args.profile, thread_counts[0])
        return
    workloads = args.workloads.split(",")
    if unknown := sorted(set(workloads) - set(WORKLOADS)):
        parser.error(f"unknown workloads {unknown}; known: {list(WORKLOADS)}")
    if args.variants:
        variants = args.variants.split(",")
    else:
        variants = ["mtlrec", "per-expert"] + (["deepctr"] if importlib.util.find_spec("deepctr_torch") else [])
        variants += ["before"] if args.before else []
    if unknown := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if "before" in variants and not (args.before and (Path(args.before) / "src" / "mtlrec").is_dir()):
        parser.error("the variant 'before' needs --before DIR, a source tree holding src/mtlrec")
    runs = [(name, variant) for name in workloads for variant in variants
            if variant not in ("deepctr", "fused-adam") or name == "ple"]
    ceilings: dict[int, list[float]] = {t: [] for t in thread_counts}
    results: dict[tuple[str, str, int], list[dict]] = {}
    for r in range(args.rounds):
        for threads in thread_counts:
            ceilings[threads].append(matmul_ceiling(threads))
            for name, variant in runs:
                results.setdefault((name, variant, threads), []).append(run_child(args, name, variant, threads))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    torch.set_num_threads(thread_counts[0])
    ceiling = {t: statistics.median(c) for t, c in ceilings.items()}
    print("fp32 matmul ceiling (2048^3, median of rounds): "
          + ", ".join(f"{t} thread{'s' * (t > 1)} {c:.1f} GFLOP/s" for t, c in ceiling.items())
          + f"; batch {BATCH}, median of {args.rounds} rounds of {args.steps} steps")
    print("malloc: " + ("freed memory kept (--keep-freed-memory)" if args.keep_freed_memory else "glibc's defaults"))
    print(f"{'workload':>8} {'threads':>7} {'variant':>10} {'rows/s':>9} {'vs per-expert':>13} {'MFLOP/row':>9}"
          f" {'GFLOP/s':>8} {'% ceiling':>9} {'faults/step':>11}")
    for name in workloads:
        for threads in thread_counts:
            medians = {v: statistics.median(r["rows_s"] for r in results[(name, v, threads)])
                       for n, v in runs if n == name}
            # the workload's FLOPs: the plain computation's count (FlopCounterMode has no formula for
            # the in-place addmm_ that the fused path accumulates a shared input's gradient with)
            counted = "per-expert" if "per-expert" in medians else next(iter(medians))
            flops = results[(name, counted, threads)][0]["flops_per_row"]
            for variant, rows_s in medians.items():
                ratio = f"{rows_s / medians['per-expert']:.2f}x" if "per-expert" in medians else "-"
                gflops = flops * rows_s / 1e9
                faults = statistics.median(r["faults_per_step"] for r in results[(name, variant, threads)])
                print(f"{name:>8} {threads:>7} {variant:>10} {rows_s:>9,.0f} {ratio:>13} {flops / 1e6:>9.2f}"
                      f" {gflops:>8.1f} {100 * gflops / ceiling[threads]:>8.0f}% {faults:>11,.0f}")

if __name__ == "__main__":
    main()
