"""Under torchrun, every loss weighting acts on each process's own losses and gradients, and
the resulting gradients are averaged (checked for all of them in one 2-process run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from mtlrec.losses.weighting import WEIGHTINGS

WORKER = Path(__file__).parent / "workers" / "weighting_per_rank.py"


def test_every_weighting_acts_per_process_before_the_average(tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads((tmp_path / "per_rank.json").read_text())
    assert set(found) == set(WEIGHTINGS)
    for name, difference in found.items():  # a step of 2 processes = the mean of each process's own update
        assert difference["per_rank"] < 1e-6, (name, difference)
    # and that is not what the method does on the whole batch's gradients, where it is not linear
    nonlinear = {n for n, w in WEIGHTINGS.items() if w.needs_task_gradients} - {"gradnorm"}  # first step: linear
    for name in nonlinear | {"gls", "famo", "stch"}:
        assert found[name]["whole_batch"] > 1e-5, (name, found[name])
