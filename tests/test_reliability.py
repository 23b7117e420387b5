"""Nothing silent, nothing lost: resume checks the config, model folders are whole or absent,
contradictory options are config errors, and the command line ends in one line, not a traceback."""

import copy
import random

import pytest
import torch
import yaml

from mtlrec import models
from mtlrec.cli import main
from mtlrec.config import ConfigError, load_config
from mtlrec.experiment import run_experiment
from mtlrec.folders import FolderExists
from mtlrec.trained import TrainedModel, load
from mtlrec.train.trainer import Trainer


@pytest.fixture
def config(tiny_config):
    raw = copy.deepcopy(tiny_config)
    raw["train"] |= {"epochs": 2, "checkpoint_every": 10}
    raw["data"]["synthetic"]["rows"] = 1500
    return raw


def interrupted_run(raw, folder, monkeypatch, at_epoch=2):
    """Run until the validation of epoch `at_epoch`, then stop as Ctrl-C would."""
    calls = {"n": 0}
    evaluate = Trainer.evaluate

    def stop_on_second(self, data):
        calls["n"] += 1
        if calls["n"] == at_epoch:
            raise KeyboardInterrupt
        return evaluate(self, data)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "evaluate", stop_on_second)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(load_config(raw), folder)


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("change, listed", [
    ({"train": {"batch_size": 64}}, "train.batch_size: 128 -> 64"),
    ({"train": {"lr": 0.1}}, "train.lr: 0.01 -> 0.1"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer: 'adam' -> 'sgd'"),
    ({"model": {"name": "mmoe", "expert_hidden": [16]}}, "model.name: 'ple' -> 'mmoe'"),
    ({"seed": 4}, "seed: 3 -> 4"),
])
def test_resume_refuses_a_changed_trajectory_and_lists_the_fields(config, tmp_path, monkeypatch, change, listed):
    interrupted_run(config, tmp_path / "m", monkeypatch)
    changed = copy.deepcopy(config)
    for block, values in change.items():
        changed[block] = changed[block] | values if isinstance(values, dict) and block != "model" else values
    with pytest.raises(ValueError, match="cannot resume .*" + listed.replace("(", r"\(")):
        run_experiment(load_config(changed), tmp_path / "m", resume=True)


def resumed_equals_whole(raw, folder, monkeypatch):
    """Train `raw` whole in folder/whole and, interrupted in epoch 2 then resumed, in folder/m;
    assert the two end with equal weights; return (whole run, resumed run)."""
    whole = run_experiment(load_config(raw), folder / "whole")
    interrupted_run(raw, folder / "m", monkeypatch)  # stopped in epoch 2
    resumed = run_experiment(load_config(raw), folder / "m", resume=True)
    for name, value in whole.trained.model.state_dict().items():
        assert torch.equal(value, resumed.trained.model.state_dict()[name]), name
    return whole, resumed


def test_resume_may_add_epochs_and_ends_like_one_run(config, tmp_path, monkeypatch):
    whole = run_experiment(load_config(config | {"train": config["train"] | {"epochs": 3}}), tmp_path / "whole")
    interrupted_run(config, tmp_path / "m", monkeypatch)  # a 2-epoch run stopped in epoch 2
    longer = config | {"train": config["train"] | {"epochs": 3, "progress": True}}
    resumed = run_experiment(load_config(longer), tmp_path / "m", resume=True)
    assert len(resumed.history) == 3
    for name, value in whole.trained.model.state_dict().items():
        assert torch.equal(value, resumed.trained.model.state_dict()[name]), name
    assert not (tmp_path / "m.partial").exists() and (tmp_path / "m" / "manifest.json").exists()
    assert not (tmp_path / "m" / "checkpoint.pt").exists()  # a finished run has nothing to resume


def test_a_fresh_run_does_not_silently_drop_an_unfinished_one(config, tmp_path, monkeypatch):
    interrupted_run(config, tmp_path / "m", monkeypatch)
    with pytest.raises(FolderExists, match=r"m.partial holds an unfinished run; pass --resume"):
        run_experiment(load_config(config), tmp_path / "m")
    run_experiment(load_config(config), tmp_path / "m", overwrite=True)
    load(tmp_path / "m")


# ---------------------------------------------------------------- model folders
def test_an_existing_model_folder_is_replaced_only_when_asked_and_only_once_whole(config, tmp_path, monkeypatch):
    first = run_experiment(load_config(config), tmp_path / "m")
    log = (tmp_path / "m" / "epochs.jsonl").read_text()
    with pytest.raises(FolderExists, match="already exists; pass --overwrite"):
        run_experiment(load_config(config), tmp_path / "m")
    interrupted_run(config | {"seed": 9}, tmp_path / "other", monkeypatch)  # unrelated folder
    # a retrain that fails while saving (a full disk) leaves the old model and its log as they were
    def full_disk(self, folder):
        raise OSError(27, "File too large")
    monkeypatch.setattr(TrainedModel, "write_files", full_disk)
    with pytest.raises(OSError, match="File too large"):
        run_experiment(load_config(config | {"seed": 5}), tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "epochs.jsonl").read_text() == log
    kept = load(tmp_path / "m")
    for name, value in first.trained.model.state_dict().items():
        assert torch.equal(value, kept.model.state_dict()[name])
    assert (tmp_path / "m.partial" / "checkpoint.pt").exists()  # the failed run can still be resumed


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1])), "does not match its sha256"),
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "does not match its sha256"),
])
def test_a_damaged_weight_file_is_an_error_not_garbage(config, tmp_path, damage, message):
    run_experiment(load_config(config), tmp_path / "m")
    damage(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        load(tmp_path / "m")
    assert main(["predict", str(tmp_path / "m"), "x.csv", "--out", str(tmp_path / "p.csv")]) == 2


# ------------------------------------------------------------ contradictions
@pytest.mark.parametrize("change, message", [
    ({"train": {"strategy": "alternating", "weighting": "gradnorm"}}, "weighting 'gradnorm' would be ignored"),
    ({"train": {"strategy": "alternating", "weighting": "pcgrad"}}, "weighting 'pcgrad' would be ignored"),
    ({"train": {"strategy": "alternating", "weighting": "uncertainty"}}, "weighting 'uncertainty' would be ignored"),
    ({"train": {"weighting": {"name": "decay", "gamma": -0.5}}}, "decay gamma must be >= 0"),
    ({"train": {"weighting": {"name": "dwa", "temperature": 0}}}, "dwa temperature must be > 0"),
    ({"train": {"weighting": {"name": "gradnorm", "alpha": -1}}}, "gradnorm alpha must be >= 0"),
    ({"train": {"alternating": {"ratios": [1, 2]}}}, "ratios is read with order 'ratio' only"),
    ({"model": {"name": "aitm", "calibration": -1}}, "calibration: Input should be greater than or equal to 0"),
    ({"model": {"name": "ple", "expert_hidden": [0]}}, "option expert_hidden"),
    ({"model": {"name": "ple", "tower_hidden": [0]}}, "option tower_hidden"),
    ({"model": {"name": "ple", "dropout": 1.0}}, "option dropout: Input should be less than 1"),
    ({"model": {"name": "mmoe", "num_experts": 2.5}}, "option num_experts: Input should be a valid integer"),
    ({"tasks": [{"name": "y1", "weight": 0}, {"name": "y2", "type": "regression", "weight": 0}]},
     "every task has weight 0"),
])
def test_contradictory_options_are_config_errors(tiny_config, change, message):
    raw = copy.deepcopy(tiny_config)
    for block, values in change.items():
        raw[block] = raw[block] | values if block == "train" else values
    with pytest.raises(ConfigError, match=message):
        load_config(raw)


# --------------------------------------------------------------- command line
def cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_command_line_errors_are_one_line(tiny_config, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    cases = [
        (["train", path, "--set", "train.lr=[1,"], "override 'train.lr=[1,': the value is not valid YAML"),
        (["train", path, "--set", "train.device=gpu7"], "train.device 'gpu7' is not a device"),
        (["bench", path, "--seeds", "0"], "a bench needs at least one seed and one model"),
        (["bench", path, "--models", ""], "a bench needs at least one seed and one model"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", path, "--set", "train.device=cuda"], "CUDA is not available"))
    for args, message in cases:
        code, err = cli(args, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
        assert err.count("\n") == 1


def test_ctrl_c_ends_with_where_to_resume(tiny_config, tmp_path, capsys, monkeypatch):
    raw = tiny_config | {"train": tiny_config["train"] | {"checkpoint_every": 5}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    interrupted_run(raw, tmp_path / "m", monkeypatch)
    monkeypatch.setattr("mtlrec.experiment.run_experiment", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = cli(["train", path, "--out", tmp_path / "m", "--resume"], capsys)
    assert code == 130 and f"interrupted; checkpoint at {tmp_path / 'm.partial'} (continue with --resume)" in err


# ------------------------------------------------------------- config fuzzer
VALUES = [None, True, -1, 0, 1, 2.5, 1e300, float("nan"), "", "x", "@os.system('x')", [], [0], [1, "a"], {},
          {"name": 1}, "1e5", 10**30]


def mutate(raw, rng):
    """One random edit somewhere in a nested config: drop, replace or add a key."""
    raw = copy.deepcopy(raw)
    node, path = raw, []
    while isinstance(node, dict) and node and rng.random() < 0.7:
        key = rng.choice(sorted(node, key=str))
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.4:
            break
        path.append(key)
        node = node[key] if isinstance(node[key], dict) else node[key][0] if node[key] else node
    if not isinstance(node, dict):
        return raw
    action = rng.choice(["drop", "set", "add"])
    keys = sorted(node, key=str)
    if action == "drop" and keys:
        del node[rng.choice(keys)]
    elif action == "set" and keys:
        node[rng.choice(keys)] = copy.deepcopy(rng.choice(VALUES))
    else:
        node[rng.choice(["extra", "epochs", "space", "type", "weight", "name"])] = copy.deepcopy(rng.choice(VALUES))
    return raw


def test_config_fuzzer_ends_in_a_config_or_a_named_error(tiny_config):
    rng = random.Random(0)
    base = copy.deepcopy(tiny_config) | {"tasks": [{"name": "y1"}, {"name": "y2", "type": "regression",
                                                                     "space": "x3 > 0"}],
                                         "features": {"sparse": [{"name": "c0"}], "dense": [{"name": "x3"}]}}
    outcomes = {"valid": 0, "error": 0}
    for _ in range(300):
        raw = mutate(mutate(base, rng), rng)
        try:
            cfg = load_config(raw)
        except ConfigError as err:
            assert str(err).startswith("invalid config") or "override" in str(err)
            outcomes["error"] += 1
            continue
        outcomes["valid"] += 1
        schema = cfg.schema.model_copy(update={"sparse": [f.model_copy(update={"vocab_size": 5})
                                                          for f in cfg.schema.sparse]})
        try:  # a valid config builds its model, or names what does not fit
            models.create(cfg.model.name, schema, **cfg.model.options)
        except ValueError:
            pass
    assert outcomes["valid"] > 30 and outcomes["error"] > 30, outcomes


def test_data_errors_name_the_split_and_its_file(tmp_path):
    import numpy as np
    import pandas as pd

    from mtlrec.data import DataError
    from mtlrec.experiment import encode_splits

    table = pd.DataFrame({"x": np.arange(100.0), "y": [0.0, 1.0] * 50})
    table.to_csv(tmp_path / "train.csv", index=False)
    table.assign(y=table["y"].where(table.index != 7, 3.0)).to_csv(tmp_path / "valid.csv", index=False)
    raw = {"data": {"source": "files", "train": str(tmp_path / "train.csv"), "valid": str(tmp_path / "valid.csv")},
           "features": {"dense": [{"name": "x"}]}, "tasks": [{"name": "y"}]}
    with pytest.raises(DataError, match=r"^valid split \(.*valid.csv\): label column 'y' must be 0 or 1: row 7 holds 3$"):
        encode_splits(load_config(raw))
    raw["data"] = {"source": "files", "train": str(tmp_path / "valid.csv")}
    with pytest.raises(DataError, match=r"^train split \(part of .*valid.csv, the rest cut into other splits; "
                                        r"rows counted within the split\)"):
        encode_splits(load_config(raw))


@pytest.mark.parametrize("weighting", sorted(__import__("mtlrec.losses", fromlist=["WEIGHTINGS"]).WEIGHTINGS))
def test_every_weighting_resumes_to_the_weights_of_an_uninterrupted_run(config, tmp_path, monkeypatch, weighting):
    if weighting == "imtl":
        weighting = {"name": "imtl", "mode": "gradient"}  # IMTL-L needs positive losses; regression ones may not be
    raw = config | {"train": config["train"] | {"weighting": weighting, "checkpoint_every": 7,
                                                "early_stopping": {"patience": None}}}
    whole = run_experiment(load_config(raw), tmp_path / "whole")
    interrupted_run(raw, tmp_path / "m", monkeypatch)
    resumed = run_experiment(load_config(raw), tmp_path / "m", resume=True)
    for name, value in whole.trained.model.state_dict().items():
        assert torch.equal(value, resumed.trained.model.state_dict()[name]), name
