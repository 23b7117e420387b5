"""Exact resume after SIGKILL, the non-finite loss stop, and 2-process data parallel training."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtlrec import models
from mtlrec.config import load_config
from mtlrec.data import TensorData
from mtlrec.train.trainer import NonFiniteLoss, Trainer
from helpers import dense_schema, wait_for_checkpoint_inside_epoch


def config_file(tmp_path, **train):
    raw = {"name": "ft", "seed": 1,
           "data": {"synthetic": {"rows": 7500, "dim": 8, "task_types": ["binary", "regression"]}},
           "model": {"name": "ple", "expert_hidden": [16], "tower_hidden": [8], "dropout": 0.1},
           "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "progress": False, "checkpoint_every": 7,
                     "weighting": "uncertainty", "early_stopping": {"patience": None}} | train,
           "output_dir": str(tmp_path)}
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "mtlrec.cli", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    cfg = config_file(tmp_path)
    full = train_cli(cfg, "--out", tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.stderr.read()

    victim = train_cli(cfg, "--out", tmp_path / "killed")
    wait_for_checkpoint_inside_epoch(tmp_path / "killed.partial" / "checkpoint.json")  # then kill it
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    resumed = train_cli(cfg, "--out", tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = lambda f: [json.loads(l) for l in (tmp_path / f / "epochs.jsonl").read_text().splitlines()]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(log("full")) == drop(log("killed"))


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    from mtlrec.cli import main
    assert main(["train", str(config_file(tmp_path)), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_non_finite_loss_names_task_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    schema = dense_schema(4, tasks=("click", "watch"), types=["binary", "regression"])
    torch.manual_seed(0)
    model = models.create("mmoe", schema, expert_hidden=[8])
    n = 32 * 20
    labels = torch.stack([torch.randint(0, 2, (n,)).float(), torch.randn(n)], 1)
    labels[32 * 13 + 5, 1] = float("inf")  # step 13 (no shuffling below: batches in order)
    data = TensorData(torch.zeros(n, 0, dtype=torch.long), torch.randn(n, 4), labels, torch.ones(n, 2, dtype=torch.bool))
    cfg = load_config({"train": {"batch_size": 32, "progress": False, "checkpoint_every": 5}}).train
    trainer = Trainer(model, schema, cfg, checkpoint_dir=tmp_path)
    trainer._batches = lambda source, generator, skip: source.batches(32)  # in file order
    with pytest.raises(NonFiniteLoss, match=r"task 'watch': non-finite loss at step 13 \(epoch 1\).*of step 10"):
        trainer.fit(data)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 10
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())


def test_two_processes_train_like_one(tmp_path):
    cfg = config_file(tmp_path, epochs=2, checkpoint_every=None, batch_size=64, weighting="fixed")
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["synthetic"]["rows"] = 3200  # 2560 training rows: 40 full batches of 64
    raw["model"]["dropout"] = 0.0
    cfg.write_text(yaml.safe_dump(raw))
    one = train_cli(cfg, "--out", tmp_path / "one")
    assert one.wait(timeout=300) == 0, one.stderr.read()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "mtlrec.cli", "train", str(cfg), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved") == 1  # one process group: only rank 0 reports and writes
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["test"]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["test"]
    assert m2["auc/y1"] == pytest.approx(m1["auc/y1"], abs=1e-4)  # gathered over the whole split
    assert m2["mse/y2"] == pytest.approx(m1["mse/y2"], rel=1e-3)
