"""Learning-rate schedules and gradient clipping (mtlrec.train.schedules, TrainConfig)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mtlrec import models
from mtlrec.config import ConfigError, Schedule, load_config
from mtlrec.data import TensorData
from mtlrec.experiment import run_experiment
from mtlrec.train.callbacks import TrainingCallback
from mtlrec.train.schedules import Plateau, step_factor
from mtlrec.train.trainer import Trainer
from helpers import dense_schema

BATCHES = 13  # `small`: 1000 rows, 800 for training, in batches of 64


@pytest.fixture
def small(tiny_config):
    """tiny_config on 1000 rows in batches of 64: 13 steps an epoch."""
    raw = with_train(tiny_config, batch_size=64)
    raw["data"]["synthetic"]["rows"] = 1000
    return raw


def with_train(raw, **train):
    return raw | {"train": raw["train"] | train}


class LearningRateRecorder(TrainingCallback):
    """The lr of every optimizer at every step (read after the step: the lr it stepped with)."""

    def __init__(self):
        self.lrs = []

    def on_train_begin(self, trainer):
        self.trainer = trainer

    def on_step_end(self, step, losses, weights):
        self.lrs.append([opt.param_groups[0]["lr"] for opt in self.trainer.optimizers])


# ------------------------------------------------------------------ the factors
def test_cosine_equals_torchs_cosine_annealing():
    total, base = 40, 0.1
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.2 * base)
    schedule = Schedule(name="cosine", min_ratio=0.2)
    for step in range(total):
        assert base * step_factor(schedule, step, 1, total) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        reference.step()


def test_warm_up_is_linear_then_the_cosine_starts():
    warm, total = 4, 12
    schedule = Schedule(name="cosine", warmup_steps=warm)
    factors = [step_factor(schedule, s, 1, total) for s in range(total)]
    assert factors[:warm] == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1.0])
    expected = [(1 + math.cos(math.pi * (s - warm) / (total - warm))) / 2 for s in range(warm, total)]
    assert factors[warm:] == pytest.approx(expected)
    constant = Schedule(warmup_steps=warm)  # warm-up alone
    assert [step_factor(constant, s, 3, total) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_step_decay_cuts_every_n_epochs_and_combines_with_warm_up():
    schedule = Schedule(name="step", every_epochs=2, gamma=0.5, warmup_steps=2)
    assert [step_factor(schedule, 10, e, 100) for e in range(1, 7)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert step_factor(schedule, 0, 3, 100) == 0.5 * 0.5  # warm-up x decay


@pytest.mark.parametrize("metric, scores", [
    ("loss", [1.0, 0.9, 0.95, 0.91, 0.92, 0.85, 0.86, 0.87, 0.88, 0.89, 0.9, 0.91]),
    ("auc/click", [0.6, 0.7, 0.69, 0.7, 0.71, 0.68, 0.65, 0.64, 0.63, 0.62]),
])
def test_plateau_cuts_like_torchs_reduce_on_plateau(metric, scores):
    base, gamma, patience, floor = 0.1, 0.5, 2, 0.1
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min" if metric == "loss" else "max", factor=gamma, patience=patience - 1,
        threshold=0.005, threshold_mode="abs", min_lr=floor * base)
    plateau = Plateau(Schedule(name="plateau", gamma=gamma, patience=patience, min_delta=0.005, min_ratio=floor),
                      sign=-1.0 if metric == "loss" else 1.0)
    for score in scores:
        plateau.observe(score)
        reference.step(score)
        assert base * plateau.factor == pytest.approx(optimizer.param_groups[0]["lr"])
    assert plateau.factor < 1  # the sequences do plateau


# --------------------------------------------------------------- the Trainer
def test_the_trainer_steps_with_the_scheduled_rates_and_logs_them(small):
    raw = with_train(small, epochs=2, lr=0.02, schedule={"name": "cosine", "warmup_steps": 5, "min_ratio": 0.1})
    recorder = LearningRateRecorder()
    result = run_experiment(load_config(raw), callbacks=[recorder])
    total = 2 * BATCHES
    expected = []
    for s in range(total):  # plain: linear warm-up over 5 steps, then cosine from 0.02 to 0.002
        warm = min(1.0, (s + 1) / 5)
        p = max(0, s - 5) / (total - 5)
        expected.append(0.02 * warm * (0.1 + 0.9 * (1 + math.cos(math.pi * p)) / 2))
    assert [lr for lr, in recorder.lrs] == pytest.approx(expected, rel=1e-12)
    assert [row["lr/all"] for row in result.history] == pytest.approx([expected[BATCHES - 1], expected[-1]])


def test_groups_follow_their_own_schedule_else_the_runs(small):
    raw = with_train(small, epochs=3, lr=0.02, schedule={"name": "step", "every_epochs": 1, "gamma": 0.5},
                     optimizers=[{"params": "embedding", "optimizer": "adagrad", "lr": 0.05,
                                  "schedule": {"name": "constant", "warmup_steps": 3}},
                                 {"params": "rest", "lr": 0.01}])
    recorder = LearningRateRecorder()
    history = run_experiment(load_config(raw), callbacks=[recorder]).history
    assert [[r["lr/embedding"], r["lr/rest"]] for r in history] == [[0.05, 0.01], [0.05, 0.005], [0.05, 0.0025]]
    assert [e for e, _ in recorder.lrs[:4]] == pytest.approx([0.05 / 3, 0.1 / 3, 0.05, 0.05])
    assert {r for _, r in recorder.lrs[:BATCHES]} == {0.01}  # no warm-up for 'rest': the run's schedule


def test_plateau_cuts_after_patience_epochs_without_improvement(small):
    # min_delta 1e9: no epoch after the first counts as an improvement, so a cut every `patience` epochs
    raw = with_train(small, epochs=6, lr=0.02, early_stopping={"metric": "auc/y1", "patience": None},
                     schedule={"name": "plateau", "patience": 2, "gamma": 0.5, "min_delta": 1e9, "min_ratio": 0.3})
    history = run_experiment(load_config(raw)).history
    # epochs 2 and 3 wait: x 0.5 from epoch 4; epochs 4 and 5 wait again: x 0.25, but not below 0.3
    assert [r["lr/all"] for r in history] == pytest.approx([0.02, 0.02, 0.02, 0.01, 0.01, 0.006])


def test_plateau_needs_validation_data():
    schema = dense_schema(3)
    model = models.create("mmoe", schema, expert_hidden=[4])
    data = TensorData(torch.zeros(64, 0, dtype=torch.long), torch.randn(64, 3), torch.ones(64, 2),
                      torch.ones(64, 2, dtype=torch.bool))
    cfg = load_config({"train": {"batch_size": 32, "progress": False, "schedule": "plateau"}}).train
    with pytest.raises(ValueError, match="train.schedule: 'plateau' steps on the validation metric 'loss'"):
        Trainer(model, schema, cfg).fit(data)


def test_warm_up_longer_than_the_run_is_an_error(small):
    raw = with_train(small, epochs=1, schedule={"name": "constant", "warmup_steps": BATCHES})
    with pytest.raises(ValueError, match=f"warmup_steps {BATCHES} must be fewer than the run's {BATCHES} steps"):
        run_experiment(load_config(raw))


# ---------------------------------------------------------------- clipping
def grad_norms_at_step(clip, weighting="fixed", steps=1):
    """The total gradient norm (and the gradients) the optimizer sees at its first step(s)."""
    schema = dense_schema(4, tasks=("click", "watch"), types=["binary", "regression"])
    torch.manual_seed(0)
    model = models.create("mmoe", schema, expert_hidden=[8])
    n = 64
    labels = torch.stack([torch.randint(0, 2, (n,)).float(), 100 * torch.randn(n)], 1)  # large regression loss
    data = TensorData(torch.zeros(n, 0, dtype=torch.long), torch.randn(n, 4), labels, torch.ones(n, 2, dtype=torch.bool))
    cfg = load_config({"train": {"batch_size": n, "epochs": steps, "progress": False, "clip_grad_norm": clip,
                                 "weighting": weighting}}).train
    trainer = Trainer(model, schema, cfg)
    seen = []
    optimizer = trainer.optimizers[0]
    step = optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append((torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item(), grads))
        return step(*args, **kwargs)

    optimizer.step = recording_step
    trainer.fit(data)
    return seen


@pytest.mark.parametrize("weighting", ["fixed", "pcgrad"])
def test_clipping_bounds_the_gradient_norm_and_keeps_its_direction(weighting):
    (free, free_grads), = grad_norms_at_step(None, weighting)
    (clipped, clipped_grads), = grad_norms_at_step(free / 10, weighting)
    assert clipped == pytest.approx(free / 10, rel=1e-5)
    for g_free, g_clipped in zip(free_grads, clipped_grads):
        torch.testing.assert_close(g_clipped, g_free / 10, rtol=1e-4, atol=1e-9)
    (loose, loose_grads), = grad_norms_at_step(free * 10, weighting)
    assert loose == free
    assert all(torch.equal(a, b) for a, b in zip(free_grads, loose_grads))


# ------------------------------------------------------------------ resume
class StopAt(TrainingCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, losses, weights):
        if step == self.step:
            raise KeyboardInterrupt(f"stopped at step {step}")


def test_a_resumed_run_with_schedules_and_clipping_equals_an_uninterrupted_one(small, tmp_path):
    raw = with_train(small, epochs=3, lr=0.02, checkpoint_every=5, clip_grad_norm=0.5,
                     early_stopping={"patience": None, "metric": "loss"}, weighting="uncertainty",
                     schedule={"name": "plateau", "patience": 1, "gamma": 0.5, "min_delta": 1e9},
                     optimizers=[{"params": "embedding", "lr": 0.05, "schedule": {"name": "cosine", "warmup_steps": 4}},
                                 {"params": "rest"}])
    config = load_config(raw)
    run_experiment(config, tmp_path / "full")
    stop = 2 * BATCHES + 7  # in epoch 3, after the plateau's cut at the end of epoch 2
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut", callbacks=[StopAt(stop)])
    assert json.loads((tmp_path / "cut.partial" / "checkpoint.json").read_text())["step"] == 30  # in epoch 3
    run_experiment(config, tmp_path / "cut", resume=True)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = lambda f: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                     for line in (tmp_path / f / "epochs.jsonl").read_text().splitlines()]
    assert log("full") == log("cut")
    assert [r["lr/rest"] for r in log("full")] == [0.001, 0.001, 0.0005]  # a cut after every epoch but the first


def test_a_resume_that_changes_the_length_of_a_cosine_schedule_is_refused(small, tmp_path):
    raw = with_train(small, epochs=2, checkpoint_every=5, schedule="cosine")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(raw), tmp_path / "run", callbacks=[StopAt(12)])
    longer = load_config(with_train(raw, epochs=3))
    with pytest.raises(ValueError, match=f"cosine schedule spans the run's {3 * BATCHES} steps.*checkpoint's "
                                         f"{2 * BATCHES}: restore train.epochs"):
        run_experiment(longer, tmp_path / "run", resume=True)
    step = load_config(with_train(raw, epochs=3, schedule={"name": "step", "every_epochs": 1}))
    with pytest.raises(ValueError, match="cannot resume.*train.schedule.every_epochs: None -> 1"):
        run_experiment(step, tmp_path / "run", resume=True)  # schedules are part of the trajectory


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("train, message", [
    ({"schedule": {"name": "cosine", "gamma": 0.5}}, "train.schedule: gamma would be ignored: schedule 'cosine' reads"),
    ({"schedule": "step"}, "train.schedule: schedule 'step' needs every_epochs"),
    ({"schedule": {"name": "linear"}}, "train.schedule.name"),
    ({"schedule": {"name": "plateau", "gamma": 1.0}}, "train.schedule.gamma"),
    ({"optimizers": [{"params": "rest", "schedule": {"name": "constant", "patience": 3}}]},
     "train.optimizers.0.schedule: patience would be ignored"),
    ({"clip_grad_norm": 0}, "train.clip_grad_norm"),
    ({"embedding_tables": "fused", "schedule": "cosine"},
     "with embedding_tables fused the tables update inside fbgemm's kernel at a constant lr"),
    ({"embedding_tables": "fused", "optimizers": [{"params": "embedding", "optimizer": "rowwise_adagrad",
                                                   "schedule": {"name": "constant", "warmup_steps": 10}},
                                                  {"params": "rest"}]}, "which no schedule reaches"),
])
def test_bad_schedule_options_are_errors_naming_the_field(train, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"train": train})


def test_fused_tables_with_a_constant_embedding_group_take_schedules_on_the_other_groups():
    config = load_config({"train": {"embedding_tables": "fused", "schedule": "cosine", "optimizers": [
        {"params": "embedding", "optimizer": "rowwise_adagrad", "schedule": "constant"}, {"params": "rest"}]}})
    assert config.train.optimizers[1].schedule is None and config.train.schedule.name == "cosine"


def test_a_config_with_schedules_survives_its_own_dump(small):
    config = load_config(with_train(small, schedule={"name": "step", "every_epochs": 2}, clip_grad_norm=1.0))
    assert load_config(config.to_dict()) == config  # the model folder's config.yaml holds every field
