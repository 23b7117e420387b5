"""Hyperparameter search, `mtlrec tune CONFIG --trials N`: Optuna over the config's `tune.space`.

Each trial draws a value for every field of `tune.space` (`mtlrec.config.TuneRange`: a range,
on a log scale or a grid, or a list of choices) with Optuna's TPE sampler (Bergstra et al.,
NeurIPS 2011; seeded from the config's seed), writes them into the config and trains it. All
trials share one encoded data set: the data, features, tasks and seed are not searched. After
every epoch the trial reports its validation metric (`tune.metric`, by default
`train.early_stopping.metric`), and the pruner stops it when it trails: with `pruner: median`,
when its best value so far is worse than the median of the finished trials at that epoch.
A trial that finishes is worth the metric of the model early stopping kept.

Trials train in memory and write no model folder. The study lives in `OUT/tune.db` (SQLite),
so running the same command again continues it: the trials it finished count towards
`--trials` (a search of 20 that finished 7 runs 13 more), a trial cut short does not. The
config must be the one the study began with (run-time fields aside: the name, output folder,
progress, device, threads). At the end the best trial's config, full and resolved, is written
to `OUT/tune_best.yaml`: `mtlrec train OUT/tune_best.yaml` trains that trial again.

With `model=NAME` the search is for a bench model: its options (`models.NAME.X`, or `model.X`)
are searched, each trial builds the model as `mtlrec bench` does (from `models.NAME`), and
the best values are written into `models.NAME` (and `model` becomes NAME), so `mtlrec bench`
and `mtlrec train` both use them. Options of other models in the space are left out, with a
note.

Needs Optuna: `pip install 'mtlrec[tune]'`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtlrec import models
from mtlrec.config import (ConfigError, Experiment, TuneConfig, TuneRange, in_one_line, validate_config,
                           with_field)
from mtlrec.data.source import BatchSource
from mtlrec.experiment import Encoded, encode_splits, run_experiment
from mtlrec.tasks import higher_is_better
from mtlrec.train.callbacks import TrainingCallback
from mtlrec.train.checkpoint import flatten_fields
from mtlrec.train.early_stopping import COMBINED, combined_score
from mtlrec.train.trainer import NonFiniteLoss

STUDY_FILE, BEST_FILE = "tune.db", "tune_best.yaml"
# fields that may change between the runs of one study: they do not change what a trial trains
RUN_ONLY = ("name", "output_dir", "train.progress", "train.device", "train.threads")
FAILED = "failed"  # the user attribute of a trial that ran but has no value (why, as text)


def import_optuna():
    """Optuna, or an ImportError saying how to install it."""
    try:
        import optuna
    except ImportError as err:
        raise ImportError("mtlrec tune needs Optuna: pip install 'mtlrec[tune]'") from err
    return optuna


class TrialReporter(TrainingCallback):
    """Tells an Optuna trial the validation `metric` after every epoch (its step is the epoch)
    and stops training, by raising `optuna.TrialPruned`, when the study's pruner says so.
    After training, `value` is the metric of the model early stopping kept (evaluated again
    on `valid`: for the single-task baseline every network keeps its own epoch)."""

    def __init__(self, trial, metric: str, valid: BatchSource, combine: dict[str, float]):
        self.trial = trial
        self.metric = metric
        self.valid = valid
        self.combine = combine  # train.early_stopping.combine: the weights of metric 'combined'
        self.trainer = None
        self.value: float | None = None

    def on_train_begin(self, trainer) -> None:
        self.trainer = trainer

    def on_epoch_end(self, row: dict[str, float]) -> None:
        score = row[f"valid/{self.metric}"]
        self.trial.report(score, row["epoch"])
        if self.trial.should_prune():
            raise import_optuna().TrialPruned(f"pruned at epoch {row['epoch']} ({self.metric} {score:.6g})")

    def on_train_end(self, history: list[dict[str, float]]) -> None:
        scores = {f"valid/{k}": v for k, v in self.trainer.evaluate(self.valid).items()}
        if self.combine:
            scores[f"valid/{COMBINED}"] = combined_score(scores, self.combine)
        self.value = scores[f"valid/{self.metric}"]


@dataclass(frozen=True)
class SearchResult:
    """What a search leaves: its study, the best trial of the study and the config written for it."""

    study: str  # the study's name in `storage`
    storage: Path  # the SQLite file
    metric: str
    best_number: int
    best_value: float
    best_values: dict[str, Any]  # field path -> value of the best trial
    best_config: Path  # tune_best.yaml
    ran: int  # trials this call ran
    finished: int  # trials of the study that count towards --trials


def default_folder(config: Experiment, model: str | None = None) -> Path:
    """Where a search keeps its study and best config: OUTPUT_DIR/NAME-tune (-MODEL)."""
    return Path(config.output_dir) / (f"{config.name}-tune" + (f"-{model}" if model else ""))


def run_search(config: Experiment, trials: int, out_dir: str | Path, model: str | None = None,
               timeout: float | None = None, overwrite: bool = False, log: Callable[[str], None] = print,
               note: Callable[[str], None] | None = None, encoded: Encoded | None = None) -> SearchResult:
    """Search `config.tune.space` until the study in `out_dir` holds `trials` finished trials
    (or `timeout` seconds have passed: no trial starts after it); write the best trial's
    config to `out_dir/tune_best.yaml`. `model`: a bench model whose options are searched.
    `overwrite` deletes the study first. One line per trial goes to `log`, notes to `note`
    (default: stderr). `encoded`: the config's splits already encoded (a bench tuning several
    models encodes them once); trials never read the test split."""
    note = note or _to_stderr
    if config.tune is None:
        raise ConfigError("the config has no tune section: tune.space names the fields to search")
    if trials < 1:
        raise ValueError(f"--trials must be at least 1 (got {trials})")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"--timeout must be a positive number of seconds (got {timeout})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("mtlrec tune runs in one process, not under torchrun")
    if model is not None:
        models.check_options(model, config.models.get(model, {}))
    optuna = import_optuna()
    tune = config.tune
    name = model or config.model.name
    space = searched_space(tune.space, name, note)
    metric = tune.metric or config.train.early_stopping.metric
    base = config.to_dict()
    del base["tune"]
    for key, values in space.items():  # every bound and choice, for the model searched, before any trial
        for value in values.ends:
            try:
                searched_config(base, {key: value}, model)
            except ConfigError as err:
                raise ConfigError(f"tune.space {key!r}: the value {value!r} makes the config of model {name!r} "
                                  f"invalid: {in_one_line(err)}") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = out_dir / STUDY_FILE
    if overwrite:
        storage.unlink(missing_ok=True)
    study_name = config.name + (f"-{model}" if model else "")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    try:
        study = open_study(storage, study_name, metric, base, tune, config.seed, note)
        # the encoder depends on the data only: one for every trial; the test split stays unread
        encoded = dataclasses.replace(encoded or encode_splits(config), test=None)
        trial_base = with_field(base, "train.progress", False)  # a line per trial, not per epoch
        combine = config.train.early_stopping.combine
        ran, start = 0, time.monotonic()
        while len(counted(study)) < trials:
            if timeout is not None and time.monotonic() - start >= timeout:
                note(f"--timeout {timeout:g} s reached: no new trial started ({len(counted(study))} of {trials} "
                     "finished; run the same command to go on)")
                break
            run_trial(study, space, trial_base, model, metric, encoded, combine, log)
            ran += 1
    finally:
        optuna.logging.set_verbosity(verbosity)
    return _write_best(study, storage, metric, base, tune, model, out_dir / BEST_FILE, ran)


def searched_space(space: dict[str, TuneRange], model: str, note: Callable[[str], None]) -> dict[str, TuneRange]:
    """The keys of `space` searched for `model`: all but the options of other models
    (`models.OTHER.X`, left out with a note). One option named twice (`model.X` and
    `models.NAME.X`) is an error."""
    others = [key for key in space if key.split(".")[0] == "models" and key.split(".")[1] != model]
    if others:
        note(f"not searched, options of models other than {model!r}: {others}")
    kept = {key: values for key, values in space.items() if key not in others}
    options = [_model_option(key, model) for key in kept]
    twice = sorted({o for o in options if o is not None and options.count(o) > 1})
    if twice:
        raise ConfigError(f"tune.space names option(s) {twice} of model {model!r} twice (as model.X and "
                          f"models.{model}.X): keep one")
    if not kept:
        raise ConfigError(f"tune.space has no field to search for model {model!r}")
    return kept


def searched_config(base: dict[str, Any], values: dict[str, Any], model: str | None = None) -> Experiment:
    """The config dict `base` with `values` (field path -> value) written in, validated. An
    option of the model searched (`model.X` or `models.NAME.X`) is written to `models.NAME.X`
    (what `mtlrec bench` reads) and to `model.X` (what `mtlrec train` reads); with `model`
    given, `model` becomes that bench model, built from `models.NAME` as `mtlrec bench` builds it.

    Example:
        >>> base = {"model": {"name": "mmoe", "num_experts": 2}, "train": {"weighting": "fixed"}}
        >>> config = searched_config(base, {"model.num_experts": 5, "train.weighting.name": "uncertainty"})
        >>> config.model.options["num_experts"], config.models["mmoe"], config.train.weighting
        (5, {'num_experts': 5}, {'name': 'uncertainty'})
    """
    name = model or base["model"]["name"]
    raw = base
    for key, value in values.items():
        option = _model_option(key, name)
        if option is None:
            raw = with_field(raw, key, value)
        else:
            raw = with_field(raw, f"models.{name}.{option}", value)
            if model is None:
                raw = with_field(raw, f"model.{option}", value)
    if model is not None:
        raw = raw | {"model": {"name": model, **raw.get("models", {}).get(model, {})}}
    return validate_config(raw)


def _model_option(key: str, model: str) -> str | None:
    """The option of `model` that a space key names (`model.X` or `models.MODEL.X`), else None."""
    parts = key.split(".")
    if parts[0] == "model":
        return ".".join(parts[1:])
    if parts[0] == "models" and parts[1] == model:
        return ".".join(parts[2:])
    return None


def open_study(storage: Path, name: str, metric: str, base: dict[str, Any], tune: TuneConfig, seed: int,
               note: Callable[[str], None]):
    """The study `name` in the SQLite file `storage`, created or continued. A study continued
    must have the same metric and config (the fields of RUN_ONLY aside); a changed space is
    allowed, with a note. The TPE sampler is seeded with `seed` plus the trials already in the
    study, so a continued search does not draw its first trials again."""
    optuna = import_optuna()
    direction = "maximize" if higher_is_better(metric) else "minimize"
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup_trials,
                                          n_warmup_steps=tune.pruner_warmup_epochs + 1)  # steps are epochs, from 1
              if tune.pruner == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=f"sqlite:///{storage.resolve()}", study_name=name, direction=direction,
                                pruner=pruner, load_if_exists=True)
    fingerprint = _json({k: v for k, v in flatten_fields(base).items() if not k.startswith(RUN_ONLY)})
    space = _json(tune.model_dump(mode="json")["space"])
    began = study.user_attrs
    if "metric" not in began:  # a new study
        for key, value in {"metric": metric, "config": fingerprint, "space": space}.items():
            study.set_user_attr(key, value)
    else:
        if began["metric"] != metric:
            raise ValueError(f"the study {name!r} in {storage} was judged by {began['metric']!r}, not {metric!r}: "
                             "give another --out, or --overwrite to start over")
        before = began["config"]
        changed = sorted(k for k in before.keys() | fingerprint.keys() if before.get(k) != fingerprint.get(k))
        if changed:
            lines = "; ".join(f"{k}: {before.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
            raise ValueError(f"cannot continue the study {name!r} in {storage}: the config differs from the one it "
                             f"began with in {lines} (restore them, give another --out, or --overwrite to start over)")
        if began["space"] != space:
            note(f"tune.space changed since the study {name!r} began: its earlier trials still count and guide the "
                 "sampler where they fit the new space")
    study.sampler = optuna.samplers.TPESampler(n_startup_trials=tune.random_trials, seed=seed + len(study.trials))
    return study


def run_trial(study, space: dict[str, TuneRange], base: dict[str, Any], model: str | None, metric: str,
              encoded: Encoded, combine: dict[str, float], log: Callable[[str], None]) -> None:
    """Ask the study for a trial, train it, tell the study how it ended (complete, pruned, or
    failed: a non-finite loss or an undefined metric), and log one line. An exception (an
    interruption, an invalid config) marks the trial failed and goes on up: such a trial does
    not count towards --trials."""
    optuna = import_optuna()
    state = optuna.trial.TrialState
    trial = study.ask()
    values = {key: suggest(trial, key, ranged) for key, ranged in space.items()}
    trial.set_user_attr("values", values)
    head = f"trial {trial.number}  {show_values(values)}"
    try:
        try:
            config = searched_config(base, values, model)
        except ConfigError as err:
            raise ConfigError(f"trial {trial.number}: the values drawn make the config invalid: "
                              f"{in_one_line(err)}") from None
        reporter = TrialReporter(trial, metric, encoded.valid, combine)
        result = run_experiment(config, encoded=encoded, callbacks=[reporter])
    except optuna.TrialPruned as pruned:
        study.tell(trial, state=state.PRUNED)
        log(f"{head}  {pruned}")
        return
    except NonFiniteLoss as err:
        _fail(study, trial, str(err))
        log(f"{head}  failed: {err}")
        return
    except BaseException:
        study.tell(trial, state=state.FAIL)
        raise
    trial.set_user_attr("epochs", len(result.history))
    trial.set_user_attr("seconds", result.seconds)
    if math.isnan(reporter.value):
        _fail(study, trial, f"{metric} is undefined on the validation split")
        log(f"{head}  failed: {metric} is undefined on the validation split")
        return
    study.tell(trial, reporter.value)
    epochs = len(result.history)
    log(f"{head}  {metric} {reporter.value:.6g}  ({epochs} epoch{'s' * (epochs != 1)}, {result.seconds:.1f} s)")


def suggest(trial, key: str, ranged: TuneRange) -> Any:
    """Draw the value of field `key` for `trial`: a choice (lists and mappings are offered to
    Optuna as their JSON text, and returned as values), a whole number or a float."""
    if ranged.choices is not None:
        offered = {choice_label(c): c for c in ranged.choices}
        return offered[trial.suggest_categorical(key, list(offered))]
    if ranged.whole:
        return trial.suggest_int(key, ranged.low, ranged.high, step=ranged.step or 1, log=ranged.log)
    return trial.suggest_float(key, ranged.low, ranged.high, step=ranged.step, log=ranged.log)


def choice_label(value: Any) -> None | bool | int | float | str:
    """What Optuna stores for a choice: the value when it is null, a bool, a number or a
    string, else its JSON text.

    Example:
        >>> choice_label(0.5), choice_label("mmoe"), choice_label([16, 8])
        (0.5, 'mmoe', '[16, 8]')
    """
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def counted(study) -> list:
    """The trials that count towards --trials: complete, pruned, or failed on their own numbers
    (not those cut short by an interruption or an error)."""
    state = import_optuna().trial.TrialState
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (state.COMPLETE, state.PRUNED) or FAILED in t.user_attrs]


def _fail(study, trial, why: str) -> None:
    trial.set_user_attr(FAILED, why)
    study.tell(trial, state=import_optuna().trial.TrialState.FAIL)


def _write_best(study, storage: Path, metric: str, base: dict[str, Any], tune: TuneConfig, model: str | None,
                path: Path, ran: int) -> SearchResult:
    """Write the best trial's config (with the tune section, so the search can go on from it)."""
    finished = counted(study)
    complete = [t for t in finished if t.state == import_optuna().trial.TrialState.COMPLETE]
    if not complete:
        raise ValueError(f"no trial of the study {study.study_name!r} in {storage} finished with a value "
                         f"({len(finished)} pruned or failed); nothing written")
    best = study.best_trial
    values = best.user_attrs["values"]
    config = searched_config(base | {"tune": tune.model_dump(mode="json")}, values, model)
    written = config.to_dict() | {"tune": tune.model_dump(mode="json", exclude_defaults=True)}  # no nulls
    header = (f"# mtlrec tune: trial {best.number} of study {study.study_name!r}, the best of {len(finished)} "
              f"finished trials ({metric} {best.value:.6g})\n")
    path.write_text(header + yaml.safe_dump(written, sort_keys=False))
    return SearchResult(study.study_name, storage, metric, best.number, best.value, values, path, ran, len(finished))


def show_values(values: dict[str, Any]) -> str:
    """Drawn values as a trial's line shows them: floats to 4 significant digits, lists as JSON.

    Example:
        >>> show_values({"train.lr": 0.0012346, "model.expert_hidden": [16, 8], "train.weighting.name": "fixed"})
        'train.lr=0.001235  model.expert_hidden=[16, 8]  train.weighting.name=fixed'
    """
    def shown(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return json.dumps(value) if isinstance(value, list | dict) else str(value)

    return "  ".join(f"{key}={shown(value)}" for key, value in values.items())


def _json(value: Any) -> Any:
    """`value` as it reads back from the study's JSON attributes (tuples as lists, ...)."""
    return json.loads(json.dumps(value))


def _to_stderr(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


__all__ = ["BEST_FILE", "STUDY_FILE", "SearchResult", "TrialReporter", "default_folder", "run_search",
           "searched_config", "show_values", "suggest"]
