"""Embedding tables sharded by TorchRec over 2 gloo processes train as one process does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchrec", reason="TorchRec is not installed (make install adds it)")

WORKER = Path(__file__).parent / "workers" / "sharded_training.py"


def run_two(sharding: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), sharding, str(out)], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_sharded_tables_train_to_the_weights_of_one_process(sharding, tmp_path):
    result = run_two(sharding, tmp_path)
    assert result["keys"]  # the gathered state is the plain model's
    for name, difference in result["max_difference"].items():
        assert result["moved"][name] > 1e-3, name  # every tensor trained
        assert difference < 1e-6, (name, difference)
    rows = [json.loads((tmp_path / f"rows{r}.json").read_text()) for r in (0, 1)]
    if sharding == "row_wise":  # each process holds half of every table's rows
        assert rows[0] == rows[1] == {"user": 60, "item": 40}
    else:  # each table whole on one process
        assert {t: rows[0][t] + rows[1][t] for t in rows[0]} == {"user": 120, "item": 80}
        assert all(0 in (rows[0][t], rows[1][t]) for t in rows[0])
