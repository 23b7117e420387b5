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


# ------------------------------------------------------------------ the step recorded as a CUDA graph
def _trained(tiny_config, graph: str, model=None, **train):
    """A run on CUDA, recorded or eager; both with the fused Adam a recorded step uses."""
    raw = tiny_config | {"train": tiny_config["train"] | {"device": "cuda", "cuda_graph": graph,
                                                          "fused_optimizer": True} | train}
    raw["model"] = raw["model"] | (model or {})
    return run_experiment(load_config(raw))


@pytest.mark.parametrize("model, train", [
    ({}, {}),
    ({}, {"weighting": "uncertainty", "clip_grad_norm": 1.0}),
    ({}, {"schedule": {"name": "cosine", "warmup_steps": 5}, "precision": "bf16"}),
    ({"batch_norm": True}, {"weighting": {"name": "decay", "per": "step", "gamma": 0.99}}),
])
def test_recorded_steps_train_the_weights_eager_steps_do(tiny_config, model, train):
    eager, graphed = _trained(tiny_config, "off", model, **train), _trained(tiny_config, "on", model, **train)
    for (name, a), b in zip(eager.trained.model.state_dict().items(), graphed.trained.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
    for row_e, row_g in zip(eager.history, graphed.history, strict=True):
        assert row_g["train/loss"] == pytest.approx(row_e["train/loss"], rel=1e-4)
        assert row_g["lr/all"] == pytest.approx(row_e["lr/all"])


def _trainer(tiny_config, **train):
    from mtlrec import models
    from mtlrec.experiment import encode_splits
    from mtlrec.train.trainer import Trainer

    config = load_config(tiny_config | {"train": tiny_config["train"] | {"device": "cuda", "cuda_graph": "on"} | train})
    encoded = encode_splits(config)
    schema = encoded.encoder.schema
    model = models.create(config.model.name, schema, **config.model.options)
    return Trainer(model, schema, config.train, seed=config.seed), encoded.train


def test_a_recorded_epoch_replays_every_full_batch_and_runs_the_last_eagerly(tiny_config):
    trainer, train = _trainer(tiny_config, epochs=2)
    trainer.fit(train)
    full, last = divmod(len(train), trainer.config.batch_size)
    assert trainer._graphed_update.replays == 2 * full - trainer._graphed_update.warmup
    assert trainer.global_step == 2 * (full + (last > 0))


def test_recorded_steps_do_not_wait_for_the_device(tiny_config):
    trainer, train = _trainer(tiny_config, epochs=1)
    trainer.fit(train)  # warmed up and recorded
    index = torch.arange(trainer.config.batch_size, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            trainer._step(index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer._graphed_update.replays > 5


def test_recorded_prediction_equals_eager(tiny_config):
    from mtlrec.experiment import load_splits

    trained = _trained(tiny_config, "on", epochs=1).trained
    test = load_splits(load_config(tiny_config)).test
    trained.model.to("cuda")
    graphed = trained.predict(test, batch_size=256)
    trained.config = trained.config.model_copy(update={"train": trained.config.train.model_copy(
        update={"cuda_graph": "off"})})
    eager = trained.predict(test, batch_size=256)
    assert graphed.shape == eager.shape
    assert torch.allclose(torch.tensor(graphed.values), torch.tensor(eager.values), atol=1e-6)
