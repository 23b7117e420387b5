"""Experiment tracking (mtlrec.train.tracking): the TensorBoard event files and the MLflow store,
read back and compared with the epoch log."""

import json
import sys

import numpy as np
import pytest

from mtlrec.analysis.utilisation import gate_utilisation
from mtlrec.config import ConfigError, load_config
from mtlrec.experiment import load_splits, run_experiment
from mtlrec.train.callbacks import TrainingCallback
from mtlrec.train.tracking import epoch_scalars, flatten_config, mlflow_key

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


@pytest.fixture
def small(tiny_config):
    """tiny_config on 1000 rows in batches of 64: 13 steps an epoch."""
    raw = tiny_config | {"train": tiny_config["train"] | {"epochs": 2, "batch_size": 64}}
    raw["data"]["synthetic"]["rows"] = 1000
    return raw


def tracked(raw, *trackers, **train):
    return load_config(raw | {"train": raw["train"] | {"tracking": list(trackers)} | train})


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def log_of(folder):
    return [json.loads(line) for line in (folder / "epochs.jsonl").read_text().splitlines()]


class StepRecorder(TrainingCallback):
    def __init__(self, stop_at=None):
        self.steps, self.stop_at = {}, stop_at

    def on_step_end(self, step, losses, weights):
        self.steps[step] = (weights * losses).sum().item(), losses.tolist()
        if step == self.stop_at:
            raise KeyboardInterrupt("stop")


def test_tensorboard_events_hold_the_epoch_log_the_step_losses_and_the_gates(small, tmp_path):
    recorder = StepRecorder()
    config = tracked(small, "tensorboard", tracking_every=4)
    result = run_experiment(config, tmp_path / "run", callbacks=[recorder])
    events = scalars(tmp_path / "run" / "tensorboard")
    history = log_of(tmp_path / "run")
    for key in epoch_scalars(history[0]):  # losses, task weights, lr/all, validation metrics, seconds
        assert events[key] == [(r["epoch"], np.float32(r[key])) for r in history], key
    assert {"weight/y1", "lr/all", "valid/auc/y1"} <= set(events)
    steps = sorted(s for s in recorder.steps if s % 4 == 0)
    assert steps == list(range(4, 2 * 13 + 1, 4))
    assert events["step/loss"] == [(s, np.float32(recorder.steps[s][0])) for s in steps]
    assert events["step/loss/y2"] == [(s, np.float32(recorder.steps[s][1][1])) for s in steps]

    # gate utilisation: one tag per (gate, expert) the model has; each gate's mean weights sum to 1
    experts = result.trained.model.backbone.gate_experts
    tags = {f"utilisation/{g}/{e.removeprefix(g.rpartition('/')[0] + '/')}": (g, j)
            for g, names in experts.items() for j, e in enumerate(names)}
    assert {t for t in events if t.startswith("utilisation/")} == set(tags)
    for epoch in (0, 1):
        for gate in experts:
            total = sum(events[t][epoch][1] for t, (g, _) in tags.items() if g == gate)
            assert total == pytest.approx(1.0, abs=1e-5)


def test_gate_utilisation_is_the_mean_gate_weight_over_the_epochs_training_rows(small, tmp_path):
    # lr so small that the weights barely move in an epoch: the mean over the training forward
    # passes equals the analysis module's mean of the trained model over the training rows
    config = tracked(small, "tensorboard", epochs=1, lr=1e-9)
    result = run_experiment(config, tmp_path / "run")
    events = scalars(tmp_path / "run" / "tensorboard")
    means = gate_utilisation(result.trained, load_splits(config).train)
    for gate, names in result.trained.model.backbone.gate_experts.items():
        level = gate.rpartition("/")[0] + "/"
        logged = [events[f"utilisation/{gate}/{e.removeprefix(level)}"][0][1] for e in names]
        np.testing.assert_allclose(logged, means[gate].numpy(), atol=1e-5)


def test_mlflow_store_holds_the_config_the_epoch_metrics_and_the_model_folder(small, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read MLflow 3's file store back
    from mlflow.tracking import MlflowClient

    config = tracked(small, "mlflow")
    run_experiment(config, tmp_path / "run")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())  # the default: beside the run's folder
    experiment = client.get_experiment_by_name("tiny")
    run, = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"] == run.info.run_id

    params = run.data.params
    assert params == flatten_config(config.to_dict())
    assert (params["train.lr"], params["model.expert_hidden"], params["train.tracking"]) == ("0.01", "[16]", '["mlflow"]')
    assert params["features.sparse.0.name"] == config.features.sparse[0].name

    history = log_of(tmp_path / "run")
    for key in epoch_scalars(history[0]):
        logged = client.get_metric_history(run.info.run_id, mlflow_key(key))
        assert [(m.step, m.value) for m in logged] == [(r["epoch"], r[key]) for r in history], key
    assert any(k.startswith("utilisation.level1.") for k in run.data.metrics)

    files = {a.path.removeprefix("model/") for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model.safetensors", "config.yaml", "encoder.json", "epochs.jsonl", "metrics.json", "manifest.json"} <= files
    copy = client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path / "download"))
    assert open(copy, "rb").read() == (tmp_path / "run" / "model.safetensors").read_bytes()


def test_a_failed_run_is_marked_failed(small, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    with pytest.raises(KeyboardInterrupt):
        run_experiment(tracked(small, "mlflow"), tmp_path / "run", callbacks=[StepRecorder(stop_at=3)])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run, = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FAILED"


def test_a_resumed_run_goes_on_in_the_same_event_files_and_mlflow_run(small, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    raw = small | {"train": small["train"] | {"epochs": 3, "checkpoint_every": 5}}
    stop = 13 + 11  # in epoch 2: the checkpoint of step 20 is the last, TensorBoard has the step loss of step 22
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tracked(raw, "tensorboard", tracking_every=2), tmp_path / "run",
                       callbacks=[StepRecorder(stop_at=stop)])
    recorder = StepRecorder()  # tracking may change on resume: mlflow added
    run_experiment(tracked(raw, "tensorboard", "mlflow", tracking_every=2), tmp_path / "run", resume=True,
                   callbacks=[recorder])
    assert min(recorder.steps) == 21
    events, history = scalars(tmp_path / "run" / "tensorboard"), log_of(tmp_path / "run")
    assert events["train/loss"] == [(r["epoch"], np.float32(r["train/loss"])) for r in history]
    assert [s for s, _ in events["step/loss"]] == list(range(2, 3 * 13 + 1, 2))  # the cut run's step 22 purged
    assert events["step/loss"][-1] == (38, np.float32(recorder.steps[38][0]))
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run, = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    logged = client.get_metric_history(run.info.run_id, "valid.loss")
    assert [(m.step, m.value) for m in logged] == [(r["epoch"], r["valid/loss"]) for r in history]  # epoch 1 too


def test_missing_packages_are_an_error_naming_the_extra_before_training(small, tmp_path, monkeypatch):
    for module in ("mlflow", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails
    recorder = StepRecorder()
    with pytest.raises(ImportError, match=r"train.tracking \['mlflow'\] needs mlflow: pip install 'mtlrec\[track\]'"):
        run_experiment(tracked(small, "tensorboard", "mlflow"), tmp_path / "run", callbacks=[recorder])
    assert recorder.steps == {}


def test_trackers_need_the_runs_folder(small):
    with pytest.raises(ValueError, match=r"writes under the run's folder: give run_experiment a folder"):
        run_experiment(tracked(small, "tensorboard"))
    with pytest.raises(ValueError, match=r"or set train.mlflow_uri"):
        run_experiment(tracked(small, "mlflow"))


def test_a_tracking_uri_mlflow_cannot_open_is_an_error_naming_the_field(small, tmp_path):
    with pytest.raises(ValueError, match=r"train.mlflow_uri 'nowhere://x': MLflow cannot open it"):
        run_experiment(tracked(small, "mlflow", mlflow_uri="nowhere://x"), tmp_path / "run")


@pytest.mark.parametrize("train, message", [
    ({"tracking": ["wandb"]}, "train.tracking.0"),
    ({"tracking": ["mlflow", "mlflow"]}, "names a tracker twice"),
    ({"tracking_every": 5}, "train.tracking_every is read by the tensorboard tracker only"),
    ({"tracking": ["tensorboard"], "mlflow_uri": "sqlite:///x.db"}, "train.mlflow_uri is read by the mlflow tracker"),
    ({"tracking": ["tensorboard"], "tracking_every": 0}, "train.tracking_every"),
])
def test_bad_tracking_options_are_errors_naming_the_field(train, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"train": train})


def test_the_config_module_imports_no_tracker():
    code = ("import sys, mtlrec.config; "
            "print(any(m in sys.modules for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard')))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_tracking_settings_may_change_on_resume_but_schedules_may_not():
    from mtlrec.train.checkpoint import check_resumable

    base = load_config({}).to_dict()
    changed = load_config({"train": {"tracking": ["mlflow"], "mlflow_uri": "sqlite:///m.db"}}).to_dict()
    check_resumable(base, changed, "runs/x.partial")
    with pytest.raises(ValueError, match="train.schedule.name: 'constant' -> 'cosine'"):
        check_resumable(base, load_config({"train": {"schedule": "cosine"}}).to_dict(), "runs/x.partial")
