"""Training with TorchRec's tables: fused on one process, and sharded over 2 gloo processes,
reach the weights of plain tables trained with the same optimizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("torchrec", reason="TorchRec is not installed (make install adds it)")

from mtlrec.config import load_config  # noqa: E402
from mtlrec.experiment import run_experiment  # noqa: E402


def config(tmp_path, **train) -> dict:
    return {
        "name": "tables", "seed": 2,
        "data": {"synthetic": {"rows": 2000, "dim": 6, "sparse_features": 2, "task_types": ["binary", "regression"],
                               "history": {"items": 40, "clusters": 4, "max_length": 6, "pooling": "mean"}}},
        "model": {"name": "mmoe", "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
        "train": {"epochs": 2, "batch_size": 100, "lr": 0.01, "progress": False,
                  "early_stopping": {"patience": None}} | train,
        "output_dir": str(tmp_path),
    }


PLAIN = {"optimizers": [{"params": "embedding", "optimizer": "sgd", "lr": 0.5},
                        {"params": "rest", "optimizer": "adam", "lr": 0.01}]}
FUSED = {"embedding_optimizer": "sgd", "embedding_lr": 0.5}


def test_fused_tables_train_as_plain_tables_with_the_same_optimizer(tmp_path):
    plain = run_experiment(load_config(config(tmp_path, **PLAIN)), tmp_path / "plain")
    fused = run_experiment(load_config(config(tmp_path, embedding_tables="fused", **FUSED)), tmp_path / "fused")
    a, b = plain.trained.model.state_dict(), fused.trained.model.state_dict()
    assert a.keys() == b.keys()  # the model folder keeps the plain layout
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)
    assert fused.test_metrics["auc/y1"] == pytest.approx(plain.test_metrics["auc/y1"], abs=1e-4)


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_two_processes_with_sharded_tables_train_as_one_with_plain_tables(sharding, tmp_path):
    one = run_experiment(load_config(config(tmp_path, **PLAIN)), tmp_path / "one")
    raw = config(tmp_path, embedding_sharding=sharding, **FUSED)
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(raw))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "mtlrec.cli", "train", str(path), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=400, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-4000:]
    saved = load_file(str(tmp_path / "two" / "model.safetensors"))
    expected = one.trained.model.state_dict()
    assert saved.keys() == expected.keys()  # a plain single-process model folder
    for name in expected:
        torch.testing.assert_close(saved[name], expected[name], atol=2e-5, rtol=1e-4)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())["test"]
    assert metrics["auc/y1"] == pytest.approx(one.test_metrics["auc/y1"], abs=1e-4)
