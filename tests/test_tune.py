"""Hyperparameter search (mtlrec.tune, `mtlrec tune`): the values drawn, the study continued,
trials pruned, and the best config that trains the best trial again."""

import doctest
import json
import sys

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from mtlrec.cli import main  # noqa: E402
from mtlrec.config import ConfigError, load_config  # noqa: E402
from mtlrec.experiment import run_experiment  # noqa: E402
from mtlrec.tune import STUDY_FILE, TrialReporter, run_search  # noqa: E402

State = optuna.trial.TrialState


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (tests/conftest.py)


def tuned(tiny_config, space, **tune):
    """tiny_config for 2 epochs, with a tune section."""
    return tiny_config | {"train": tiny_config["train"] | {"epochs": 2}, "tune": {"space": space, **tune}}


def study_in(out, name="tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / STUDY_FILE}")


def quiet(_):
    pass


def test_values_drawn_lie_in_the_space_and_the_best_config_trains_the_best_trial_again(tiny_config, tmp_path):
    space = {"train.lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True},
             "model.expert_hidden": {"choices": [[8], [16, 8]]},
             "train.batch_size": {"low": 64, "high": 256, "step": 64}}
    # judged by auc/y1 at the epoch early stopping (on the loss) keeps
    raw = tuned(tiny_config, space, metric="auc/y1", pruner="none")
    config = load_config(raw | {"train": raw["train"] | {"progress": True}})
    lines = []
    result = run_search(config, 3, tmp_path / "out", log=lines.append, note=quiet)
    assert [line.split()[:2] for line in lines] == [["trial", "0"], ["trial", "1"], ["trial", "2"]]

    trials = study_in(tmp_path / "out").trials
    assert [t.state for t in trials] == [State.COMPLETE] * 3
    for t in trials:
        values = t.user_attrs["values"]
        assert 1.0e-3 <= values["train.lr"] <= 3.0e-2
        assert values["model.expert_hidden"] in ([8], [16, 8])
        assert values["train.batch_size"] in (64, 128, 192, 256)
        drawn = t.distributions["train.lr"]
        assert isinstance(drawn, optuna.distributions.FloatDistribution) and drawn.log
        assert t.distributions["train.batch_size"].step == 64
        assert t.params["model.expert_hidden"] == json.dumps(values["model.expert_hidden"])  # offered as text
    assert len({t.user_attrs["values"]["train.lr"] for t in trials}) == 3
    best = max(trials, key=lambda t: t.value)  # AUC: higher is better
    assert result.best_number == best.number and result.best_value == best.value
    assert result.best_values == best.user_attrs["values"]

    written = load_config(result.best_config)
    assert written.train.lr == result.best_values["train.lr"]
    assert written.train.batch_size == result.best_values["train.batch_size"]
    assert written.model.options["expert_hidden"] == result.best_values["model.expert_hidden"]
    assert written.tune is not None and written.train.progress  # the user's own setting; the search can go on
    history = run_experiment(written).history
    kept = min(range(len(history)), key=lambda i: history[i]["valid/loss"])  # early stopping on the loss
    assert history[kept]["valid/auc/y1"] == pytest.approx(result.best_value, rel=1e-9)


def test_a_continued_search_counts_the_trials_the_study_finished(tiny_config, tmp_path):
    config = load_config(tuned(tiny_config, {"train.lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True}}))
    out = tmp_path / "out"
    first = run_search(config, 2, out, log=quiet, note=quiet)
    assert (first.ran, first.finished) == (2, 2)
    again = run_search(config, 3, out, log=quiet, note=quiet)
    assert (again.ran, again.finished) == (1, 3)
    lrs = [t.user_attrs["values"]["train.lr"] for t in study_in(out).trials]
    assert len(lrs) == 3 and lrs[2] not in lrs[:2]  # the continued sampler does not draw the first trials again
    assert run_search(config, 3, out, log=quiet, note=quiet).ran == 0
    notes = []
    timed = run_search(config, 10, out, timeout=1e-9, log=quiet, note=notes.append)
    assert (timed.ran, timed.finished) == (0, 3) and "--timeout 1e-09 s reached" in notes[0]

    study_in(out).ask()  # a trial left running, as by a killed search: it does not count
    assert run_search(config, 4, out, log=quiet, note=quiet).ran == 1
    assert [t.state for t in study_in(out).trials].count(State.RUNNING) == 1

    changed = load_config(tuned(tiny_config, config.tune.model_dump()["space"]) | {"seed": 4})
    with pytest.raises(ValueError, match=r"differs from the one it began with in seed: 3 -> 4"):
        run_search(changed, 5, out, log=quiet, note=quiet)
    over = run_search(changed, 1, out, overwrite=True, log=quiet, note=quiet)
    assert (over.ran, over.finished, len(study_in(out).trials)) == (1, 1, 1)


@pytest.mark.parametrize("metric,good,bad", [("loss", [0.6, 0.5], [0.9, 0.8]), ("auc/y1", [0.7, 0.8], [0.6, 0.65])])
def test_the_reporter_prunes_a_trial_worse_than_the_median(metric, good, bad):
    direction = "minimize" if metric == "loss" else "maximize"
    study = optuna.create_study(direction=direction, pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = TrialReporter(study.ask(), metric, valid=None, combine={})
    for epoch, value in enumerate(good, 1):
        first.on_epoch_end({"epoch": epoch, f"valid/{metric}": value})  # the first trial: nothing to compare with
    study.tell(first.trial, good[-1])
    better = TrialReporter(study.ask(), metric, valid=None, combine={})
    better.on_epoch_end({"epoch": 1, f"valid/{metric}": good[0]})  # as good as the median: goes on
    worse = TrialReporter(study.ask(), metric, valid=None, combine={})
    with pytest.raises(optuna.TrialPruned, match=f"pruned at epoch 1 \\({metric} {bad[0]}\\)"):
        worse.on_epoch_end({"epoch": 1, f"valid/{metric}": bad[0]})
    assert study.trials[2].intermediate_values == {1: bad[0]}  # the epoch's value, told to the study


def test_a_search_prunes_a_trial_that_trails_and_counts_it(tiny_config, tmp_path):
    config = load_config(tuned(tiny_config, {"train.lr": {"low": 1.0e-7, "high": 3.0e-2, "log": True}},
                               pruner_startup_trials=1, pruner_warmup_epochs=0))
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{out / STUDY_FILE}")
    study.enqueue_trial({"train.lr": 2.0e-2})  # a good learning rate first, then one that barely moves
    study.enqueue_trial({"train.lr": 1.0e-7})
    lines = []
    result = run_search(config, 2, out, log=lines.append, note=quiet)
    assert [t.state for t in study_in(out).trials] == [State.COMPLETE, State.PRUNED]
    assert "pruned at epoch 1 (loss " in lines[1]
    assert (result.finished, result.best_number, result.best_values) == (2, 0, {"train.lr": 2.0e-2})


def test_a_diverging_trial_fails_counted_and_a_search_without_a_value_writes_nothing(tiny_config, tmp_path):
    config = load_config(tuned(tiny_config, {"train.lr": {"choices": [1.0e8, 1.0e9]}}))
    lines = []
    with pytest.raises(ValueError, match="no trial of the study 'tiny' .* finished with a value"):
        run_search(config, 1, tmp_path / "out", log=lines.append, note=quiet)
    assert "failed: task" in lines[0] and "non-finite loss" in lines[0]
    (trial,) = study_in(tmp_path / "out").trials
    assert trial.state == State.FAIL and "non-finite" in trial.user_attrs["failed"]
    assert not (tmp_path / "out" / "tune_best.yaml").exists()


@pytest.mark.parametrize("space,extra,named", [
    ({"train.lrr": {"low": 1.0e-3, "high": 1.0e-2}}, {}, "'train.lrr'.*unknown field"),
    ({"train.lr": {"low": 0, "high": 1.0e-2}}, {}, "'train.lr': the value 0 .*greater than 0"),
    ({"train.lr": {"low": 1.0e-2, "high": 1.0e-3}}, {}, "train.lr: low must be < high"),
    ({"train.lr": {"low": 0.0, "high": 1.0e-2, "log": True}}, {}, "train.lr: log needs low > 0"),
    ({"train.lr": {"choices": []}}, {}, "train.lr: choices is empty"),
    ({"train.lr": {"choices": [0.1], "low": 0.1}}, {}, "train.lr: give either choices or low and high"),
    ({"train.batch_size": {"low": 64, "high": 200, "step": 64}}, {}, "batch_size: high - low must be a multiple"),
    ({"model.task_experts": {"low": 1.5, "high": 3}}, {}, "'model.task_experts': the value 1.5"),
    ({"model.num_experts": {"low": 2, "high": 4}}, {}, "'model.num_experts'.*model 'ple' has no option"),
    ({"models.mmoe.num_experts": {"low": 0, "high": 4}}, {}, "'models.mmoe.num_experts': the value 0"),
    ({"data.synthetic.rows": {"low": 100, "high": 200}}, {}, "'data.synthetic.rows': the trials share one"),
    ({"model.name": {"choices": ["mmoe", "ple"]}}, {}, "'model.name': name one field"),
    ({"models.mmoe": {"choices": [{}]}}, {}, "'models.mmoe': name one field"),
    ({"rank.weights.y1": {"low": 1, "high": 2}}, {}, "'rank.weights.y1': only fields that change training"),
    ({"train.lr": {"low": 1.0e-3, "high": 1.0e-2}}, {"metric": "auc/y9"}, "tune.metric 'auc/y9' is not one of"),
])
def test_a_bad_space_fails_when_the_config_loads_naming_the_key(tiny_config, space, extra, named):
    with pytest.raises(ConfigError, match=named):
        load_config(tuned(tiny_config, space, **extra))


def test_a_bench_model_is_searched_and_its_best_options_go_to_models(tiny_config, tmp_path, capsys):
    space = {"models.mmoe.num_experts": {"low": 2, "high": 3}, "model.expert_hidden": {"choices": [[8], [16]]},
             "models.ple.task_experts": {"low": 1, "high": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tuned(tiny_config, space, pruner="none")))
    out = tmp_path / "out"
    assert main(["tune", str(tmp_path / "c.yaml"), "--trials", "2", "--model", "mmoe", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "not searched, options of models other than 'mmoe': ['models.ple.task_experts']" in printed.err
    assert "best of 2 trials: trial" in printed.out
    study = study_in(out, "tiny-mmoe")
    best = study.best_trial.user_attrs["values"]
    assert set(best) == {"models.mmoe.num_experts", "model.expert_hidden"}
    written = load_config(out / "tune_best.yaml")
    assert written.models["mmoe"] == {"num_experts": best["models.mmoe.num_experts"],
                                      "expert_hidden": best["model.expert_hidden"]}
    assert written.with_model("mmoe").model.options == written.models["mmoe"]  # what bench builds
    assert written.model.name == "mmoe" and written.model.options == written.models["mmoe"]  # what train builds

    space["model.num_experts"] = {"low": 2, "high": 3}  # the same option of mmoe twice
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tuned(tiny_config, space) | {"model": {"name": "mmoe"}}))
    assert main(["tune", str(tmp_path / "c.yaml"), "--model", "mmoe", "--out", str(tmp_path / "o2")]) == 2
    assert "names option(s) ['num_experts'] of model 'mmoe' twice" in capsys.readouterr().err


def test_without_optuna_or_a_tune_section_the_error_says_what_to_do(tiny_config, tmp_path, monkeypatch, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config))
    assert main(["tune", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "no tune section" in capsys.readouterr().err
    config = load_config(tuned(tiny_config, {"train.lr": {"low": 1.0e-3, "high": 1.0e-2}}))
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'mtlrec\[tune\]'"):
        run_search(config, 1, tmp_path / "o", log=quiet, note=quiet)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tuned(tiny_config, {"train.lr": {"low": 1.0e-3, "high": 1.0e-2}})))
    assert main(["tune", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'mtlrec[tune]'" in capsys.readouterr().err


def test_the_examples_in_the_docstrings_run():
    import mtlrec.config
    import mtlrec.tune

    for module in (mtlrec.tune, mtlrec.config):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_bench_tunes_every_model_with_the_same_budget_before_its_seeds(tiny_config, tmp_path):
    import yaml

    from mtlrec.bench import run_bench
    from mtlrec.config import load_config

    raw = tiny_config | {"train": tiny_config["train"] | {"epochs": 2},
                         "models": {"mmoe": {"num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]},
                                    "single_task": {"hidden": [8], "tower_hidden": [4]}},
                         "tune": {"space": {"train.lr": {"low": 0.001, "high": 0.05, "log": True},
                                            "models.mmoe.num_experts": {"low": 2, "high": 4}},
                                  "pruner": "none"}}
    summary = run_bench(load_config(raw), ["single_task", "mmoe"], seeds=2, out_dir=tmp_path, log=lambda _: None,
                        tune_trials=2)
    tuned = summary["tuned"]
    assert set(tuned) == {"single_task", "mmoe"} and all(t["trials"] == 2 for t in tuned.values())
    assert set(tuned["single_task"]["values"]) == {"train.lr"}  # mmoe's option is not single_task's
    assert set(tuned["mmoe"]["values"]) == {"train.lr", "models.mmoe.num_experts"}
    for name, t in tuned.items():  # every seed's run trained with its model's best values
        for seed in (3, 4):
            saved = yaml.safe_load((tmp_path / name / f"seed{seed}" / "config.yaml").read_text())
            assert saved["train"]["lr"] == pytest.approx(t["values"]["train.lr"])
    assert saved["model"]["num_experts"] == tuned["mmoe"]["values"]["models.mmoe.num_experts"]
    assert (tmp_path / "tune" / "mmoe" / "tune.db").is_file()
    assert "Each model tuned" in (tmp_path / "bench.md").read_text()
