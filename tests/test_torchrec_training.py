"""Training with TorchRec's tables: fused on one process, and sharded over 2 gloo processes,
reach the weights of plain tables trained with the same optimizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("torchrec", reason="TorchRec is not installed (make install adds it)")

from helpers import wait_for_checkpoint_inside_epoch  # noqa: E402
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
PLAIN_REST = {"optimizers": [{"params": "rest", "optimizer": "adam", "lr": 0.01}]}


def test_a_model_with_more_embeddings_than_one_refuses_fused_tables(tmp_path):
    raw = config(tmp_path, embedding_tables="fused", **FUSED)
    raw["model"] = {"name": "stem", "expert_hidden": [8], "tower_hidden": [4]}  # T + 1 embeddings
    with pytest.raises(ValueError, match=r"more embedding tables \(task_embeddings.0, task_embeddings.1\)"):
        run_experiment(load_config(raw))


def test_fused_tables_train_as_plain_tables_with_the_same_optimizer(tmp_path):
    plain = run_experiment(load_config(config(tmp_path, **PLAIN)), tmp_path / "plain")
    fused = run_experiment(load_config(config(tmp_path, embedding_tables="fused", **FUSED)), tmp_path / "fused")
    a, b = plain.trained.model.state_dict(), fused.trained.model.state_dict()
    assert a.keys() == b.keys()  # the model folder keeps the plain layout
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)
    assert fused.test_metrics["auc/y1"] == pytest.approx(plain.test_metrics["auc/y1"], abs=1e-4)


def test_the_embedding_optimizer_group_sets_the_fused_tables_optimizer(tmp_path):
    grouped = {"optimizers": [{"params": "embedding", "optimizer": "sgd", "lr": 0.5},
                              {"params": "rest", "optimizer": "adam", "lr": 0.01}]}
    by_group = run_experiment(load_config(config(tmp_path, embedding_tables="fused", **grouped)))
    by_field = run_experiment(load_config(config(tmp_path, embedding_tables="fused", **FUSED, **PLAIN_REST)))
    for name, value in by_field.trained.model.state_dict().items():
        torch.testing.assert_close(by_group.trained.model.state_dict()[name], value, atol=0, rtol=0)
    rowwise = {"optimizers": [{"params": "embedding", "optimizer": "rowwise_adagrad", "lr": 0.1}]}
    assert load_config(config(tmp_path, embedding_tables="fused", **rowwise)).train.table_optimizer == (
        "rowwise_adagrad", 0.1)
    with pytest.raises(Exception, match="rowwise_adagrad is fbgemm's fused-table optimizer"):
        load_config(config(tmp_path, **rowwise))
    with pytest.raises(Exception, match="one of \\['sgd', 'adagrad', 'rowwise_adagrad'\\], not 'adam'"):
        load_config(config(tmp_path, embedding_tables="fused", optimizers=[{"params": "embedding"}]))
    with pytest.raises(Exception, match="set twice"):
        load_config(config(tmp_path, embedding_tables="fused", embedding_optimizer="sgd", **grouped))


def test_fused_tables_train_alternating_steps_as_plain_tables(tmp_path):
    steps = {"strategy": "alternating", "epochs": 1}
    plain = run_experiment(load_config(config(tmp_path, **PLAIN, **steps)))
    fused = run_experiment(load_config(config(tmp_path, embedding_tables="fused", **FUSED, **steps)))
    a, b = plain.trained.model.state_dict(), fused.trained.model.state_dict()
    for name in a:  # a step on one task's loss: the shared tables take that task's gradient either way
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)


def test_gradient_methods_with_fused_tables_act_on_the_dense_shared_parameters(tmp_path):
    from mtlrec.experiment import encode_splits
    from mtlrec.trained import TrainedModel
    from mtlrec.train.trainer import Trainer

    cfg = load_config(config(tmp_path, embedding_tables="fused", weighting="pcgrad", **FUSED))
    encoded = encode_splits(cfg)
    encoder, train, valid = encoded.encoder, encoded.train, encoded.valid
    torch.manual_seed(cfg.seed)
    trainer = Trainer(TrainedModel.build(cfg, encoder).model, encoder.schema, cfg.train, seed=cfg.seed)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    shared = [names[id(p)] for p in trainer.shared.params]
    assert shared and not any(".embedding_bags." in n for n in shared)  # the fused tables are left out
    assert any(n.startswith("backbone.") for n in shared)  # the experts are in
    before = trainer.model.embedding.table_weights()["c0"].detach().clone()
    history = trainer.fit(train, valid)
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert not torch.equal(before, trainer.plain_model.embedding.tables[0].weight[:len(before)])  # tables moved


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, timeout=400, env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_two_processes_with_sharded_tables_train_alternating_steps_as_one_fused(tmp_path):
    one = run_experiment(load_config(config(tmp_path, embedding_tables="fused", strategy="alternating", **FUSED)))
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, embedding_sharding="row_wise", strategy="alternating", **FUSED)))
    two = torchrun("-m", "mtlrec.cli", "train", str(path), "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-4000:]
    saved = load_file(str(tmp_path / "two" / "model.safetensors"))
    for name, value in one.trained.model.state_dict().items():  # other tasks' parameters untouched by a step
        torch.testing.assert_close(saved[name], value, atol=2e-5, rtol=1e-4)


def test_two_processes_with_sharded_tables_and_pcgrad_stay_one_model(tmp_path):
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, embedding_sharding="row_wise", weighting="pcgrad", **FUSED)))
    done = torchrun(str(Path(__file__).parent / "workers" / "sharded_gradient_method.py"), str(path), str(tmp_path))
    assert done.returncode == 0, done.stderr[-4000:]
    a, b = (torch.load(tmp_path / f"dense{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)
    for name in a:  # each process's surgery is averaged after DistributedDataParallel's reduction
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


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


def test_fused_tables_resume_to_the_same_weights(tmp_path, monkeypatch):
    from test_reliability import interrupted_run

    raw = config(tmp_path, embedding_tables="fused", embedding_optimizer="rowwise_adagrad", embedding_lr=0.1,
                 checkpoint_every=7, epochs=3)
    whole = run_experiment(load_config(raw), tmp_path / "whole")
    interrupted_run(raw, tmp_path / "m", monkeypatch)  # stopped in epoch 2
    assert list((tmp_path / "m.partial").glob("tables-*"))  # the tables' state beside checkpoint.pt
    resumed = run_experiment(load_config(raw), tmp_path / "m", resume=True)
    for name, value in whole.trained.model.state_dict().items():
        torch.testing.assert_close(resumed.trained.model.state_dict()[name], value, atol=0, rtol=0)
    assert not list((tmp_path / "m").glob("tables-*"))  # a finished run keeps no checkpoint


def kill_every_process_naming(text: str) -> None:
    """SIGKILL every process whose command line holds `text`, as a machine failure would."""
    import signal

    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def test_two_processes_killed_mid_epoch_resume_to_the_same_weights(tmp_path):

    raw = config(tmp_path, embedding_sharding="row_wise", embedding_optimizer="rowwise_adagrad", embedding_lr=0.1,
                 checkpoint_every=5, epochs=3)
    raw["data"]["synthetic"]["rows"] = 4000
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(raw))

    def launch(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "mtlrec.cli", "train", str(path), "--out", str(tmp_path / out), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env=os.environ | {"OMP_NUM_THREADS": "1"})

    full = launch("full")
    assert full.wait(timeout=400) == 0, full.stderr.read()[-3000:]
    victim = launch("killed")
    wait_for_checkpoint_inside_epoch(tmp_path / "killed.partial" / "checkpoint.json")  # then kill it
    assert victim.poll() is None, "the run ended before it could be killed"
    kill_every_process_naming(str(tmp_path / "killed"))  # torchrun and its workers (their own sessions)
    victim.wait()
    resumed = launch("killed", "--resume")
    assert resumed.wait(timeout=400) == 0, resumed.stderr.read()[-3000:]
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)
