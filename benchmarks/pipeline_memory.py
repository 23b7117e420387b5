"""Where mtlrec's peak memory goes in `benchmarks/peers.py`'s workload, stage by stage.

Runs peers.py's mtlrec run (the same data, the same code: `peers.run_mtlrec`) in this
process and, after each stage, prints the process's resident memory (RSS) now, the highest
RSS during the stage, and the highest since the start (what peers.py reports as peak MB).
The stages: imports, data made (the arrays every library gets), tables built (mtlrec's
DataFrames over those arrays), encoder fitted, train encoded, model built, first step,
trained, test encoded, predicted, FLOPs counted. With `--tracemalloc`, also the most that
numpy and Python held at once during the stage (torch's own allocations are not traced:
RSS covers them).

The peak during a stage is read from the kernel's high-water mark (`VmHWM`), reset at the
start of each stage by writing 5 to /proc/self/clear_refs: Linux only.

    python benchmarks/pipeline_memory.py --model ple
    python benchmarks/pipeline_memory.py --model mmoe --tracemalloc
"""

from __future__ import annotations

import argparse
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

MB = 2**20


def status_mb(key: str) -> float:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / MB
    raise KeyError(key)


def reset_stage_peak() -> None:
    """Reset the kernel's high-water mark of this process's RSS to its RSS now."""
    Path("/proc/self/clear_refs").write_text("5")


@dataclass
class StageMemory:
    """What one stage left and reached, in MB."""

    stage: str
    rss: float
    stage_peak: float
    peak_so_far: float
    traced: float | None
    traced_peak: float | None


@dataclass
class Recorder:
    """Called after each stage (`peers.run_mtlrec`'s `mark`): records it and starts the next."""

    trace: bool
    stages: list[StageMemory] = field(default_factory=list)

    def start(self) -> None:
        if self.trace:
            tracemalloc.start()
        reset_stage_peak()

    def __call__(self, stage: str) -> None:
        traced, traced_peak = (m / MB for m in tracemalloc.get_traced_memory()) if self.trace else (None, None)
        stage_peak = status_mb("VmHWM")
        peak_so_far = max([stage_peak] + [m.peak_so_far for m in self.stages])  # clear_refs resets ru_maxrss too
        self.stages.append(StageMemory(stage, status_mb("VmRSS"), stage_peak, peak_so_far, traced, traced_peak))
        print(self.row(self.stages[-1]), flush=True)
        if self.trace:
            tracemalloc.reset_peak()
        reset_stage_peak()

    def header(self) -> str:
        traced = f" {'traced MB':>10} {'traced peak':>12}" if self.trace else ""
        return f"{'stage':>16} {'RSS MB':>8} {'stage peak':>11} {'peak so far':>12}{traced}"

    def row(self, m: StageMemory) -> str:
        traced = f" {m.traced:>10.1f} {m.traced_peak:>12.1f}" if m.traced is not None else ""
        return f"{m.stage:>16} {m.rss:>8.1f} {m.stage_peak:>11.1f} {m.peak_so_far:>12.1f}{traced}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["ple", "mmoe"], default="ple")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tracemalloc", action="store_true", help="also trace numpy's and Python's allocations")
    args = parser.parse_args()
    recorder = Recorder(args.tracemalloc)
    print(recorder.header(), flush=True)
    recorder.start()
    import pandas  # noqa: F401  (imported by run_mtlrec: counted here, with the rest of the imports)
    import peers
    import torch

    import mtlrec.train.trainer  # noqa: F401

    torch.set_num_threads(args.threads)
    recorder("imports")
    x, y, vocab = peers.make_data(args.rows, seed=0)  # as peers.child makes them
    xt, yt, _ = peers.make_data(args.rows // 4, seed=1)
    recorder("data made")
    peers.run_mtlrec(args.model, x, y, xt, yt, vocab, mark=recorder)
    print(f"peak RSS: {max(m.peak_so_far for m in recorder.stages):.0f} MB ({args.model}, {args.rows:,} rows)")


if __name__ == "__main__":
    main()
