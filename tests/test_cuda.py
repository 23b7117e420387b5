"""The CUDA path (skipped on machines without a GPU)."""

import pytest
import torch

from mtlrec.config import load_config
from mtlrec.experiment import load_splits, run_experiment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_training_on_cuda_matches_cpu(tiny_config):
    results = {}
    for device in ("cpu", "cuda"):
        raw = tiny_config | {"train": tiny_config["train"] | {"device": device}}
        results[device] = run_experiment(load_config(raw))
    cpu, gpu = results["cpu"], results["cuda"]
    assert len(cpu.history) == len(gpu.history)
    for key in ("auc/y1", "mse/y2"):
        assert gpu.test_metrics[key] == pytest.approx(cpu.test_metrics[key], rel=2e-2)
    splits = load_splits(load_config(tiny_config))
    assert next(gpu.trained.model.parameters()).device.type == "cpu"  # handed back on the CPU
    assert gpu.trained.predict(splits.test).shape == (len(splits.test), 2)


@pytest.mark.parametrize("name", ["omoe", "mmoe", "ple", "adatt", "cross_stitch", "esmm"])
def test_bf16_autocast_on_cuda(tiny_config, name):
    raw = tiny_config | {"model": {"name": name, "tower_hidden": [8]},
                         "train": tiny_config["train"] | {"device": "cuda", "precision": "bf16", "epochs": 2}}
    raw["data"]["synthetic"]["task_types"] = ["binary", "binary"]
    result = run_experiment(load_config(raw))
    assert result.test_metrics["auc/y1"] > 0.7
